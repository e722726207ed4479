"""Safe loading through the CLI: no pickles, no code from a model folder, safe YAML, confined outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_texts
from safetensors.torch import load_file

from retromae_st import cli
from retromae_st.models import build_model


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("security") / "toy"
    texts = make_texts(20, seed=2)
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (folder / "queries.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": " ".join(t.split()[:3])}) + "\n" for i, t in enumerate(texts)
        )
    )
    rows = ["query-id\tcorpus-id\tscore", *(f"q{i}\td{i}\t1" for i in range(20))]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def to_pickle(weights: Path) -> None:
    """Replace a safetensors file by the same weights as a pickle, as older checkpoints ship them."""
    torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
    weights.unlink()


def _evaluate(model: Path, beir: Path, output: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--beir", str(beir), "--output", str(output), *extra]


def test_pickle_only_transformers_folder_is_refused_unless_allowed(tokenizer, beir, tmp_path, capsys):
    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=tmp_path / "init", seed=0)
    folder = tmp_path / "pickled"
    model[0].auto_model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    to_pickle(folder / "model.safetensors")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))

    assert cli.main(_evaluate(folder, beir, tmp_path / "r1")) == 2
    message = _error(capsys)
    assert str(folder) in message and "pickle" in message and "--allow-pickle" in message
    assert not (tmp_path / "r1").exists()
    assert cli.main(_evaluate(folder, beir, tmp_path / "r2", "--allow-pickle")) == 0
    assert (tmp_path / "r2" / "report.json").is_file()


def test_pickle_only_sentence_transformers_folder_is_refused_for_training(tokenizer, beir, tmp_path, capsys):
    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=tmp_path / "init", seed=0)
    folder = tmp_path / "st-pickled"
    model.save(str(folder))
    for weights in folder.rglob("*.safetensors"):
        to_pickle(weights)
    assert list(folder.rglob("*.bin")) and not list(folder.rglob("*.safetensors"))
    args = [
        "finetune",
        "--model",
        str(folder),
        "--train",
        str(beir),
        "--split",
        "test",
        "--output",
        str(tmp_path / "o"),
    ]
    assert cli.main(args) == 2
    assert "pickle" in _error(capsys)
    assert not (tmp_path / "o" / "final").exists()


@pytest.fixture
def evil_folder(tokenizer, tmp_path) -> tuple[Path, Path]:
    """A stock BERT folder whose config points AutoModel at a module that leaves a marker when imported."""
    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=tmp_path / "evil", seed=0)
    del model
    folder, marker = tmp_path / "evil", tmp_path / "marker"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        "from pathlib import Path\n\n"
        "from transformers import BertModel\n\n"
        f"Path({str(marker)!r}).write_text('code from the model folder ran')\n\n\n"
        "class EvilModel(BertModel):\n"
        "    pass\n"
    )
    return folder, marker


def test_remote_code_in_a_model_folder_does_not_run_by_default(evil_folder, beir, tmp_path):
    folder, marker = evil_folder
    assert cli.main(_evaluate(folder, beir, tmp_path / "r")) == 0  # the stock BERT class is used instead
    assert not marker.exists()


@pytest.mark.slow
def test_remote_code_runs_only_with_trust_remote_code(evil_folder, beir, tmp_path):
    folder, marker = evil_folder
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where transformers copies the folder's code
    }
    result = subprocess.run(
        [sys.executable, "-m", "retromae_st.cli", *_evaluate(folder, beir, tmp_path / "r", "--trust-remote-code")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "code from the model folder ran"


RECIPE = """\
name: tiny
output_dir: {output_dir}
model:
  preset: retromae-tiny
  vocab_size: 150
pretrain:
  corpus: {corpus}
  max_steps: 2
"""


def test_recipe_python_tags_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        RECIPE.format(output_dir="out", corpus="c.txt")
        + f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 2
    message = _error(capsys)
    assert "evil.yaml: invalid YAML" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("output_dir", "../x", "escapes the output root"),
        ("output_dir", "runs/../../x", "escapes the output root"),
        ("output_dir", "/tmp/x", "is absolute"),
        ("export", "../x", "escapes the output root"),
    ],
)
def test_recipe_outputs_cannot_escape_the_output_root(tmp_path, capsys, key, value, expected):
    root = tmp_path / "root"
    root.mkdir()
    (root / "c.txt").write_text("\n".join(make_texts(20)) + "\n")
    text = RECIPE.format(output_dir="out", corpus=root / "c.txt")
    text = (
        text.replace("output_dir: out", f"output_dir: {value}")
        if key == "output_dir"
        else text + f"export: {value}\n"
    )
    recipe = root / "r.yaml"
    recipe.write_text(text)
    assert cli.main(["run", str(recipe), "--output-root", str(root)]) == 2
    message = _error(capsys)
    assert expected in message and repr(value) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing written outside the root
    assert sorted(p.name for p in root.iterdir()) == ["c.txt", "r.yaml"]  # nor anything inside it


def test_alias_bomb_recipe_check_ends_quickly_with_exit_2(tmp_path):
    # "Billion laughs": 9 nested levels of 9 aliases, 9**9 values from a 300-byte file. Before aliases were
    # bounded, even `run --check` never returned; in a subprocess, so the hang would be bounded by timeout.
    names = "abcdefghi"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert recipe.stat().st_size < 400
    result = subprocess.run(
        [sys.executable, "-m", "retromae_st.cli", "run", str(recipe), "--check"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"retromae-st: error: {recipe}:6: ") and "nested aliases" in last
    assert "Traceback" not in result.stderr


def test_recursive_alias_in_a_recipe_exits_2_naming_the_file(tmp_path, capsys):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text(RECIPE.format(output_dir="out", corpus="c.txt") + "loop: &l [*l]\n")
    assert cli.main(["run", str(recipe), "--check"]) == 2
    assert f"{recipe}:9: the alias *l is inside its own anchor &l" in _error(capsys)

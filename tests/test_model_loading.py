"""load_encoder loads hub names, short names and folders as SentenceTransformer(name) does (issue #10).

The hub is never reached: hub names resolve against a hub-cache layout built in the test
(``models--org--name/snapshots/<rev>/...`` and ``refs/main``) under a temporary HF_HUB_CACHE, offline.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from conftest import TINY
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import BertModel

from retromae_st.errors import UserInputError
from retromae_st.models import build_model, load_encoder

REVISION = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["retrieval of python documents", "a kernel driver for the network"]


@pytest.fixture
def st_folder(tokenizer, tmp_path) -> Path:
    """A Sentence-Transformers folder (modules.json) that pools by mean, with its own max length 48."""
    model = build_model(TINY, tokenizer, max_seq_length=48, pooling="mean", save_dir=tmp_path / "w", seed=3)
    folder = tmp_path / "st-model"
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache the hub libraries read (offline) instead of the user's."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SENTENCE_TRANSFORMERS_HOME", raising=False)
    # The hub library reads its cache path once, at import: point the running process at the test's cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo: str, folder: Path) -> Path:
    """Lay ``folder`` out as the cached snapshot of hub repository ``repo`` (what a download leaves)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


def pooling_mode(model) -> str:
    return next(module.pooling_mode for module in model if isinstance(module, Pooling))


def encode(model) -> np.ndarray:
    return model.encode(TEXTS, convert_to_numpy=True)


def test_hub_name_loads_the_models_own_modules_and_pooling(st_folder, hub_cache):
    put_in_cache(hub_cache, "acme/tiny-mean", st_folder)
    from_hub = load_encoder("acme/tiny-mean")
    from_folder = load_encoder(str(st_folder))
    assert pooling_mode(from_hub) == "mean"  # was CLS: the repository's modules.json was ignored
    assert from_hub.max_seq_length == 48
    np.testing.assert_allclose(encode(from_hub), encode(from_folder), rtol=1e-5, atol=1e-6)


def test_short_name_resolves_to_sentence_transformers_org(st_folder, hub_cache):
    put_in_cache(hub_cache, "sentence-transformers/tiny-mean", st_folder)
    model = load_encoder("tiny-mean")
    assert pooling_mode(model) == "mean"
    np.testing.assert_allclose(encode(model), encode(load_encoder(str(st_folder))), rtol=1e-5, atol=1e-6)


def test_plain_checkpoint_in_the_hub_cache_gets_the_requested_pooling(tokenizer, tmp_path, hub_cache):
    folder = tmp_path / "plain"
    BertModel(TINY.bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    put_in_cache(hub_cache, "acme/plain-bert", folder)
    assert pooling_mode(load_encoder("acme/plain-bert")) == "cls"  # default for a plain checkpoint
    assert pooling_mode(load_encoder("acme/plain-bert", pooling="mean")) == "mean"


def test_explicit_pooling_and_length_override_a_sentence_transformers_model(st_folder):
    model = load_encoder(str(st_folder), pooling="cls", max_seq_length=32)
    assert pooling_mode(model) == "cls"
    assert model.max_seq_length == 32
    token_vectors = model.encode(TEXTS, output_value="token_embeddings")
    np.testing.assert_allclose(encode(model)[0], token_vectors[0][0].numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_hub_name_offline_is_a_user_error(hub_cache):
    with pytest.raises(UserInputError, match="sentence-transformers/not-cached.*HF_HUB_OFFLINE"):
        load_encoder("not-cached")


def test_missing_nested_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_encoder(str(tmp_path / "runs" / "pt" / "final"))


def test_hub_name_follows_sentence_transformers():
    from retromae_st.models import hub_name

    assert hub_name("tiny-mean") == "sentence-transformers/tiny-mean"
    assert hub_name("bert-base-uncased") == "bert-base-uncased"  # original checkpoints keep their name
    assert hub_name("acme/x") == "acme/x"


# -- a recipe that starts from an existing Sentence-Transformers model (issue #10 item 4) -------------------


def _beir(folder: Path, texts: list[str]) -> Path:
    import json

    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"_id": f"q{i}", "text": " ".join(text.split()[:3])}) + "\n")
    rows = ["query-id\tcorpus-id\tscore", *(f"q{i}\td{i}\t1" for i in range(len(texts)))]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _recipe(st_folder: Path, tmp_path: Path, **model: object):
    from conftest import make_texts

    from retromae_st.recipes import Recipe

    texts = make_texts(40, seed=11)
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    return Recipe.model_validate(
        {
            "output_dir": "run",
            "model": {"name_or_path": str(st_folder), **model},
            "pretrain": {
                "corpus": str(tmp_path / "corpus.txt"),
                "batch_size": 8,
                "max_steps": 2,
                "save_steps": 5,
            },
            "evaluation": {"beir": [str(_beir(tmp_path / "toy", texts[:12]))]},
        }
    )


def test_recipe_defaults_keep_the_models_own_pooling_and_length(st_folder, tmp_path):
    from retromae_st.pipeline import Run, initial_model

    recipe = _recipe(st_folder, tmp_path)
    assert recipe.model.pooling is None and recipe.model.max_seq_length is None
    model = initial_model(Run(recipe, tmp_path / "run"))
    assert pooling_mode(model) == "mean"  # was silently kept while the recipe said cls
    assert model.max_seq_length == 48  # was overridden by the recipe's default 128


def test_recipe_pooling_and_length_are_honoured_for_an_existing_model(st_folder, tmp_path, caplog):
    import logging

    from retromae_st.pipeline import Run, initial_model

    with caplog.at_level(logging.INFO, logger="retromae_st.models"):
        model = initial_model(
            Run(_recipe(st_folder, tmp_path, pooling="cls", max_seq_length=32), tmp_path / "r")
        )
    assert pooling_mode(model) == "cls"
    assert model.max_seq_length == 32
    assert "replacing its Pooling module" in caplog.text


def test_compare_untrained_reports_the_starting_model_of_a_name_or_path_run(st_folder, tmp_path):
    import json

    from retromae_st.pipeline import run_recipe

    run_recipe(_recipe(st_folder, tmp_path, pooling="cls"), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert [entry["label"] for entry in report["models"]] == ["initial", "stage1-retromae"]
    initial = next(r for r in report["results"] if r["model"] == "initial")
    expected = load_encoder(str(st_folder), pooling="cls")  # the starting model, not the trained one
    assert initial["num_queries"] == 12
    from retromae_st.evaluation import model_fingerprint

    assert report["models"][0]["fingerprint"] == model_fingerprint(expected)
    final = tmp_path / "run" / "stage1" / "final"
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"


def test_preset_defaults_stay_cls_and_128(tokenizer, tmp_path):
    model = build_model(TINY, tokenizer, save_dir=tmp_path / "w")
    assert pooling_mode(model) == "cls" and model.max_seq_length == 128


# -- the command line ---------------------------------------------------------------------------------------


def test_default_labels_are_short_and_distinct():
    from retromae_st.evaluation.run import default_labels

    assert default_labels(["runs/ft/final", "runs/pt/final", "all-MiniLM-L6-v2"]) == [
        "ft",
        "pt",
        "all-MiniLM-L6-v2",
    ]
    assert default_labels(["stage1/final", "/abs/stage2/final/"]) == ["stage1", "stage2"]
    assert default_labels(["a/pt/final", "b/pt/final", "c/x"]) == ["a/pt", "b/pt", "x"]
    assert default_labels(["sentence-transformers/all-MiniLM-L6-v2"]) == ["all-MiniLM-L6-v2"]
    assert default_labels(["pt", "pt/final"]) == ["pt", "pt/final"]


def test_evaluate_accepts_label_equals_path(monkeypatch, tmp_path):
    from retromae_st import cli, evaluation

    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda models, **kwargs: calls.append(models))
    argv = ["evaluate", "--model", "stage1=x/final", "--model", "y/final", "--beir", "b", "--output", "o"]
    assert cli.main(argv) == 0
    assert calls == [{"stage1": "x/final", "y": "y/final"}]


def test_evaluate_refuses_clashing_labels(monkeypatch, capsys):
    from retromae_st import cli, evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda models, **kwargs: None)
    argv = ["evaluate", "--model", "pt=a", "--model", "pt/final", "--beir", "b", "--output", "o"]
    assert cli.main(argv) == 2
    assert "labelled ['pt']" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "=a", "--beir", "b", "--output", "o"]) == 2


def test_pretrain_help_says_what_the_result_pools_by(capsys):
    from retromae_st import cli

    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "model's own pooling" in text and "--pooling" in text


def test_pretrain_cli_from_an_existing_model_keeps_its_pooling_and_length(st_folder, tmp_path, caplog):
    import json
    import logging

    from conftest import make_texts

    from retromae_st import cli

    (tmp_path / "c.txt").write_text("\n".join(make_texts(30, seed=2)) + "\n")
    argv = ["pretrain", "--model", str(st_folder), "--corpus", str(tmp_path / "c.txt"), "--output",
            str(tmp_path / "pt"), "--max-steps", "1", "--batch-size", "8"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    final = tmp_path / "pt" / "final"
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
    assert load_encoder(str(final)).max_seq_length == 48  # the CLI's default was 128
    assert "pools by mean" in caplog.text


def test_build_model_without_a_folder_leaves_none_behind(tokenizer, tmp_path, monkeypatch):
    """Without ``save_dir`` the initial weights go to a temporary folder that is removed once loaded."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = build_model(TINY, tokenizer, max_seq_length=32, seed=3)
    assert list(scratch.iterdir()) == []
    kept = build_model(TINY, tokenizer, max_seq_length=32, seed=3, save_dir=tmp_path / "kept")
    assert (tmp_path / "kept" / "model.safetensors").is_file()
    np.testing.assert_allclose(model.encode(TEXTS), kept.encode(TEXTS), rtol=1e-5, atol=1e-6)

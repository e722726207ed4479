"""Issue #10: finite checkpoints, no lost user files, one run per folder, one-line OS errors, no stale
temporaries, outputs readable as the umask says. Through the CLI where the user would see it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_texts, write_toy_data
from safetensors.torch import load_file, save_file

from retromae_st import cli
from retromae_st.io import LOCK_FILE, atomic_dir, atomic_write_text, output_lock, remove_stale_temporaries
from retromae_st.pretraining.loss import LOSS_WEIGHTS_NAME, RetroMAELoss
from retromae_st.pretraining.training import (
    CHECKPOINT_MARK,
    TRAINER_STATE,
    complete_checkpoints,
    last_complete_checkpoint,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("safety")
    return write_toy_data(root, make_texts(48, seed=5), {"train": range(48)}, tokenizer, TINY)


def pretrain_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--model", str(data / "model"), "--corpus", str(data / "corpus.txt"),
        "--output", str(output),
        "--max-seq-length", "32", "--batch-size", "8", "--max-steps", "6", "--save-steps", "2",
        "--logging-steps", "1", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def finetune_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(data / "model"), "--train", str(data / "toy"), "--output", str(output),
        "--batch-size", "8", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3",
        *extra,
    ]  # fmt: skip


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("retromae-st: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def resumed_from(output: Path) -> str:
    lines = [line for line in (output / "run.log").read_text().splitlines() if "Resuming from" in line]
    return lines[-1] if lines else ""


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward: an overflow in backward."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


# -- item 5: a finite loss with an infinite gradient, NaN weights in a checkpoint ----------------------------


def test_stage1_infinite_gradient_stops_before_the_update_naming_the_last_finite_checkpoint(
    data, tmp_path, monkeypatch, capsys
):
    original = RetroMAELoss.forward

    def forward(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        if self.current_step == 3:
            losses = {name: _InfiniteGradient.apply(value) for name, value in losses.items()}
        return losses

    monkeypatch.setattr(RetroMAELoss, "forward", forward)
    output = tmp_path / "run"
    assert cli.main(pretrain_args(data, output)) == 3
    message = one_line(capsys)
    assert "gradient became" in message and "at step 3" in message
    assert f"{output / 'checkpoints' / 'checkpoint-2'}, is intact" in message
    checkpoint = output / "checkpoints" / "checkpoint-2"
    assert (checkpoint / CHECKPOINT_MARK).is_file()
    for name in ("model.safetensors", LOSS_WEIGHTS_NAME):
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / name)).values())
    assert not (output / "checkpoints" / "checkpoint-4").exists()


def test_stage1_nan_weights_are_never_kept_and_a_rerun_resumes_from_the_last_finite_checkpoint(
    data, tmp_path, monkeypatch, capsys
):
    from retromae_st.pretraining.training import RetroMAETrainingCallback

    original = RetroMAETrainingCallback.on_pre_optimizer_step

    def poison(self, args, state, control, model=None, **kwargs):
        original(self, args, state, control, model=model, **kwargs)
        if state.global_step + 1 == 3:  # after the checks: the optimizer step writes NaN weights
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(RetroMAETrainingCallback, "on_pre_optimizer_step", poison)
    output = tmp_path / "run"
    assert cli.main(pretrain_args(data, output, "--save-steps", "1")) == 3
    message = one_line(capsys)
    assert "weights became non-finite" in message and "at step 3" in message
    assert f"{output / 'checkpoints' / 'checkpoint-2'}, is intact" in message
    assert not (output / "checkpoints" / "checkpoint-3").exists()

    monkeypatch.setattr(RetroMAETrainingCallback, "on_pre_optimizer_step", original)
    assert cli.main(pretrain_args(data, output, "--save-steps", "1")) == 0
    assert resumed_from(output).endswith("checkpoint-2")
    assert all(
        torch.isfinite(t).all() for t in load_file(str(output / "final" / "model.safetensors")).values()
    )


def test_stage2_infinite_gradient_stops_naming_the_last_finite_checkpoint(
    data, tmp_path, monkeypatch, capsys
):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    original = MultipleNegativesRankingLoss.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        value = original(self, *args, **kwargs)
        return _InfiniteGradient.apply(value) if len(calls) == 3 else value

    monkeypatch.setattr(MultipleNegativesRankingLoss, "forward", forward)
    output = tmp_path / "run"
    assert cli.main(finetune_args(data, output)) == 3
    message = one_line(capsys)
    assert "gradient became" in message and "at step 3" in message
    assert f"{output / 'checkpoints' / 'checkpoint-2'}, is intact" in message
    assert (output / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARK).is_file()


def _checkpoint(folder: Path, step: int, value: float, sealed: bool, state: str | None = None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((3,), value)}, str(path / "model.safetensors"))
    (path / TRAINER_STATE).write_text(state if state is not None else json.dumps({"global_step": step}))
    if sealed:
        (path / CHECKPOINT_MARK).write_text("{}")
    return path


def test_resume_selection_skips_unsealed_checkpoints_and_older_ones_with_nan_weights(tmp_path):
    # Written before the seal existed: the NaN one and the half-written trainer_state.json are passed over.
    legacy = tmp_path / "legacy"
    _checkpoint(legacy, 2, 1.0, sealed=False)
    _checkpoint(legacy, 4, float("nan"), sealed=False)
    _checkpoint(legacy, 6, 1.0, sealed=False, state='{"global_st')
    assert last_complete_checkpoint(legacy).name == "checkpoint-2"
    # Once a checkpoint is sealed, an unsealed newer one is a save cut short.
    sealed = tmp_path / "sealed"
    _checkpoint(sealed, 2, 1.0, sealed=True)
    _checkpoint(sealed, 4, 1.0, sealed=False)
    assert [p.name for p in complete_checkpoints(sealed)] == ["checkpoint-2"]


# -- item 6: export never deletes what the tool did not write; --overwrite validates first -----------------

RECIPE = """\
name: tiny
output_dir: out
model:
  name_or_path: {model}
  max_seq_length: 32
pretrain:
  enabled: false
finetune:
  train: {train}
  batch_size: 8
  max_steps: 2
  save_steps: 2
evaluation:
  enabled: false
"""


def _recipe(root: Path, data: Path, extra: str = "") -> Path:
    path = root / "r.yaml"
    path.write_text(RECIPE.format(model=data / "model", train=data / "toy") + extra)
    return path


def test_export_refuses_a_folder_of_user_files_with_and_without_overwrite(data, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "notes.txt").write_text("keep me")
    recipe = _recipe(root, data, "export: mine\n")
    for flags in ([], ["--overwrite"]):
        assert cli.main(["run", str(recipe), "--output-root", str(root), *flags]) == 2
        message = one_line(capsys)
        assert str(root / "mine") in message and "not" in message
        assert (root / "mine" / "notes.txt").read_text() == "keep me"
        assert not (root / "out" / "stage2").exists()  # refused before anything trained


def test_export_is_kept_on_a_rerun_and_replaced_only_with_overwrite(data, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    recipe = _recipe(root, data, "export: exported\n")
    assert cli.main(["run", str(recipe), "--output-root", str(root)]) == 0
    assert (root / "exported" / "modules.json").is_file()
    assert cli.main(["run", str(recipe), "--output-root", str(root)]) == 0  # a re-run keeps its own export
    # another run may not take over this export without --overwrite
    other = root / "r2.yaml"
    other.write_text(recipe.read_text().replace("output_dir: out", "output_dir: out2"))
    assert cli.main(["run", str(other), "--output-root", str(root)]) == 2
    assert "--overwrite" in one_line(capsys)


def test_run_overwrite_validates_the_new_inputs_before_deleting_the_old_run(data, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "out" / "recipe.yaml").write_text("name: earlier\n")
    (root / "out" / "run.log").write_text("the earlier run\n")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    recipe = _recipe(root, data, "export: mine\n")
    assert cli.main(["run", str(recipe), "--output-root", str(root), "--overwrite"]) == 2
    one_line(capsys)
    assert (root / "out" / "run.log").read_text() == "the earlier run\n"


# -- item 7: one run per output folder; a resume with other settings is refused ---------------------------


def test_a_second_run_into_a_locked_folder_exits_2_naming_the_owner_pid(data, tmp_path, capsys):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from retromae_st.io import output_lock\n"
         f"with output_lock({str(output)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(pretrain_args(data, output)) == 2
        message = one_line(capsys)
        assert f"pid {holder.pid}" in message and str(output) in message
        assert not (output / "checkpoints").exists()
    finally:
        holder.communicate("")
    with output_lock(output):  # released when its holder ended
        assert (output / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_recipe_run_holds_the_lock_for_the_whole_run(data, tmp_path, monkeypatch):
    from retromae_st import pipeline

    root = tmp_path / "root"
    root.mkdir()
    seen = []

    def stage2(run, model):
        with open(run.folder / LOCK_FILE) as handle:  # a second open file description cannot take it
            with pytest.raises(OSError) as error:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(error.value.errno)
        return model

    monkeypatch.setattr(pipeline, "stage2", stage2)
    assert cli.main(["run", str(_recipe(root, data)), "--output-root", str(root)]) == 0
    assert seen == [errno.EWOULDBLOCK]


def test_resume_with_other_settings_is_refused_naming_the_keys(data, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    recipe = _recipe(root, data)
    assert cli.main(["run", str(recipe), "--output-root", str(root)]) == 0
    written = (root / "out" / "recipe.yaml").read_text()
    args = ["run", str(recipe), "--output-root", str(root), "--set", "finetune.learning_rate=300"]
    assert cli.main(args) == 2
    message = one_line(capsys)
    assert "finetune.learning_rate" in message and "--overwrite" in message
    assert (root / "out" / "recipe.yaml").read_text() == written  # provenance unchanged
    assert cli.main([*args, "--overwrite"]) == 0
    assert "learning_rate: 300" in (root / "out" / "recipe.yaml").read_text()


def test_changing_only_evaluation_settings_re_evaluates_without_retraining(data, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    recipe = root / "r.yaml"
    evaluated = (
        RECIPE.rsplit("evaluation:", 1)[0] + f"evaluation:\n  beir: [{data / 'toy'}]\n  split: train\n"
    )
    recipe.write_text(evaluated.format(model=data / "model", train=data / "toy"))
    assert cli.main(["run", str(recipe), "--output-root", str(root)]) == 0
    final = root / "out" / "stage2" / "final" / "model.safetensors"
    weights = final.read_bytes()
    report = (root / "out" / "report" / "report.json").read_text()
    args = ["run", str(recipe), "--output-root", str(root), "--set", "evaluation.compare_untrained=false"]
    assert cli.main(args) == 0  # evaluation keys do not change how the models were made
    assert final.read_bytes() == weights  # nothing retrained
    assert (
        root / "out" / "report" / "report.json"
    ).read_text() != report  # the report follows the new settings
    assert "compare_untrained: false" in (root / "out" / "recipe.yaml").read_text()


# -- item 9: OS errors on user paths are one line, exit 2 ------------------------------------------------


def test_output_naming_an_existing_file_exits_2(data, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    assert cli.main(pretrain_args(data, target)) == 2
    assert str(target) in one_line(capsys)
    assert target.read_text() == "mine"


def test_read_only_output_parent_exits_2_naming_the_path(data, tmp_path, monkeypatch, capsys):
    output = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as on a read-only mount (the tests may run as root)
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert cli.main(pretrain_args(data, output)) == 2
    message = one_line(capsys)
    assert str(output) in message and "Read-only file system" in message


def test_allow_pickle_with_a_corrupt_or_malicious_pickle_exits_2(data, tmp_path, capsys):
    import shutil

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    for name, payload in (
        ("corrupt", b"PK\x03\x04 this is not a checkpoint"),
        ("evil", pickle.dumps(Evil())),
    ):
        folder = tmp_path / name
        shutil.copytree(data / "model", folder)
        for weights in folder.rglob("*.safetensors"):
            weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(payload)
        args = finetune_args(data, tmp_path / f"out-{name}", "--allow-pickle")
        args[args.index("--model") + 1] = str(folder)
        assert cli.main(args) == 2
        assert str(folder) in one_line(capsys)
    assert not (tmp_path / "pwned").exists()


def test_recursion_error_is_one_line(tmp_path, monkeypatch, capsys):
    from retromae_st import recipes

    def recurse(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(recipes, "load_recipe", recurse)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("a: &a [*a]\n")
    assert cli.main(["run", str(recipe)]) == 2
    assert str(recipe) in one_line(capsys)


# -- item 10: temporaries of a killed save are removed by the next save ----------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_a_dead_writer_are_removed_live_ones_kept(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".final.tmp-{dead}-abc"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("half")
    stale_file = tmp_path / f".report.json.tmp-{dead}-xyz"
    stale_file.write_text("half")
    live = tmp_path / f".final.tmp-{os.getpid()}-def"
    live.mkdir()
    unknown = tmp_path / ".final.tmp-nopid"  # not named by this version: left alone
    unknown.mkdir()
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "x").write_text("x")
    atomic_write_text(tmp_path / "report.json", "{}")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.is_dir() and unknown.is_dir() and (tmp_path / "final" / "x").is_file()
    assert remove_stale_temporaries(tmp_path / "final") == []


@pytest.mark.slow
def test_a_killed_final_save_leaves_nothing_after_the_rerun(data, tmp_path):
    worker = Path(__file__).resolve().parent / "workers" / "crash_cli.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(worker), "in-final", "0", *pretrain_args(data, output, "--max-steps", "2")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]
    assert [p for p in output.iterdir() if p.name.startswith(".final.tmp-")]
    assert cli.main(pretrain_args(data, output, "--max-steps", "2")) == 0
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# -- item 11: outputs are as readable as the umask says ---------------------------------------------------


def test_final_model_is_group_and_other_readable_under_umask_022(data, tmp_path):
    previous = os.umask(0o022)
    try:
        output = tmp_path / "run"
        assert cli.main(pretrain_args(data, output, "--max-steps", "2")) == 0
    finally:
        os.umask(previous)
    for folder in (output / "final", output / "decoder", output / "checkpoints" / "checkpoint-2"):
        for path in [folder, *folder.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            wanted = 0o755 if path.is_dir() else 0o644
            assert mode & wanted == wanted, (path, oct(mode))
            assert not mode & 0o022, (path, oct(mode))
    assert re.fullmatch(r"0o6[0-4]4", oct(stat.S_IMODE((output / "training_log.json").stat().st_mode)))


def test_run_overwrite_never_empties_a_folder_that_is_not_a_run(data, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "out" / "thesis.tex").write_text("years of work")
    recipe = _recipe(root, data)
    assert cli.main(["run", str(recipe), "--output-root", str(root), "--overwrite"]) == 2
    assert "not a retromae-st run folder" in one_line(capsys)
    assert (root / "out" / "thesis.tex").read_text() == "years of work"

"""Training with the stock trainer: stock saved model, exact resume, joint clipping, multi-process sync."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port, launcher_env, make_texts
from datasets import Dataset
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import TrainerCallback

from retromae_st.data.batching import PaddingCollator
from retromae_st.data.tokenize import tokenize_corpus
from retromae_st.errors import UserInputError
from retromae_st.models import build_model
from retromae_st.pretraining.loss import LOSS_WEIGHTS_NAME, RetroMAELoss
from retromae_st.pretraining.trainer import RetroMAETrainer
from retromae_st.pretraining.training import (
    RetroMAETrainingCallback,
    complete_checkpoints,
    last_complete_checkpoint,
    non_finite_gradient,
    pretrain,
)


@pytest.fixture
def windows(tokenizer):
    dataset, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(48, seed=5)}), tokenizer, max_seq_length=64
    )
    return dataset


def _fresh(tokenizer, folder: Path) -> tuple[SentenceTransformer, RetroMAELoss]:
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=folder, seed=0)
    torch.manual_seed(0)
    return model, RetroMAELoss(model)


def test_pretrain_saves_a_stock_model_that_reloads(tokenizer, windows, tmp_path):
    model, loss = _fresh(tokenizer, tmp_path / "init")
    pretrain(
        model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=4, save_steps=2, learning_rate=1e-3,
        logging_steps=1,
    )  # fmt: skip
    final = tmp_path / "run" / "final"
    modules = json.loads((final / "modules.json").read_text())
    assert all(module["type"].startswith("sentence_transformers.") for module in modules)
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"
    assert not list(final.rglob("*.bin")) and list(final.rglob("*.safetensors"))
    reloaded = SentenceTransformer(str(final))  # no trust_remote_code needed
    sentences = ["a retrieval query", "the decoder rebuilds the text"]
    assert torch.allclose(
        torch.as_tensor(model.encode(sentences)), torch.as_tensor(reloaded.encode(sentences)), atol=1e-6
    )
    # the decoder is training state: beside every checkpoint and at the end, never inside the model
    assert (tmp_path / "run" / "decoder" / LOSS_WEIGHTS_NAME).is_file()
    assert all(
        (c / LOSS_WEIGHTS_NAME).is_file() for c in complete_checkpoints(tmp_path / "run" / "checkpoints")
    )
    assert not (final / LOSS_WEIGHTS_NAME).exists()
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert any("decoder" in entry and "encoder_mlm" in entry for entry in log)
    # the model card names the loss
    assert "RetroMAELoss" in (final / "README.md").read_text()


def test_finished_output_is_not_overwritten(tokenizer, windows, tmp_path):
    model, loss = _fresh(tokenizer, tmp_path / "init")
    pretrain(model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=2, save_steps=10)
    with pytest.raises(ValueError, match="already exists"):
        pretrain(model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=2)


class _Crash(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt(f"simulated crash at step {self.at_step}")


def _run(tokenizer, windows, folder: Path, callbacks=()) -> RetroMAELoss:
    model, loss = _fresh(tokenizer, folder / "init")
    pretrain(
        model, windows, folder / "run", loss=loss, batch_size=8, max_steps=8, save_steps=3,
        learning_rate=1e-3, callbacks=callbacks,
    )  # fmt: skip
    return loss


def test_resume_continues_exactly(tokenizer, windows, tmp_path):
    straight = _run(tokenizer, windows, tmp_path / "a")

    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, windows, tmp_path / "b", callbacks=[_Crash(at_step=5)])
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-3"
    assert not (tmp_path / "b" / "run" / "final").exists()
    # a checkpoint cut short (no decoder weights written) is passed over on resume
    partial = checkpoints / "checkpoint-4"
    shutil.copytree(checkpoints / "checkpoint-3", partial)
    (partial / LOSS_WEIGHTS_NAME).unlink()
    resumed = _run(tokenizer, windows, tmp_path / "b")

    for name in ("final",):
        a = load_file(str(tmp_path / "a" / "run" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "run" / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for key, value in straight.own_state_dict().items():
        assert torch.equal(value, resumed.own_state_dict()[key]), key
    state = json.loads((checkpoints / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_joint_gradient_clipping(tiny_model):
    loss = RetroMAELoss(tiny_model)
    callback = RetroMAETrainingCallback(loss)
    callback.max_grad_norm = 1.0
    for parameter in list(tiny_model.parameters()) + loss.own_parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    own_before = torch.cat([p.grad.flatten() for p in loss.own_parameters()]).norm()
    callback.on_pre_optimizer_step(None, None, None, model=tiny_model)
    grads = [p.grad.flatten() for p in list(tiny_model.parameters()) + loss.own_parameters()]
    assert torch.cat(grads).norm().item() == pytest.approx(1.0, rel=1e-4)
    own_after = torch.cat([p.grad.flatten() for p in loss.own_parameters()]).norm()
    assert own_after < own_before  # the loss's gradients were scaled too


class _GradientReads(TorchDispatchMode):
    """Counts, for each gradient, the operators that take it as an input: the passes over its memory."""

    def __init__(self, parameters):
        super().__init__()
        self.reads = {p.grad.untyped_storage().data_ptr(): 0 for p in parameters}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        touched = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
        }
        for pointer in touched & self.reads.keys():
            self.reads[pointer] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize(("norm", "passes"), [(0.5, 1), (2.0, 2)])
def test_the_finite_check_and_clipping_read_each_gradient_once_plus_the_scaling(tiny_model, norm, passes):
    # One norm pass serves the finite check and the clipping; the scaling pass only runs above the limit.
    loss = RetroMAELoss(tiny_model)
    callback = RetroMAETrainingCallback(loss)
    callback.max_grad_norm = 1.0
    parameters = list(tiny_model.parameters()) + loss.own_parameters()
    value = norm / math.sqrt(sum(p.numel() for p in parameters))  # every gradient element alike
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, value)
    before = [p.grad.clone() for p in parameters]
    with _GradientReads(parameters) as reads:
        callback.on_pre_optimizer_step(None, None, None, model=tiny_model)
    assert set(reads.reads.values()) == {passes}
    if passes == 1:  # below the limit: untouched, bit for bit
        assert all(torch.equal(p.grad, b) for p, b in zip(parameters, before, strict=True))


class _EmbeddingGradientNorms(TorchDispatchMode):
    """Counts the norms taken of the word-embedding table's gradient (the only [V, D] norm in a step)."""

    def __init__(self, parameter: torch.nn.Parameter):
        super().__init__()
        self.parameter, self.count = parameter, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.linalg_vector_norm, torch.ops.aten._foreach_norm):
            grad = self.parameter.grad
            inputs = [leaf for leaf in tree_leaves(args) if isinstance(leaf, torch.Tensor)]
            self.count += grad is not None and any(t.data_ptr() == grad.data_ptr() for t in inputs)
        return func(*args, **(kwargs or {}))


def test_pretrain_reads_the_gradients_for_their_norm_once_a_step_and_logs_that_norm(
    tokenizer, windows, tmp_path
):
    # transformers measures the model's gradient norm every step for its log; pretrain() logs the
    # callback's joint norm instead of measuring a second one.
    model, loss = _fresh(tokenizer, tmp_path / "init")
    table = model[0].auto_model.get_input_embeddings().weight
    with _EmbeddingGradientNorms(table) as norms:
        pretrain(
            model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=3, save_steps=100,
            logging_steps=1, learning_rate=1e-3,
        )  # fmt: skip
    assert norms.count == 3
    logged = json.loads((tmp_path / "run" / "training_log.json").read_text())
    grad_norms = [entry["grad_norm"] for entry in logged if "grad_norm" in entry]
    assert len(grad_norms) == 3 and all(math.isfinite(g) and g > 0 for g in grad_norms)


def _train_clipped(
    trainer_class, tokenizer, windows, folder: Path, callback: bool
) -> SentenceTransformerTrainer:
    model, loss = _fresh(tokenizer, folder / "init")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "out"), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        max_grad_norm=0.05, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=1,
        dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = trainer_class(
        model=model, args=args, train_dataset=windows, loss=loss, data_collator=PaddingCollator(tokenizer),
        callbacks=[RetroMAETrainingCallback(loss)] if callback else None,
    )  # fmt: skip
    trainer.train()
    return trainer


def test_retromae_trainer_adds_the_callback_and_trains_as_the_stock_trainer_with_it(
    tokenizer, windows, tmp_path
):
    stock = _train_clipped(SentenceTransformerTrainer, tokenizer, windows, tmp_path / "stock", callback=True)
    ours = _train_clipped(RetroMAETrainer, tokenizer, windows, tmp_path / "ours", callback=False)
    added = [c for c in ours.callback_handler.callbacks if isinstance(c, RetroMAETrainingCallback)]
    assert added == [ours.retromae_callback]
    for name, value in stock.model.state_dict().items():
        torch.testing.assert_close(ours.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in stock.loss.own_state_dict().items():
        torch.testing.assert_close(ours.loss.own_state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    # Clipping was on (norms above 0.05) and both clip jointly; ours logs the joint norm, the stock trainer
    # the model's alone: never smaller.
    stock_norms = [e["grad_norm"] for e in stock.state.log_history if "grad_norm" in e]
    our_norms = [e["grad_norm"] for e in ours.state.log_history if "grad_norm" in e]
    assert len(our_norms) == len(stock_norms) == 3
    assert all(o > s > 0.05 for o, s in zip(our_norms, stock_norms, strict=True))


def test_a_gradient_whose_norm_overflows_counts_as_non_finite():
    parameter = torch.nn.Parameter(torch.zeros(4))
    parameter.grad = torch.full((4,), 3e38)  # every element finite, the square sum is not
    assert non_finite_gradient([parameter]) == math.inf
    parameter.grad = torch.full((4,), 3e18)
    assert non_finite_gradient([parameter]) is None


def test_resume_without_decoder_weights_is_refused(tiny_model, tmp_path):
    loss = RetroMAELoss(tiny_model)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        loss.load_own_weights(tmp_path)
    loss.save_own_weights(tmp_path)
    other = RetroMAELoss(tiny_model, decoder_layers=2)
    with pytest.raises(ValueError, match="does not match"):
        other.load_own_weights(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["windows", "raw"])
def test_torchrun_two_processes_end_identical(tmp_path, data):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = launcher_env(tmp_path)
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(Path(__file__).parent / "workers" / "ddp_pretrain.py"), str(tmp_path), data],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    init = load_file(str(tmp_path / "init0" / "model.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert any(key.startswith("loss.decoder.") for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # and training did move the weights (identical because synchronised, not because untouched)
    moved = [k for k in init if not torch.equal(init[k], rank0["model.0.model." + k])]
    assert moved
    if data == "raw":  # mixed-length batches were run as several length groups, and DDP still agreed
        assert any(int(n) > 1 for n in (tmp_path / "groups0.txt").read_text().split())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"save_steps": 0}, "save_steps=0"),
        ({"logging_steps": 0}, "logging_steps=0"),
        ({"bf16": True, "fp16": True}, "bf16 and fp16"),
        ({"loss_kwargs": {"max_length_groups": 0}}, "max_length_groups=0"),
    ],
)
def test_pretrain_refuses_bad_options_before_any_work(tiny_model, windows, tmp_path, options, expected):
    # save_steps=0 used to be accepted by the trainer, which then trained without ever checkpointing.
    with pytest.raises(UserInputError, match=expected):
        pretrain(tiny_model, windows, tmp_path / "out", max_steps=1, **options)
    assert not (tmp_path / "out").exists()

"""Trainer glue for a loss that owns weights: checkpoints, resume, clipping and multi-process sync.

The stock ``SentenceTransformerTrainer`` checkpoints, clips and (under DDP) averages the gradients of the
*model's* parameters only. :class:`RetroMAETrainingCallback` does the same for the parameters the
:class:`~retromae_st.pretraining.loss.RetroMAELoss` owns (decoder, head transform, bias):

- it writes them as safetensors beside every trainer checkpoint, and restores them on resume;
- it averages their gradients across processes before each optimizer step (so all ranks stay equal);
- it clips model and loss gradients together, by their joint norm, as one model would be clipped;
- on logging steps it has the loss measure ``h_gain`` and ``embedding_cosine``
  (:mod:`retromae_st.pretraining.diagnostics`) and adds them to the log, warning once when h_gain stays
  near 0; during the loss's head warm-up it keeps every gradient off the encoder.

:func:`pretrain` wires all of it (collator, length-grouped batches, callback, resume, atomic final
save) into one call; it is what the CLI and recipes use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from retromae_st.allocator import log_allocator
from retromae_st.errors import NonFiniteLossError, UserInputError
from retromae_st.io import atomic_dir, atomic_write_json, make_readable
from retromae_st.models import pooling_mode
from retromae_st.pretraining.curriculum import MaskRatioCurriculum
from retromae_st.pretraining.diagnostics import (
    EMBEDDING_COSINE,
    H_GAIN,
    h_gain_stalled,
    is_logging_step,
    stalled_message,
)
from retromae_st.pretraining.loss import LOSS_WEIGHTS_NAME, RetroMAELoss, check_loss_options

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
DECODER = "decoder"
TRAINING_LOG = "training_log.json"
# Written last into a checkpoint, once its weights are known to be finite: the completeness mark. The trainer
# writes trainer_state.json in place (a crash can leave half of it), so it cannot be the mark itself.
CHECKPOINT_MARK = "retromae_st_checkpoint.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launcher_args(bf16: bool = False) -> dict[str, Any]:
    """Training arguments that make ``torchrun`` / ``accelerate launch`` and ``bf16`` work on CPU-only machines.

    Without ``use_cpu=True`` the transformers trainer does not set up DDP on a machine without an
    accelerator, and each process would silently train its own model; and it refuses ``bf16=True``
    outright (CPU autocast runs it: see :func:`retromae_st.precision.bf16_args`, which also warns when the
    CPU lacks native bf16). Single-process runs otherwise keep the trainer's own device choice (CUDA or MPS).
    """
    from retromae_st.precision import bf16_args

    args = bf16_args(bf16)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        args["use_cpu"] = True
    return args


def pin_memory_args() -> dict[str, Any]:
    """``dataloader_pin_memory=False`` on a machine without an accelerator: pinned memory only speeds up
    copies to a device, and torch warns once per data loader that it is unused."""
    return {} if torch.accelerator.is_available() else {"dataloader_pin_memory": False}


# -- finite weights and sealed checkpoints ----------------------------------------------------------------

NON_FINITE_CAUSES = (
    "Usual causes: a learning rate that is too high (lower it or add warmup), fp16 overflow (use bf16 or "
    "fp32), or corrupt input."
)


def gradient_norm(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor | None:
    """The total 2-norm of the parameters' gradients, as one tensor (None when none has a gradient).

    One pass over the gradients, the one clipping needs anyway: the norm is NaN or infinite exactly when an
    element is, or when the gradient is so large (a norm beyond ~1.8e19 in fp32) that its square sum
    overflows, which is a diverged step too. On a CPU the 2-norm is cheap (0.03 s for BERT-base's 110M
    gradients on 2 cores) where a max-norm (``torch._foreach_norm(grads, inf)``) takes 0.19 s.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, 2.0)


def non_finite_gradient(parameters: Sequence[torch.nn.Parameter]) -> float | None:
    """The total gradient norm when it is NaN or infinite, else None (one fused 2-norm, one host sync).

    A finite loss can still have an infinite gradient (an overflow in backward); clipping then turns it
    into NaN, and the optimizer would write NaN weights that the next checkpoint saves.
    """
    norm = gradient_norm(parameters)
    value = None if norm is None else norm.item()
    return None if value is None or math.isfinite(value) else value


def first_non_finite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or infinite value, else None (one fused check)."""
    tensors = [t.detach() for _, t in named if t.is_floating_point()]
    if not tensors:
        return None
    norms = torch._foreach_norm(tensors, math.inf)  # NaN/inf exactly when an element is; never overflows
    finite = torch.isfinite(torch.stack([n.float().cpu() for n in norms]))
    if bool(finite.all()):
        return None
    names = [name for name, t in named if t.is_floating_point()]
    return names[int((~finite).nonzero()[0])]


def unseal_checkpoint(folder: str | os.PathLike) -> None:
    """Remove the mark of a checkpoint folder that is about to be written again (it is not complete now)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(folder) / CHECKPOINT_MARK).unlink()


def seal_checkpoint(folder: str | os.PathLike, named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
    """Mark a fully written checkpoint complete, or remove it and stop when its weights are not finite.

    A checkpoint with NaN weights would be resumed from by every later run, which would then fail again;
    so it is never kept. Call on every rank (all hold the same weights, so all stop together); only the
    main process touches the folder.
    """
    folder = Path(folder)
    bad = first_non_finite(named)
    main = not _distributed() or dist.get_rank() == 0
    if bad is not None:
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        raise NonFiniteLossError(
            f"the weights became non-finite ({bad}) at step {step} although the loss was finite; that "
            f"checkpoint was not kept, so the last checkpoint is intact. {NON_FINITE_CAUSES}"
        )
    if main and folder.is_dir():
        make_readable(folder)  # the trainer's safetensors files are 0600 whatever the umask
        atomic_write_json(folder / CHECKPOINT_MARK, {"global_step": step, "finite": True})


def name_last_checkpoint(message: str, checkpoint_dir: str | os.PathLike, required: Sequence[str]) -> str:
    """Replace "the last checkpoint is intact" by the name of the checkpoint a re-run resumes from."""
    last = last_complete_checkpoint(checkpoint_dir, required)
    where = (
        f"the last finite checkpoint, {last}, is intact and running the same command again resumes from it"
        if last is not None
        else "no checkpoint had been written yet, so running the command again starts from scratch"
    )
    return message.replace("the last checkpoint is intact", where)


class RetroMAETrainingCallback(TrainerCallback):
    """Checkpoint, restore, synchronise and clip the weights a :class:`RetroMAELoss` owns.

    Args:
        loss: the loss given to the trainer.
        resume_from_checkpoint: the checkpoint folder the trainer resumes from, when it is not the
            trainer's own ``output_dir/checkpoint-<step>`` (the default place this callback looks).
    """

    def __init__(self, loss: RetroMAELoss, resume_from_checkpoint: str | os.PathLike | None = None) -> None:
        self.loss = loss
        self.resume_from_checkpoint = resume_from_checkpoint
        self.max_grad_norm = 0.0
        self.gradients_prepared = False  # prepare_gradients ran since the last optimizer step
        self.h_gains: list[float] = []  # every logged h_gain, for the stalled-h warning
        self.warned_h_gain = False
        loss.callback_attached = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Take over gradient clipping: the trainer would clip the model's gradients by their own norm
        # before we see them, so the loss's gradients could not share one joint norm. Restored at the end.
        self.max_grad_norm = args.max_grad_norm
        args.max_grad_norm = 0.0
        self.loss.fit_head_warmup(state.max_steps)
        if state.global_step > 0:
            folder = self.resume_from_checkpoint or os.path.join(
                args.output_dir, f"checkpoint-{state.global_step}"
            )
            self.loss.load_own_weights(folder)
            logger.info("Restored the RetroMAE decoder and head from %s", folder)
        if _distributed():
            # Every rank must start from rank 0's decoder, whatever seed each process used.
            for parameter in self.loss.own_parameters():
                dist.broadcast(parameter.data, src=0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.loss.current_step = state.global_step + 1
        # Diagnostics cost a decoder pass without gradients: only on the steps the trainer logs.
        if args.logging_strategy == "steps" and is_logging_step(
            state.global_step + 1, int(state.logging_steps or args.logging_steps), args.logging_first_step
        ):
            self.loss.request_diagnostics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        diagnostics, self.loss.last_diagnostics = self.loss.last_diagnostics, None
        if not diagnostics or logs is None or "loss" not in logs:
            return
        # The trainer appended this log to log_history before calling us: complete that entry too.
        logs.update(diagnostics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(diagnostics)
        # The trainer printed this log before us (its own callbacks come first): print them beside it.
        logger.info(
            "step %d: h_gain %.4f nats, embedding_cosine %.4f",
            state.global_step,
            diagnostics[H_GAIN],
            diagnostics[EMBEDDING_COSINE],
        )
        self.h_gains.append(diagnostics[H_GAIN])
        if not self.warned_h_gain and h_gain_stalled(self.h_gains, state.global_step, state.max_steps):
            self.warned_h_gain = True
            logger.warning(
                stalled_message(
                    diagnostics[H_GAIN],
                    diagnostics.get(EMBEDDING_COSINE),
                    state.global_step,
                    state.max_steps,
                    pooling=self.loss.pooling_mode(),
                )
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients_prepared:
            self.prepare_gradients(args, state, model)
        self.gradients_prepared = False  # the next step's gradients are its own

    def prepare_gradients(self, args, state, model) -> torch.Tensor | None:
        """Ready this step's gradients for the optimizer; return their joint norm before clipping.

        Keeps the encoder's gradients off during the head warm-up, averages the loss's gradients across
        processes, stops on a non-finite gradient and clips model and loss gradients by their joint norm:
        one pass over the gradients for the norm, a second only when clipping scales them.
        :class:`~retromae_st.pretraining.trainer.RetroMAETrainer` calls it where the trainer would measure the
        norm for its log; otherwise :meth:`on_pre_optimizer_step` does, once a step either way.
        """
        self.gradients_prepared = True
        step = state.global_step + 1 if state is not None else self.loss.current_step
        if model is not None and self.loss.encoder_frozen(step):
            # Head warm-up: the loss ran the encoder without a graph; its embedding layer may still hold a
            # gradient from the query stream, which must not move it either (AdamW skips grad-less weights).
            for parameter in model.parameters():
                parameter.grad = None
        own = [p for p in self.loss.own_parameters() if p.grad is not None]
        if _distributed() and own:
            # DDP averages the model's gradients during backward; the loss's live outside DDP.
            grads = [p.grad for p in own]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        parameters = [p for p in model.parameters() if p.grad is not None] if model is not None else []
        # One norm pass serves both the finite check and the clipping (the gradients are read once).
        norm = gradient_norm(parameters + own)
        if norm is None:
            return None
        value = norm.item()
        # Under fp16 an infinite gradient is routine: the grad scaler skips that step and lowers its scale.
        if not math.isfinite(value) and not getattr(args, "fp16", False):
            raise NonFiniteLossError(
                f"the gradient became {value} at step {step} although the RetroMAE loss was finite; "
                "training stopped before applying it, so the last checkpoint is intact. "
                f"{NON_FINITE_CAUSES}"
            )
        # torch's clipping multiplies every gradient by min(1, max_norm / (norm + 1e-6)): a pass over them
        # all even when the factor is 1, which this skips.
        if self.max_grad_norm and self.max_grad_norm > 0 and not value + 1e-6 <= self.max_grad_norm:
            # Under fp16 the trainer has already unscaled every gradient of the optimizer (model and loss
            # alike) when it measured the gradient norm just before this hook, so these are true values.
            torch.nn.utils.clip_grads_with_norm_(parameters + own, self.max_grad_norm, norm)
        return norm

    def on_step_end(self, args, state, control, **kwargs):
        # A checkpoint folder about to be saved again (a resumed run re-reaching a step) is not complete
        # until it is sealed anew.
        if state.is_world_process_zero:
            unseal_checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero:
            self.loss.save_own_weights(folder)
        named = list(model.named_parameters()) if model is not None else []
        named += [(f"loss.{name}", p) for name, p in self.loss.own_named_parameters()]
        seal_checkpoint(folder, named, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self.max_grad_norm
        self.loss.current_step = None


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(folder: str | os.PathLike, required: Sequence[str] = (TRAINER_STATE,)) -> list[Path]:
    """Checkpoint folders under ``folder`` that are complete, oldest first.

    Complete means: every ``required`` file is there and the checkpoint is sealed (:data:`CHECKPOINT_MARK`,
    written last, once its weights are known to be finite); a checkpoint cut short by a crash is passed
    over. Folders written before the seal existed (no checkpoint in ``folder`` has one) count when their
    ``trainer_state.json`` is whole JSON, as the trainer writes it last.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and all((child / name).is_file() for name in required):
            candidates.append((int(match.group(1)), child))
    sealed = [(step, path) for step, path in candidates if (path / CHECKPOINT_MARK).is_file()]
    if not sealed and not any((child / CHECKPOINT_MARK).is_file() for _, child in _all_checkpoints(folder)):
        sealed = [(step, path) for step, path in candidates if _whole_json(path / TRAINER_STATE)]
    return [path for _, path in sorted(sealed)]


def _all_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    return [
        (int(match.group(1)), child)
        for child in folder.iterdir()
        if (match := _CHECKPOINT.match(child.name)) and child.is_dir()
    ]


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _finite_weights(checkpoint: Path) -> bool:
    """Whether every safetensors file of an unsealed (older) checkpoint holds only finite values."""
    from safetensors.torch import load_file

    for path in sorted(checkpoint.rglob("*.safetensors")):
        if first_non_finite(list(load_file(str(path)).items())) is not None:
            return False
    return True


def last_complete_checkpoint(
    folder: str | os.PathLike, required: Sequence[str] = (TRAINER_STATE,)
) -> Path | None:
    """The newest complete checkpoint whose weights are finite (the one to resume from), or None.

    A sealed checkpoint was checked when it was written; an unsealed one (written before the seal existed)
    is read and checked here, and passed over with a warning when it holds NaN or infinite weights, so
    a run that saved broken weights resumes from the last good checkpoint instead of failing again.
    """
    for checkpoint in reversed(complete_checkpoints(folder, required)):
        if (checkpoint / CHECKPOINT_MARK).is_file() or _finite_weights(checkpoint):
            return checkpoint
        logger.warning("%s holds NaN or infinite weights: not resumed from.", checkpoint)
    return None


def check_pretrain_options(
    *,
    loss_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    gradient_accumulation_steps: int = 1,
    save_steps: int = 500,
    logging_steps: int = 10,
    bf16: bool = False,
    fp16: bool = False,
    dataloader_num_workers: int = 0,
    hidden_size: int | None = None,
) -> None:
    """Refuse bad stage-1 options before any work: :func:`pretrain` calls it first, and the CLI and the
    pipeline call it before reading and tokenising the corpus (minutes on a big one), so a typo in an
    option never costs that time. ``loss_kwargs`` are :class:`RetroMAELoss`'s options; ``hidden_size`` (when
    known) lets ``decoder_heads`` be checked too.

    Raises:
        UserInputError: naming the option, its value and what it must be.
    """
    check_loss_options(**(loss_kwargs or {}), hidden_size=hidden_size)
    for name, value in (
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("save_steps", save_steps),
        ("logging_steps", logging_steps),
    ):
        # save_steps=0 is accepted by the trainer and then never checkpoints (so nothing can resume).
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name}={value!r}: use a whole number >= 1.")
    if not learning_rate > 0:
        raise UserInputError(f"learning_rate={learning_rate!r}: use a positive learning rate.")
    if max_steps <= 0 and not num_train_epochs > 0:
        raise UserInputError("neither max_steps nor epochs is positive: the run would train nothing.")
    if not 0 <= warmup_ratio < 1:
        raise UserInputError(f"warmup_ratio={warmup_ratio!r}: use a share of the steps, 0 <= ratio < 1.")
    for name, value in (("weight_decay", weight_decay), ("max_grad_norm", max_grad_norm)):
        if not value >= 0:
            raise UserInputError(f"{name}={value!r}: use a number >= 0.")
    if dataloader_num_workers < 0:
        raise UserInputError(f"dataloader_num_workers={dataloader_num_workers!r}: use 0 or more workers.")
    if bf16 and fp16:
        raise UserInputError("bf16 and fp16 are both on: choose one mixed precision.")


# The loss's own weights inside the loss module: everything but the encoder (its attribute ``model``).
OWN_WEIGHTS_PATTERN = r"^(?!model\.)"


def head_learning_rate_args(loss: RetroMAELoss, learning_rate: float) -> dict[str, Any]:
    """Training arguments that give the loss's own weights (decoder, head) ``head_lr_factor`` x the rate."""
    factor = getattr(loss, "head_lr_factor", 1.0)
    if factor == 1.0 or not loss.own_parameters():
        return {}
    logger.info(
        "RetroMAE: the decoder and MLM head train at %g x the learning rate (%g; head_lr_factor).",
        factor,
        learning_rate * factor,
    )
    return {"learning_rate_mapping": {OWN_WEIGHTS_PATTERN: learning_rate * factor}}


def pretrain(
    model: SentenceTransformer,
    train_dataset: Dataset,
    output_dir: str | os.PathLike,
    *,
    loss: RetroMAELoss | None = None,
    loss_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    gradient_accumulation_steps: int = 1,
    save_steps: int = 500,
    save_total_limit: int = 2,
    logging_steps: int = 10,
    seed: int = 42,
    bf16: bool = False,
    fp16: bool = False,
    gradient_checkpointing: bool = False,
    dataloader_num_workers: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    extra_args: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Stage 1: RetroMAE pretraining with the stock trainer, resumable, written atomically.

    ``train_dataset`` holds either pre-tokenised windows (an ``input_ids`` column, as produced by
    :func:`retromae_st.data.tokenize.tokenize_corpus`: padded per batch by a collator, batches grouped by length)
    or a single text column (tokenised by the trainer's own collator).

    Layout of ``output_dir``: ``checkpoints/checkpoint-<step>/`` (trainer checkpoints, each with the
    decoder's ``retromae_loss.safetensors``), then at the end ``final/`` (the plain Sentence-Transformers
    model), ``decoder/retromae_loss.safetensors`` (the decoder and head, to continue pretraining later) and
    ``training_log.json`` (the trainer's log history: each loss component over steps).

    Re-running the same call after an interruption resumes from the last complete checkpoint. A finished
    ``final/`` is never replaced unless ``overwrite=True``.
    """
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from retromae_st.pretraining.trainer import RetroMAETrainer

    check_pretrain_options(
        loss_kwargs=loss_kwargs if loss is None else None, batch_size=batch_size, learning_rate=learning_rate,
        num_train_epochs=num_train_epochs, max_steps=max_steps, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=gradient_accumulation_steps, save_steps=save_steps,
        logging_steps=logging_steps, bf16=bf16, fp16=fp16, dataloader_num_workers=dataloader_num_workers,
    )  # fmt: skip
    output_dir = Path(output_dir)
    final_dir = output_dir / FINAL
    checkpoint_dir = output_dir / CHECKPOINTS
    if overwrite:
        for stale in (final_dir, checkpoint_dir, output_dir / DECODER):
            shutil.rmtree(stale, ignore_errors=True)
    elif final_dir.exists():
        raise UserInputError(f"{final_dir} already exists: choose another output folder or pass --overwrite.")
    if len(train_dataset) == 0:
        raise UserInputError("the pretraining dataset is empty: nothing to train on.")

    if loss is None:
        # The decoder's initial weights follow the run's seed, not whatever the process drew before.
        torch.manual_seed(seed)
        loss = RetroMAELoss(model, **(loss_kwargs or {}))
    extra_args = {**head_learning_rate_args(loss, learning_rate), **(extra_args or {})}
    if gradient_checkpointing:
        encoder = model[0].auto_model
        # transformers 5.x renamed it (the old name warns and goes away in 6); early 5.x has only the old one.
        enable = (
            getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
        )
        enable()
    resume_from = (
        last_complete_checkpoint(checkpoint_dir, (TRAINER_STATE, LOSS_WEIGHTS_NAME)) if resume else None
    )
    if resume_from is None and checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        if not resume:
            raise UserInputError(
                f"{checkpoint_dir} holds checkpoints of an earlier run: resume, or pass --overwrite."
            )
        logger.warning("No complete checkpoint in %s; starting from scratch.", checkpoint_dir)

    collator, sampler = None, None
    if "input_ids" in train_dataset.column_names:
        from retromae_st.data.batching import LengthGroupedBatchSampler, PaddingCollator

        collator = PaddingCollator(model.tokenizer)
        sampler = LengthGroupedBatchSampler
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        warmup_steps=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=gradient_accumulation_steps,
        save_strategy="steps",
        save_steps=save_steps,
        # Keep at least one older checkpoint, in case the newest is cut short by a crash.
        save_total_limit=max(save_total_limit, 2),
        logging_steps=logging_steps,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=fp16,
        dataloader_num_workers=dataloader_num_workers,
        report_to="none",
        remove_unused_columns=False,
        **({"batch_sampler": sampler} if sampler is not None else {}),
        **launcher_args(bf16=bf16),
        # extra_args may set dataloader_pin_memory itself: it wins.
        **(pin_memory_args() | (extra_args or {})),
    )
    callback = RetroMAETrainingCallback(loss, resume_from_checkpoint=resume_from)
    curriculum = MaskRatioCurriculum.from_loss(loss)
    if curriculum is not None and not any(isinstance(c, MaskRatioCurriculum) for c in callbacks):
        # The loss's own curriculum options (it reads its knobs at every forward; the callback sets them).
        callbacks = [curriculum, *callbacks]
    trainer = RetroMAETrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        data_collator=collator,
        callbacks=[callback, *callbacks],
    )
    world = args.world_size
    logger.info(
        "RetroMAE pretraining: %d examples, effective batch size %d (%d per device x %d accumulation x %d "
        "processes), max_seq_length %d; the model (and %s) pools by %s",
        len(train_dataset),
        batch_size * gradient_accumulation_steps * world,
        batch_size,
        gradient_accumulation_steps,
        world,
        model.max_seq_length,
        final_dir,
        pooling_mode(model) or "its own modules (no Pooling module)",
    )
    if trainer.is_world_process_zero():
        log_allocator(args.device.type)
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except NonFiniteLossError as error:
        required = (TRAINER_STATE, LOSS_WEIGHTS_NAME)
        raise NonFiniteLossError(name_last_checkpoint(str(error), checkpoint_dir, required)) from error

    if trainer.is_world_process_zero():
        save_pretrained_outputs(model, loss, trainer.state.log_history, output_dir)
    return model


def save_pretrained_outputs(
    model: SentenceTransformer, loss: RetroMAELoss, log_history: list[dict], output_dir: str | os.PathLike
) -> None:
    """Write ``final/`` (model), ``decoder/`` (loss weights) and ``training_log.json``, each atomically.

    The decoder and log go first: ``final/`` appearing is what marks the stage complete.
    """
    output_dir = Path(output_dir)
    with atomic_dir(output_dir / DECODER, overwrite=True) as tmp:
        loss.save_own_weights(tmp)
        atomic_write_json(tmp / "config.json", loss.get_config_dict())
    atomic_write_json(output_dir / TRAINING_LOG, log_history)
    with atomic_dir(output_dir / FINAL, overwrite=False) as tmp:
        model.save_pretrained(str(tmp))
    logger.info("Saved the pretrained model to %s", output_dir / FINAL)


def read_training_log(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / TRAINING_LOG
    return json.loads(path.read_text()) if path.is_file() else []

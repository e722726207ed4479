"""Trainer glue for a loss that owns weights: checkpoints, resume, clipping and multi-process sync.

The stock ``SentenceTransformerTrainer`` checkpoints, clips and (under DDP) averages the gradients of the
*model's* parameters only. :class:`RetroMAETrainingCallback` does the same for the parameters the
:class:`~retromae_st.pretraining.loss.RetroMAELoss` owns (decoder, head transform, bias):

- it writes them as safetensors beside every trainer checkpoint, and restores them on resume;
- it averages their gradients across processes before each optimizer step (so all ranks stay equal);
- it clips model and loss gradients together, by their joint norm, as one model would be clipped.

:func:`pretrain` wires all of it (collator, length-grouped batches, callback, resume, atomic final
save) into one call; it is what the CLI and recipes use.
"""

from __future__ import annotations

import json
import logging
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

from retromae_st.errors import UserInputError
from retromae_st.io import atomic_dir, atomic_write_json
from retromae_st.pretraining.loss import LOSS_WEIGHTS_NAME, RetroMAELoss

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
DECODER = "decoder"
TRAINING_LOG = "training_log.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launcher_args() -> dict[str, Any]:
    """Training arguments that make ``torchrun`` / ``accelerate launch`` work on CPU-only machines.

    Without ``use_cpu=True`` the transformers trainer does not set up DDP on a machine without an
    accelerator, and each process would silently train its own model. Single-process runs keep the
    trainer's own device choice (CUDA or MPS).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {"use_cpu": True} if launched and not torch.cuda.is_available() else {}


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
        loss.callback_attached = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Take over gradient clipping: the trainer would clip the model's gradients by their own norm
        # before we see them, so the loss's gradients could not share one joint norm. Restored at the end.
        self.max_grad_norm = args.max_grad_norm
        args.max_grad_norm = 0.0
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

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
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
        if self.max_grad_norm and self.max_grad_norm > 0:
            # Under fp16 the trainer has already unscaled every gradient of the optimizer (model and loss
            # alike) when it measured the gradient norm just before this hook, so these are true values.
            parameters = [p for p in model.parameters() if p.grad is not None] if model is not None else []
            torch.nn.utils.clip_grad_norm_(parameters + own, self.max_grad_norm)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.loss.save_own_weights(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self.max_grad_norm
        self.loss.current_step = None


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(folder: str | os.PathLike, required: Sequence[str] = (TRAINER_STATE,)) -> list[Path]:
    """Checkpoint folders under ``folder`` that hold every ``required`` file, oldest first.

    The trainer writes ``trainer_state.json`` last, and the callback writes the loss's weights after it;
    a checkpoint cut short by a crash lacks one of them and is passed over.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and all((child / name).is_file() for name in required):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(
    folder: str | os.PathLike, required: Sequence[str] = (TRAINER_STATE,)
) -> Path | None:
    checkpoints = complete_checkpoints(folder, required)
    return checkpoints[-1] if checkpoints else None


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
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

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
    if gradient_checkpointing:
        model[0].auto_model.gradient_checkpointing_enable()
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
        **launcher_args(),
        **(extra_args or {}),
    )
    callback = RetroMAETrainingCallback(loss, resume_from_checkpoint=resume_from)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        data_collator=collator,
        callbacks=[callback, *callbacks],
    )
    world = args.world_size
    logger.info(
        "RetroMAE pretraining: %d examples, effective batch size %d (%d per device x %d accumulation x %d processes)",
        len(train_dataset),
        batch_size * gradient_accumulation_steps * world,
        batch_size,
        gradient_accumulation_steps,
        world,
    )
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)

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

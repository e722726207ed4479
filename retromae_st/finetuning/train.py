"""Stage 2: contrastive fine-tuning of a (RetroMAE-pretrained) Sentence-Transformers model.

The training loop is the stock ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (or its
GradCache variant ``CachedMultipleNegativesRankingLoss`` for batches larger than memory allows),
``NO_DUPLICATES`` batches (a text that appears twice in a batch would be its own "negative"), an
``InformationRetrievalEvaluator`` on a dev split that picks the best checkpoint, and resumption from the
last checkpoint of an interrupted run. What this module adds is the plumbing around it: reading
(query, positive[, negatives]) data from BEIR qrels, pair files or the hub with clear errors, a corpus
subset for a fast dev evaluator, hard-negative mining defaults, an atomic final folder with the training
log, and a model card that also describes stage 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import (
    BatchSamplers,
    SentenceTransformerTrainingArguments,
)
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from retromae_st.allocator import log_allocator
from retromae_st.errors import NonFiniteLossError, UserInputError
from retromae_st.finetuning.model_card import fill_card_data, save_final
from retromae_st.io import ensure_can_write
from retromae_st.pretraining.training import (
    NON_FINITE_CAUSES,
    TRAINER_STATE,
    launcher_args,
    name_last_checkpoint,
    non_finite_gradient,
    pin_memory_args,
    seal_checkpoint,
    unseal_checkpoint,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class _EffectiveBatchLogger(TrainerCallback):
    """Logs the effective batch and the number of in-batch negatives once training starts."""

    def __init__(self, loss_name: str, mini_batch_size: int | None) -> None:
        self.loss_name = loss_name
        self.mini_batch_size = mini_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            log_allocator(args.device.type)
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        extra = f", GradCache mini-batches of {self.mini_batch_size}" if self.mini_batch_size else ""
        logger.info(
            "Effective batch size %d (%d per device x %d gradient accumulation x %d processes); %s sees %d "
            "in-batch candidates per query%s; %d optimizer steps, from step %d.",
            effective,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.world_size,
            self.loss_name,
            args.per_device_train_batch_size,
            extra,
            state.max_steps,
            state.global_step,
        )


class _NonFiniteLossGuard(TrainerCallback):
    """Stops training with :class:`NonFiniteLossError` when the loss is NaN or infinite.

    A forward hook on the loss checks each training loss as it is computed, so the error is raised before
    the backward pass and the optimizer step: the last checkpoint keeps the last good weights.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.name = type(loss).__name__
        self.step: int | None = None
        loss.register_forward_hook(self._check)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        self.step = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # A finite loss can still back-propagate an infinite gradient, which clipping turns into NaN weights;
        # under fp16 the grad scaler skips such steps itself.
        if model is None or getattr(args, "fp16", False):
            return
        bad = non_finite_gradient(list(model.parameters()))
        if bad is not None:
            raise NonFiniteLossError(
                f"the gradient became {bad} at step {state.global_step + 1} although the {self.name} loss "
                "was finite; training stopped before applying it, so the last checkpoint is intact. "
                f"{NON_FINITE_CAUSES}"
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a folder about to be saved again is not complete until resealed
            unseal_checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        seal_checkpoint(
            folder, list(model.named_parameters()) if model is not None else [], state.global_step
        )

    def _check(self, module, inputs, output):
        if self.step is None or not torch.is_grad_enabled():
            return  # outside training (evaluation loss): not our business
        values = output.values() if isinstance(output, dict) else [output]
        for value in values:
            if isinstance(value, torch.Tensor) and not torch.isfinite(value.detach()).all():
                bad = value.detach()[~torch.isfinite(value.detach())].reshape(-1)[0].item()
                raise NonFiniteLossError(
                    f"the {self.name} loss became {bad} at step {self.step}; training stopped before applying "
                    "it, so the last checkpoint is intact. Usual causes: a learning rate that is too high (lower "
                    "it or add warmup), fp16 overflow (use bf16 or fp32), or corrupt input."
                )


def build_loss(
    model: SentenceTransformer, loss: str = "mnrl", *, scale: float = 20.0, mini_batch_size: int = 32
) -> nn.Module:
    """``mnrl`` -> ``MultipleNegativesRankingLoss``; ``cached_mnrl`` -> ``CachedMultipleNegativesRankingLoss``.

    Gradient accumulation does not add in-batch negatives (each micro-batch is its own softmax); the
    cached loss does: it embeds the whole batch in ``mini_batch_size`` chunks without keeping the graph,
    so batches of thousands fit in the memory of ``mini_batch_size``.
    """
    if loss == "mnrl":
        return MultipleNegativesRankingLoss(model, scale=scale)
    if loss == "cached_mnrl":
        if mini_batch_size < 1:
            raise UserInputError(f"mini_batch_size={mini_batch_size}: use a positive size.")
        return CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch_size)
    raise UserInputError(f"unknown loss {loss!r}: choose 'mnrl' or 'cached_mnrl'.")


def primary_metric_key(evaluator: BaseEvaluator, model: SentenceTransformer) -> str:
    """The evaluator's primary metric as the trainer logs it (``eval_<name>_<similarity>_ndcg@10``).

    ``InformationRetrievalEvaluator`` only fills ``primary_metric`` on its first call; its value is derived
    here the same way (the model's similarity function, the largest nDCG cut-off) so that no evaluation
    has to run before training. Other evaluators are run once when they do not declare it.
    """
    metric = evaluator.primary_metric
    if not metric and isinstance(evaluator, InformationRetrievalEvaluator):
        if evaluator.main_score_function is not None:
            function = evaluator.main_score_function.value
        elif evaluator.score_function_names and len(evaluator.score_function_names) == 1:
            function = evaluator.score_function_names[0]
        else:
            function = model.similarity_fn_name or "cosine"
        metric = f"{function}_ndcg@{max(evaluator.ndcg_at_k)}"
        if evaluator.name:
            metric = f"{evaluator.name}_{metric}"
    elif not metric:
        logger.info("Running the evaluator once to learn its primary metric.")
        evaluator(model)
        metric = evaluator.primary_metric
        if not metric:
            raise UserInputError(
                f"{type(evaluator).__name__} declares no primary_metric to select checkpoints with."
            )
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def finetune(
    model: SentenceTransformer,
    train_pairs: Dataset,
    output_dir: str | os.PathLike,
    *,
    evaluator: BaseEvaluator | None = None,
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl",
    mini_batch_size: int = 32,
    batch_size: int = 64,
    learning_rate: float = 2e-5,
    epochs: float = 1,
    max_steps: int = -1,
    warmup_ratio: float = 0.1,
    scale: float = 20.0,
    eval_steps: int | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    bf16: bool = False,
    gradient_accumulation_steps: int = 1,
    dataloader_num_workers: int = 0,
    dataloader_drop_last: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    extra_args: dict[str, Any] | None = None,
    train_dataset_name: str | None = None,
    stage1_info: dict[str, Any] | None = None,
    language: str | list[str] | None = None,
    started_from: str | None = None,
) -> SentenceTransformer:
    """Fine-tune ``model`` on (anchor, positive[, negative_1...]) rows and save it to ``output_dir/final``.

    * Checkpoints go to ``output_dir/checkpoints``. With ``resume`` (the default) a run that finds one there
      continues from the last (optimizer, scheduler, RNG and data position included) instead of starting
      over; with ``resume=False`` existing checkpoints are an error unless ``overwrite``.
    * With an ``evaluator`` the model is evaluated every ``eval_steps`` (default ``save_steps``) and at the
      end, a checkpoint is saved at each evaluation, and the best one by the evaluator's primary metric is
      what ends up in ``final`` (``load_best_model_at_end``). ``save_total_limit`` never deletes the best.
    * ``final`` is written atomically: the model (loadable with ``SentenceTransformer(path)``), its model
      card (README.md: datasets, loss, metrics, and stage 1 when ``stage1_info`` is given) and
      ``training_log.json`` (the trainer's ``log_history`` plus the best checkpoint and metric, and
      ``started_from``: where the starting weights came from, as the caller names them).
    * ``extra_args`` are passed on to ``SentenceTransformerTrainingArguments`` and win over the above.

    Returns the fine-tuned model (the best checkpoint's weights when an evaluator is given).
    """
    output_dir = Path(output_dir)
    final_dir, checkpoint_dir = output_dir / "final", output_dir / "checkpoints"
    _check_training_options(train_pairs)
    check_finetune_options(
        batch_size=batch_size, save_steps=save_steps, eval_steps=eval_steps, has_evaluator=evaluator is not None,
        max_steps=max_steps, epochs=epochs, logging_steps=logging_steps,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        mini_batch_size=mini_batch_size,
    )  # fmt: skip
    ensure_can_write(final_dir, overwrite)
    last_checkpoint = _last_checkpoint(checkpoint_dir, resume, overwrite)
    fill_card_data(model, train_pairs, train_dataset_name, stage1_info, language)

    loss_module = build_loss(model, loss, scale=scale, mini_batch_size=mini_batch_size)
    eval_steps = eval_steps or save_steps
    metric = primary_metric_key(evaluator, model) if evaluator is not None else None
    arguments: dict[str, Any] = {
        "output_dir": str(checkpoint_dir),
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate,
        # transformers 5 takes a float in [0, 1) in warmup_steps as the warmup ratio.
        "warmup_steps": float(warmup_ratio) if 0 < warmup_ratio < 1 else int(warmup_ratio),
        "bf16": bf16,
        "batch_sampler": BatchSamplers.NO_DUPLICATES,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "logging_steps": logging_steps,
        "logging_first_step": True,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": dataloader_num_workers,
        "dataloader_drop_last": dataloader_drop_last,
        "report_to": "none",
        # On CPU-only machines the trainer needs use_cpu=True to set up DDP (torchrun) and to run bf16.
        **launcher_args(bf16=bf16),
        **pin_memory_args(),
    }
    if evaluator is not None:
        arguments |= {
            "eval_strategy": "steps",
            "eval_steps": eval_steps,
            "load_best_model_at_end": True,
            "metric_for_best_model": metric,
            "greater_is_better": getattr(evaluator, "greater_is_better", True),
        }
    arguments |= extra_args or {}
    args = SentenceTransformerTrainingArguments(**arguments)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_pairs,
        loss=loss_module,
        evaluator=evaluator,
        callbacks=[
            _EffectiveBatchLogger(
                type(loss_module).__name__, mini_batch_size if loss == "cached_mnrl" else None
            ),
            _NonFiniteLossGuard(loss_module),
            *callbacks,
        ],
    )
    if last_checkpoint:
        logger.info("Resuming from %s.", last_checkpoint)
    try:
        trainer.train(resume_from_checkpoint=last_checkpoint)
    except NonFiniteLossError as error:
        raise NonFiniteLossError(
            name_last_checkpoint(str(error), checkpoint_dir, (TRAINER_STATE,))
        ) from error
    model = trainer.model
    if trainer.is_world_process_zero():  # one writer: every rank holds the same weights
        save_final(model, trainer, final_dir, overwrite, metric, stage1_info, started_from)
    return model


def _check_training_options(train_pairs: Dataset) -> None:
    if not isinstance(train_pairs, Dataset) or len(train_pairs) == 0:
        raise UserInputError(
            "train_pairs is empty or not a datasets.Dataset: pass the output of load_pairs()."
        )
    if list(train_pairs.column_names[:2]) != ["anchor", "positive"]:
        raise UserInputError(
            f"train_pairs has columns {train_pairs.column_names}; expected anchor, positive[, negative_1...] "
            "(MNRL reads the columns by position): pass the output of load_pairs()."
        )


def check_finetune_options(
    *,
    batch_size: int = 64,
    save_steps: int = 500,
    eval_steps: int | None = None,
    has_evaluator: bool = False,
    max_steps: int = -1,
    epochs: float = 1.0,
    logging_steps: int = 10,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 2e-5,
    mini_batch_size: int = 32,
) -> None:
    """Refuse bad stage-2 options before any work: :func:`finetune` checks them, and the CLI and the
    pipeline call this before loading the model and the pairs (and mining negatives).

    Raises:
        UserInputError: naming the option, its value and what it must be.
    """
    if batch_size < 2:
        raise UserInputError(f"batch_size={batch_size}: in-batch negatives need a batch of at least 2.")
    if save_steps < 1:
        raise UserInputError(f"save_steps={save_steps}: use a positive number of steps.")
    for name, value in (
        ("logging_steps", logging_steps),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("mini_batch_size", mini_batch_size),
    ):
        if value < 1:
            raise UserInputError(f"{name}={value}: use a whole number >= 1.")
    if eval_steps is not None and eval_steps < 1:
        raise UserInputError(f"eval_steps={eval_steps}: use a positive number of steps (or leave it unset).")
    if not learning_rate > 0:
        raise UserInputError(f"learning_rate={learning_rate}: use a positive learning rate.")
    if max_steps <= 0 and epochs <= 0:
        raise UserInputError("neither max_steps nor epochs is positive: the run would train nothing.")
    if has_evaluator and eval_steps is not None and save_steps % eval_steps != 0:
        raise UserInputError(
            f"save_steps={save_steps} is not a multiple of eval_steps={eval_steps}: the best checkpoint can only be "
            "kept if a checkpoint is saved at every evaluation that may be best; make save_steps a multiple."
        )


def _last_checkpoint(checkpoint_dir: Path, resume: bool, overwrite: bool) -> str | None:
    if not checkpoint_dir.is_dir():
        return None
    last = get_last_checkpoint(str(checkpoint_dir))
    if last is None:
        return None
    if resume:
        # A checkpoint cut short by a crash has no trainer_state.json (written last): resume from the one before.
        from retromae_st.pretraining.training import last_complete_checkpoint

        complete = last_complete_checkpoint(checkpoint_dir)
        if complete is None:
            logger.warning("No complete checkpoint in %s; starting from scratch.", checkpoint_dir)
        return str(complete) if complete is not None else None
    if not overwrite:
        raise UserInputError(
            f"{checkpoint_dir} holds checkpoints of an earlier run ({Path(last).name}): resume it (resume=True), "
            "choose another output folder, or pass overwrite=True to start over."
        )
    logger.warning("Starting over: the checkpoints in %s will be replaced.", checkpoint_dir)
    import shutil

    shutil.rmtree(checkpoint_dir)
    return None

"""The end of stage 2: the atomic final folder with its training log, and a model card that also describes
stage 1.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

from retromae_st.io import atomic_dir, atomic_write_json
from retromae_st.pretraining.loss import RETROMAE_CITATION

logger = logging.getLogger(__name__)
TRAINING_LOG = "training_log.json"


def fill_card_data(
    model: SentenceTransformer,
    train_pairs: Dataset,
    train_dataset_name: str | None,
    stage1_info: dict[str, Any] | None,
    language: str | list[str] | None,
) -> None:
    card = model.model_card_data
    name = train_dataset_name or train_pairs.info.dataset_name
    if name:
        # Exactly one entry per training dataset, or the trainer's card callback discards it.
        card.train_datasets = [{"name": name}]
    if language:
        card.set_language(language)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        card.local_files_only = True  # do not look datasets or base models up on the hub
    card.add_tags(["retromae-st"])
    if stage1_info is not None:
        card.add_tags(["retromae"])
    if not card.model_name:
        base = "RetroMAE-pretrained encoder" if stage1_info is not None else "Sentence Transformer"
        card.model_name = f"{base} fine-tuned on {name}" if name else f"{base} fine-tuned with MNRL"


def save_final(
    model: SentenceTransformer,
    trainer: SentenceTransformerTrainer,
    final_dir: Path,
    overwrite: bool,
    metric: str | None,
    stage1_info: dict[str, Any] | None,
    started_from: str | None = None,
) -> None:
    state = trainer.state
    if stage1_info is not None:
        # set_losses() rebuilt the citations during training; RetroMAE is added after it.
        model.model_card_data.citations["RetroMAE"] = RETROMAE_CITATION
    args = trainer.args
    log = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "metric_for_best_model": metric,
        "best_metric": state.best_metric,
        "best_model_checkpoint": Path(state.best_model_checkpoint).name
        if state.best_model_checkpoint
        else None,
        "effective_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "stage1": stage1_info,
        # The model this stage began with (a folder or hub name): tells a stage 2 after RetroMAE from
        # the same stage 2 run without it, whose folders look alike otherwise.
        "started_from": started_from,
        "log_history": state.log_history,
    }
    with atomic_dir(final_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if stage1_info is not None:
            _add_stage1_section(tmp / "README.md", stage1_info)
        atomic_write_json(tmp / TRAINING_LOG, log)
    best = f", best {metric} = {state.best_metric:.4f} at {log['best_model_checkpoint']}" if metric else ""
    logger.info("Saved the fine-tuned model to %s (step %d%s).", final_dir, state.global_step, best)


def _add_stage1_section(readme: Path, stage1_info: dict[str, Any]) -> None:
    """The stock card knows only the run that wrote it; the RetroMAE stage is described by hand."""
    lines = [
        "### Stage 1: RetroMAE pretraining",
        "",
        "Before this contrastive fine-tuning (stage 2), the encoder was pretrained with RetroMAE "
        "([Xiao et al., 2022](https://arxiv.org/abs/2205.12035)): a masked auto-encoder whose light decoder "
        "rebuilds heavily masked text from the encoder's [CLS] sentence embedding.",
        "",
    ]
    lines += [f"- **{key}:** {_card_value(value)}" for key, value in stage1_info.items()]
    section = "\n".join(lines) + "\n\n### Stage 2: contrastive fine-tuning\n"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    marker = "## Training Details\n"
    text = (
        text.replace(marker, marker + "\n" + section, 1)
        if marker in text
        else text + "\n## Training Details\n\n" + section
    )
    readme.write_text(text, encoding="utf-8")


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)

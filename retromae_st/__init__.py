"""retromae-st: RetroMAE pretraining as a Sentence-Transformers loss, then contrastive fine-tuning.

The package follows the data flow: ``data/`` (text in, batches out) -> ``pretraining/`` (stage 1,
RetroMAE) -> ``finetuning/`` (stage 2, MNRL) -> ``evaluation/`` (FAISS, MTEB, reports); ``models``,
``recipes``, ``pipeline`` and ``cli`` use them from above.

The public API is imported lazily (PEP 562), so ``retromae-st --help`` and light imports do not pay
for torch, transformers and sentence-transformers until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# 0.1.0's flat module paths (retromae_st.loss, retromae_st.corpus, ...) still import, with a warning.
importlib.import_module("retromae_st._moved").install()

_EXPORTS = {
    # stage 1
    "RetroMAELoss": "retromae_st.pretraining.loss",
    "NonFiniteLossError": "retromae_st.pretraining.loss",
    "RetroMAEDecoder": "retromae_st.pretraining.decoder",
    "RetroMAETrainingCallback": "retromae_st.pretraining.training",
    "RetroMAETrainer": "retromae_st.pretraining.trainer",
    "pretrain": "retromae_st.pretraining.training",
    # models
    "PRESETS": "retromae_st.models",
    "Preset": "retromae_st.models",
    "build_model": "retromae_st.models",
    "load_encoder": "retromae_st.models",
    "stage1_learning_rate": "retromae_st.models",
    "train_wordpiece_tokenizer": "retromae_st.models",
    # data
    "CorpusStats": "retromae_st.data.sources",
    "LengthGroupedBatchSampler": "retromae_st.data.batching",
    "PaddingCollator": "retromae_st.data.batching",
    "load_texts": "retromae_st.data.sources",
    "tokenize_corpus": "retromae_st.data.tokenize",
    "load_beir": "retromae_st.data.beir",
    # stage 2
    "dev_evaluator": "retromae_st.finetuning.pairs",
    "load_pairs": "retromae_st.finetuning.pairs",
    "mine_negatives": "retromae_st.finetuning.negatives",
    "finetune": "retromae_st.finetuning.train",
    # evaluation
    "evaluate": "retromae_st.evaluation",
    # recipes and the quickstart
    "Recipe": "retromae_st.recipes",
    "load_recipe": "retromae_st.recipes",
    "run_recipe": "retromae_st.pipeline",
    "python_docs_corpus": "retromae_st.data.python_docs",
    "python_docs_pairs": "retromae_st.data.python_docs",
    "write_beir": "retromae_st.data.python_docs",
    "UserInputError": "retromae_st.errors",
}

__all__ = [
    "__version__",
    "RetroMAELoss",
    "NonFiniteLossError",
    "RetroMAEDecoder",
    "RetroMAETrainingCallback",
    "RetroMAETrainer",
    "pretrain",
    "PRESETS",
    "Preset",
    "build_model",
    "load_encoder",
    "stage1_learning_rate",
    "train_wordpiece_tokenizer",
    "CorpusStats",
    "LengthGroupedBatchSampler",
    "PaddingCollator",
    "load_texts",
    "tokenize_corpus",
    "load_beir",
    "dev_evaluator",
    "load_pairs",
    "mine_negatives",
    "finetune",
    "evaluate",
    "Recipe",
    "load_recipe",
    "run_recipe",
    "python_docs_corpus",
    "python_docs_pairs",
    "write_beir",
    "UserInputError",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'retromae_st' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from retromae_st.data.batching import LengthGroupedBatchSampler, PaddingCollator
    from retromae_st.data.beir import load_beir
    from retromae_st.data.python_docs import python_docs_corpus, python_docs_pairs, write_beir
    from retromae_st.data.sources import CorpusStats, load_texts
    from retromae_st.data.tokenize import tokenize_corpus
    from retromae_st.errors import UserInputError
    from retromae_st.evaluation import evaluate
    from retromae_st.finetuning.negatives import mine_negatives
    from retromae_st.finetuning.pairs import dev_evaluator, load_pairs
    from retromae_st.models import (
        PRESETS,
        Preset,
        build_model,
        load_encoder,
        stage1_learning_rate,
        train_wordpiece_tokenizer,
    )
    from retromae_st.pipeline import run_recipe
    from retromae_st.pretraining.decoder import RetroMAEDecoder
    from retromae_st.pretraining.loss import NonFiniteLossError, RetroMAELoss
    from retromae_st.pretraining.trainer import RetroMAETrainer
    from retromae_st.pretraining.training import RetroMAETrainingCallback, pretrain
    from retromae_st.recipes import Recipe, load_recipe

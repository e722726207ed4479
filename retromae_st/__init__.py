"""retromae-st: RetroMAE pretraining as a Sentence-Transformers loss, then contrastive fine-tuning.

The public API is imported lazily (PEP 562), so ``retromae-st --help`` and light imports do not pay
for torch, transformers and sentence-transformers until a name that needs them is used. The stage-2
function is ``retromae_st.finetune.finetune``; it is not re-exported here, where its name would shadow
the ``retromae_st.finetune`` module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # stage 1
    "RetroMAELoss": "retromae_st.loss",
    "NonFiniteLossError": "retromae_st.loss",
    "RetroMAEDecoder": "retromae_st.decoder",
    "RetroMAETrainingCallback": "retromae_st.training",
    "pretrain": "retromae_st.training",
    # models
    "PRESETS": "retromae_st.models",
    "Preset": "retromae_st.models",
    "build_model": "retromae_st.models",
    "load_encoder": "retromae_st.models",
    "train_wordpiece_tokenizer": "retromae_st.models",
    # data
    "CorpusStats": "retromae_st.corpus",
    "LengthGroupedBatchSampler": "retromae_st.corpus",
    "PaddingCollator": "retromae_st.corpus",
    "load_texts": "retromae_st.corpus",
    "tokenize_corpus": "retromae_st.corpus",
    "load_beir": "retromae_st.beir",
    # stage 2
    "dev_evaluator": "retromae_st.finetune",
    "load_pairs": "retromae_st.finetune",
    "mine_negatives": "retromae_st.finetune",
    # evaluation
    "evaluate": "retromae_st.evaluation",
    # recipes and the quickstart
    "Recipe": "retromae_st.recipes",
    "load_recipe": "retromae_st.recipes",
    "run_recipe": "retromae_st.pipeline",
    "python_docs_corpus": "retromae_st.quickstart",
    "python_docs_pairs": "retromae_st.quickstart",
    "write_beir": "retromae_st.quickstart",
    "UserInputError": "retromae_st.errors",
}

__all__ = [
    "__version__",
    "RetroMAELoss",
    "NonFiniteLossError",
    "RetroMAEDecoder",
    "RetroMAETrainingCallback",
    "pretrain",
    "PRESETS",
    "Preset",
    "build_model",
    "load_encoder",
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
    from retromae_st.beir import load_beir
    from retromae_st.corpus import (
        CorpusStats,
        LengthGroupedBatchSampler,
        PaddingCollator,
        load_texts,
        tokenize_corpus,
    )
    from retromae_st.decoder import RetroMAEDecoder
    from retromae_st.errors import UserInputError
    from retromae_st.evaluation import evaluate
    from retromae_st.finetune import dev_evaluator, load_pairs, mine_negatives
    from retromae_st.loss import NonFiniteLossError, RetroMAELoss
    from retromae_st.models import PRESETS, Preset, build_model, load_encoder, train_wordpiece_tokenizer
    from retromae_st.pipeline import run_recipe
    from retromae_st.quickstart import python_docs_corpus, python_docs_pairs, write_beir
    from retromae_st.recipes import Recipe, load_recipe
    from retromae_st.training import RetroMAETrainingCallback, pretrain

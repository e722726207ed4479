"""retromae-st: RetroMAE pretraining as a Sentence-Transformers loss, then contrastive fine-tuning."""

from __future__ import annotations

__version__ = "0.1.0"

from retromae_st.errors import UserInputError
from retromae_st.models import PRESETS, Preset, build_model, load_encoder, train_wordpiece_tokenizer

__all__ = [
    "__version__",
    "PRESETS",
    "Preset",
    "UserInputError",
    "build_model",
    "load_encoder",
    "train_wordpiece_tokenizer",
]

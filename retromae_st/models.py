"""Where a model comes from: presets built from scratch, a WordPiece tokenizer trained on the corpus,
or an existing encoder (local folder or hub name).

Every function returns a plain ``SentenceTransformer`` made of stock modules (``Transformer`` +
``Pooling('cls')``), so what RetroMAE pretrains is exactly what ``SentenceTransformer(path)`` loads.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import AutoConfig, BertConfig, BertModel, BertTokenizerFast, PreTrainedTokenizerBase

from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Preset:
    """The shape of a from-scratch BERT encoder."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_positions: int = 512

    def bert_config(self, tokenizer: PreTrainedTokenizerBase) -> BertConfig:
        """The BERT configuration of this shape for ``tokenizer``'s vocabulary."""
        return BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            # No dropout on attention weights (as ModernBERT and most recent encoders; hidden dropout
            # stays 0.1): with it on, CPU attention falls back from the fused SDPA kernel to the unfused
            # path that stores every [B, H, L, L] weight matrix, ~2x the attention's time and memory.
            attention_probs_dropout_prob=0.0,
        )


PRESETS: dict[str, Preset] = {
    # CPU minutes: tests and the offline quickstart.
    "retromae-tiny": Preset(layers=2, hidden=128, heads=2, intermediate=512),
    # The "small" model of the reference measurements (SPEC section 9).
    "retromae-small": Preset(layers=4, hidden=256, heads=4, intermediate=1024),
    # BERT-base shape.
    "retromae-base": Preset(layers=12, hidden=768, heads=12, intermediate=3072),
}


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Train a BERT-style WordPiece tokenizer on ``texts`` with the Hugging Face ``tokenizers`` library.

    A vocabulary trained on the target corpus (a few thousand entries) keeps the vocabulary-wide work of
    the two MLM heads small and lets a small model learn on a CPU within minutes.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 10:
        raise UserInputError(
            f"vocab_size={vocab_size} is too small: use at least {len(SPECIAL_TOKENS) + 10}."
        )
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserInputError("the tokenizer learned no vocabulary: the corpus has no usable text.")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
    )


def build_model(
    preset: str | Preset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int = 128,
    pooling: str = "cls",
    save_dir: str | os.PathLike | None = None,
    seed: int | None = None,
) -> SentenceTransformer:
    """A randomly initialised BERT encoder of a preset shape, as ``Transformer`` + ``Pooling``.

    Args:
        preset: a name from :data:`PRESETS` (``retromae-tiny``, ``retromae-small``, ``retromae-base``)
            or a :class:`Preset`.
        tokenizer: the tokenizer; its vocabulary size fixes the embedding table.
        max_seq_length: the longest input the model reads; at most the preset's positions.
        pooling: ``"cls"`` for RetroMAE (the decoder reads the [CLS] vector); ``"mean"`` for a
            from-scratch model fine-tuned without RetroMAE.
        save_dir: where the initial weights are written (Sentence-Transformers builds its
            ``Transformer`` module from a folder); a temporary folder when None.
        seed: seeds the weight initialisation.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserInputError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)}.")
        shape = PRESETS[preset]
    else:
        shape = preset
    if max_seq_length > shape.max_positions:
        raise UserInputError(
            f"max_seq_length={max_seq_length} exceeds the model's {shape.max_positions} positions: "
            f"use max_seq_length <= {shape.max_positions}."
        )
    if tokenizer.mask_token_id is None:
        raise UserInputError("the tokenizer has no mask token; RetroMAE needs one (e.g. '[MASK]').")
    config = shape.bert_config(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    folder = Path(save_dir) if save_dir is not None else Path(tempfile.mkdtemp(prefix="retromae-init-"))
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return _assemble(str(folder), max_seq_length=max_seq_length, pooling=pooling)


def load_encoder(
    name_or_path: str,
    *,
    max_seq_length: int | None = None,
    pooling: str = "cls",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Load an existing encoder as a Sentence-Transformers model.

    A Sentence-Transformers folder (with ``modules.json``) loads as it is; a plain transformers encoder
    (a folder with ``config.json``, or a hub name such as ``bert-base-uncased``) becomes ``Transformer`` +
    ``Pooling(pooling)``. Loading is safe by default: weights only from safetensors (``allow_pickle``
    lifts that) and no code from the model folder (``trust_remote_code`` lifts that).
    """
    path = Path(name_or_path)
    kwargs = {"use_safetensors": not allow_pickle, **(model_kwargs or {})}
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{name_or_path} is a file; pass the model's folder.")
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise UserInputError(
                f"{name_or_path} is not a Sentence-Transformers or transformers model: it has neither "
                "modules.json nor config.json."
            )
        if not allow_pickle and not any(path.rglob("*.safetensors")) and any(path.rglob("*.bin")):
            raise UserInputError(
                f"{name_or_path} holds only pickle (.bin) weights, which can run code when loaded: convert them to "
                "safetensors, or pass --allow-pickle if you trust the folder."
            )
    try:
        if (path / "modules.json").exists():
            model = SentenceTransformer(
                str(path),
                trust_remote_code=trust_remote_code,
                model_kwargs=kwargs,
                local_files_only=_offline(),
            )
            if max_seq_length is not None:
                config = getattr(getattr(model[0], "auto_model", None), "config", None)
                _check_positions(config, max_seq_length, name_or_path)
                model.max_seq_length = max_seq_length
            return model
        return _assemble(
            name_or_path,
            max_seq_length=max_seq_length,
            pooling=pooling,
            trust_remote_code=trust_remote_code,
            model_kwargs=kwargs,
        )
    except OSError as error:
        if path.exists():
            raise
        hint = " (HF_HUB_OFFLINE is set: download it first or pass a local folder)" if _offline() else ""
        raise UserInputError(f"cannot load model {name_or_path!r}{hint}: {error}") from error


def _assemble(
    name_or_path: str,
    *,
    max_seq_length: int | None,
    pooling: str,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    if trust_remote_code:
        model_kwargs = {**(model_kwargs or {}), "trust_remote_code": True}
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if max_seq_length is not None:
        _check_positions(config, max_seq_length, name_or_path)
    transformer = Transformer(
        name_or_path,
        max_seq_length=max_seq_length,
        model_kwargs=model_kwargs,
        config_kwargs={"trust_remote_code": trust_remote_code},
        processor_kwargs={"trust_remote_code": trust_remote_code},
    )
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pooling_module])


def _check_positions(config: Any, max_seq_length: int, name_or_path: str) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise UserInputError(
            f"max_seq_length={max_seq_length} exceeds the {positions} positions of {name_or_path}: "
            f"use max_seq_length <= {positions}."
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}

"""What RetroMAE needs from an encoder, behind one small interface for each supported architecture.

The decoder shares the encoder's embedding module (SPEC section 3): the content stream is the embedding
module applied to the unmasked ids, the query stream is the sentence embedding plus each position's
position embedding through the same layer norm. Architectures name these pieces differently (BERT's
``embeddings.word_embeddings`` vs ModernBERT's ``embeddings.tok_embeddings``) and place positions
differently (RoBERTa counts from ``padding_idx + 1``; ModernBERT has rotary positions and no table), so
each gets an adapter. The adapter is a plain object, not an ``nn.Module``: the encoder's weights belong
to the model, and must not be registered (or saved) a second time inside the loss.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

SUPPORTED = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "modernbert", "electra")


@dataclass
class EncoderAdapter:
    """Access to one encoder's embedding pieces.

    Attributes:
        embeddings: the encoder's embedding module (shared with the decoder, not copied).
        word_embeddings: the token embedding table; the MLM heads' vocab projection is tied to it.
        position_embeddings: the absolute position table, or None (rotary models: the decoder owns one).
        layer_norm: the embedding layer norm the query stream goes through.
        dropout: the embedding dropout.
        position_offset: id of position 0 in the position table (RoBERTa: padding_idx + 1).
        uses_token_types: whether the embedding module adds token type embeddings.
    """

    model_type: str
    config: PretrainedConfig
    embeddings: nn.Module
    word_embeddings: nn.Embedding
    position_embeddings: nn.Embedding | None
    token_type_embeddings: nn.Embedding | None
    layer_norm: nn.Module
    dropout: nn.Module
    position_offset: int = 0

    @property
    def hidden_size(self) -> int:
        return self.word_embeddings.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.word_embeddings.num_embeddings

    @property
    def max_positions(self) -> int | None:
        if self.position_embeddings is None:
            return getattr(self.config, "max_position_embeddings", None)
        return self.position_embeddings.num_embeddings - self.position_offset

    def _config_value(self, names: tuple[str, ...], kind: type | tuple[type, ...]) -> Any:
        """The first of ``names`` the config sets to a ``kind`` value (architectures name things apart)."""
        for name in names:
            value = getattr(self.config, name, None)
            if isinstance(value, kind) and not isinstance(value, bool):
                return value
        return None

    @property
    def hidden_act(self) -> str:
        value = self._config_value(("hidden_act", "hidden_activation", "activation"), str)
        return "gelu" if value is None else value

    @property
    def layer_norm_eps(self) -> float:
        value = self._config_value(("layer_norm_eps", "norm_eps"), (int, float))
        return 1e-12 if value is None else float(value)

    @property
    def hidden_dropout(self) -> float:
        value = self._config_value(("hidden_dropout_prob", "dropout", "embedding_dropout"), float)
        return 0.1 if value is None else value

    @property
    def attention_dropout(self) -> float:
        value = self._config_value(("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"), float)
        return self.hidden_dropout if value is None else value

    def content_stream(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """The embedding module on the unmasked ids: [B, L] -> [B, L, D]."""
        if self.model_type == "distilbert":
            return self.embeddings(input_ids)
        if self.token_type_embeddings is not None and token_type_ids is not None:
            return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.embeddings(input_ids=input_ids)

    def positions(self, length: int, device: torch.device, table: nn.Embedding | None = None) -> torch.Tensor:
        """Position embeddings of positions 0..L-1: [L, D]. ``table`` stands in for rotary models."""
        table = self.position_embeddings if self.position_embeddings is not None else table
        if table is None:
            raise ValueError(f"{self.model_type} has no position table; pass the decoder's own one.")
        offset = self.position_offset if table is self.position_embeddings else 0
        return table(torch.arange(length, device=device) + offset)

    def query_stream(
        self, sentence_embedding: torch.Tensor, length: int, own_positions: nn.Embedding | None = None
    ) -> torch.Tensor:
        """h at every position plus that position's embedding, through the embedding layer norm.

        [B, D] -> [B, L, D]. This is FlagEmbedding's form: the embedding module's own arithmetic
        (position, token type 0, layer norm, dropout) with h in place of the word embedding.
        """
        hidden = sentence_embedding.unsqueeze(1) + self.positions(
            length, sentence_embedding.device, own_positions
        )
        if self.token_type_embeddings is not None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        return self.dropout(self.layer_norm(hidden))

    def plain_query_stream(
        self, sentence_embedding: torch.Tensor, length: int, own_positions: nn.Embedding | None = None
    ) -> torch.Tensor:
        """staoxiao's form: h + position embedding, no layer norm. [B, D] -> [B, L, D]."""
        return sentence_embedding.unsqueeze(1) + self.positions(
            length, sentence_embedding.device, own_positions
        )


def _first(module: nn.Module, *names: str) -> nn.Module | None:
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    return None


def adapt_encoder(model: PreTrainedModel) -> EncoderAdapter:
    """Find the embedding pieces of a transformers encoder, or say clearly that it is not supported."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    embeddings = getattr(model, "embeddings", None)
    word = _first(embeddings, "word_embeddings", "tok_embeddings") if embeddings is not None else None
    layer_norm = _first(embeddings, "LayerNorm", "norm", "layer_norm") if embeddings is not None else None
    if word is None or layer_norm is None or not isinstance(word, nn.Embedding):
        raise ValueError(
            f"RetroMAE cannot use a {type(model).__name__} encoder (model_type {model_type!r}): it needs an "
            f"encoder with an embedding module holding word embeddings and a layer norm. Supported: "
            f"{', '.join(SUPPORTED)}."
        )
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise ValueError(
            f"RetroMAE cannot use {type(model).__name__}: its embedding size ({config.embedding_size}) differs "
            f"from its hidden size ({config.hidden_size}), so the sentence embedding cannot enter the embedding "
            "layer. Use an encoder whose embedding size equals its hidden size."
        )
    position = _first(embeddings, "position_embeddings")
    offset = 0
    if model_type in {"roberta", "xlm-roberta", "camembert"} or getattr(embeddings, "padding_idx", None):
        offset = getattr(embeddings, "padding_idx", 0) + 1
    return EncoderAdapter(
        model_type=model_type,
        config=config,
        embeddings=embeddings,
        word_embeddings=word,
        position_embeddings=position,
        token_type_embeddings=_first(embeddings, "token_type_embeddings"),
        layer_norm=layer_norm,
        dropout=_first(embeddings, "dropout", "drop") or nn.Identity(),
        position_offset=offset,
    )


def checkpoint_tensors(
    name_or_path: str | os.PathLike | None, names: set[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors among ``names`` that a transformers checkpoint's safetensors files hold, and where.

    ``name_or_path`` is what the encoder was loaded from (``auto_model.name_or_path``: a folder, or a hub
    name looked up in the local cache only, never downloaded). Only the named tensors are read (safetensors
    reads by name), so this is cheap even for a big model. Single-file and sharded checkpoints both work.
    An unreadable or absent checkpoint gives ``({}, reason)``: the caller then starts from fresh weights.
    """
    if not name_or_path:
        return {}, "the encoder was not loaded from a checkpoint"
    files = _safetensors_files(str(name_or_path))
    if not files:
        return {}, f"{name_or_path} has no safetensors weights"
    found: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as reader:
                for name in names & set(reader.keys()):
                    found[name] = reader.get_tensor(name)
        except (OSError, SafetensorError) as error:
            return {}, f"{file} cannot be read ({error})"
    return found, str(files[0] if len(files) == 1 else files[0].parent)


def _safetensors_files(name_or_path: str) -> list[Path]:
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name_or_path, "model.safetensors")
            index = try_to_load_from_cache(name_or_path, "model.safetensors.index.json")
        except ValueError:  # HFValidationError: no hub name either (e.g. a folder since deleted)
            return []
        if isinstance(cached, str):
            return [Path(cached)]
        if not isinstance(index, str):
            return []
        folder = Path(index).parent
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            return []
        return [folder / name for name in sorted(set(weight_map.values())) if (folder / name).is_file()]
    return []


def looks_untrained(model: nn.Module) -> bool:
    """Whether an encoder still has its initial weights: every layer norm exactly 1 (weight) and 0 (bias).

    Any training step moves them, so this tells a from-scratch preset (nothing to protect from a fresh head)
    from a pretrained encoder, without a marker file that could go stale.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None]
    return bool(norms) and all(
        bool((m.weight == 1).all()) and (m.bias is None or bool((m.bias == 0).all())) for m in norms
    )

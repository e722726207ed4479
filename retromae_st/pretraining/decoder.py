"""RetroMAEDecoder: the shallow decoder that rebuilds the text from the sentence embedding (SPEC 3-4).

Enhanced decoding (the default) runs two streams through each layer: queries come from the query stream
(the sentence embedding h plus each position's position embedding), keys and values from the content
stream (the embedded, unmasked text with h in position 0), under a per-row visibility mask. Basic
decoding is ordinary self-attention over a masked copy of the text. Either way the layers are BERT
layers (attention, residual, layer norm, feed-forward, residual, layer norm), freshly initialised, with
attention through ``scaled_dot_product_attention`` and a boolean mask: no float [B, L, L] additive mask.

Shapes: B batch, L length, D hidden, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation


class DecoderAttention(nn.Module):
    """Multi-head attention with queries and keys/values from (possibly) different streams."""

    def __init__(self, hidden_size: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"decoder_heads={heads} must divide the hidden size {hidden_size}.")
        self.heads = heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)  # [B, H, L, D/H]

    def forward(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """query [B, L, D], content [B, L, D], visible [B, L, L] bool (True = may attend) -> [B, L, D]."""
        q, k, v = (
            self._split(self.query(query)),
            self._split(self.key(content)),
            self._split(self.value(content)),
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, L, D/H]
        batch, _, length, _ = attended.shape
        return self.output(attended.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    """One post-norm BERT layer whose attention may read a different stream than its queries."""

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        intermediate_size: int,
        activation: str,
        dropout: float,
        eps: float,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.attention = DecoderAttention(hidden_size, heads, attention_dropout)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = get_activation(activation)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        hidden = self.attention_norm(query + self.dropout(self.attention(query, content, visible)))
        feed_forward = self.output(self.activation(self.intermediate(hidden)))
        return self.output_norm(hidden + self.dropout(feed_forward))


class RetroMAEDecoder(nn.Module):
    """A stack of decoder layers (one by default), plus a position table for encoders without one.

    Args:
        hidden_size: the encoder's hidden size D.
        heads: attention heads (must divide D).
        intermediate_size: feed-forward width (the encoder's, usually 4 D).
        layers: number of layers; layers after the first take the previous output as queries and the
            same content stream as keys/values (enhanced) or themselves (basic).
        activation, dropout, eps: as the encoder's config.
        attention_dropout: dropout on the attention weights (the encoder's; default ``dropout``). At 0,
            ``scaled_dot_product_attention`` can use its fused kernel on CPU too (it falls back to the
            unfused path, which keeps the [B, H, L, L] weights, whenever dropout is on).
        own_positions: the number of positions of a decoder-owned position table, for encoders with
            rotary positions (ModernBERT) whose embedding module carries no position information.
    """

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        intermediate_size: int,
        layers: int = 1,
        activation: str = "gelu",
        dropout: float = 0.1,
        eps: float = 1e-12,
        own_positions: int | None = None,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, heads, intermediate_size, activation, dropout, eps, attention_dropout)
            for _ in range(layers)
        )
        self.position_embeddings = nn.Embedding(own_positions, hidden_size) if own_positions else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation (normal, std 0.02), so a fresh decoder starts at the encoder's scale.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def enhanced(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Two-stream decoding. query, content [B, L, D]; visible [B, L, L] -> [B, L, D]."""
        for layer in self.layers:
            query = layer(query, content, visible)
        return query

    def basic(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Self-attention over the masked text. hidden [B, L, D]; attention_mask [B, L] -> [B, L, D]."""
        visible = attention_mask.bool().unsqueeze(1).expand(-1, hidden.shape[1], -1)  # [B, L, L]
        for layer in self.layers:
            hidden = layer(hidden, hidden, visible)
        return hidden

"""Packing: run the encoder on a batch's real tokens only, as one stream with per-row attention.

Length groups (:mod:`retromae_st.pretraining.unpadding`) cut most of a mixed-length batch's padding, but
each group is still padded to its own longest row, and every group is a separate encoder call. Packed,
the batch's T real tokens go through the encoder as one row of length T: the embeddings, projections,
layer norms and feed-forward layers (most of a layer's work) then run on real tokens only, whatever the
mix of lengths. Only attention needs the rows apart: a token attends to the tokens of its own row.

How the rows stay apart: for the duration of the call the encoder's ``config._attn_implementation``
names an attention function registered here with transformers' ``AttentionInterface`` (and a mask
function with ``AttentionMaskInterface``). The encoder calls it in every layer with the packed queries,
keys and values [1, H, T, d] and the row plan passed through the model's keyword arguments. It gathers
the rows into a few buckets of similar length, each padded to its own longest row (padding inside
attention only, where it costs little), runs ``scaled_dot_product_attention`` per bucket under a
key-padding mask, and scatters the outputs back into the stream. Every device has that path. On CUDA,
with flash-attn installed and half-precision activations, transformers' own padding-free path runs
instead (``flash_attention_2`` with ``cu_seq_lens``: varlen kernels, no padding anywhere).

Why not the alternatives on CPU: nested jagged tensors do run ``scaled_dot_product_attention`` with
autograd on CPU, but through an unfused per-row fallback measured at 2x slower than one padded call; a
block-diagonal [T, T] mask would cost T^2 instead of sum(l_i^2); flex attention is compiled-only.

The ``Transformer`` module's output is unpacked to the usual [B, L, D] ``token_embeddings`` (zeros at
padding) before the modules after it run, so pooling, ``Normalize`` and ``Dense`` give exactly the
model's sentence embedding, as the padded call would.

Which encoders: those whose every attention layer goes through ``ALL_ATTENTION_FUNCTIONS`` and whose
embeddings take ``position_ids`` (:data:`PACKABLE`: BERT, RoBERTa / XLM-R / CamemBERT, DistilBERT,
ELECTRA, ModernBERT in transformers 5). Anything else runs as length groups. A call in which the
attention function never ran (an encoder that ignored the implementation) raises instead of silently
attending across rows.

Shapes: B batch, L padded length, T real tokens, H heads, d head size, D hidden, b/l a bucket's rows/length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function

from retromae_st.pretraining.unpadding import plan_length_groups

__all__ = [
    "ATTENTION_BUCKETS",
    "PACKABLE",
    "PACKED_ATTENTION",
    "PackedRows",
    "pack_inputs",
    "pack_rows",
    "packable",
    "packed_attention",
    "packed_call",
    "unpack",
]

# The attention implementation name registered with transformers while a packed call runs.
PACKED_ATTENTION = "retromae_packed"
# Encoders (config.model_type) whose attention layers all go through ALL_ATTENTION_FUNCTIONS and whose
# embeddings take position_ids, in transformers 5 (each checked against the padded call in the tests).
PACKABLE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "modernbert"})
# Rows are gathered into at most this many length buckets inside attention (the only padded work).
ATTENTION_BUCKETS = 8
# The keyword argument that carries the row plan through the model to the attention function.
PLAN_KWARG = "packed_rows"


@dataclass(frozen=True)
class Bucket:
    """Rows of similar length, as attention gathers them from the stream.

    ``index`` holds, for each (row, position) of the bucket, the stream position of that token; positions
    past a row's end repeat its last token (kept out of every key set by ``valid``, results discarded).
    """

    index: torch.Tensor  # [b, l] long, into the stream
    valid: torch.Tensor  # [b, l] bool, True at real tokens
    key_mask: torch.Tensor | None  # [b, 1, 1, l] bool, None when every row of the bucket is full
    start: torch.Tensor  # [b] long, stream position of each row's first token

    @property
    def slots(self) -> int:
        return self.index.numel()  # b * l


@dataclass
class PackedRows:
    """Where each row of a right-padded batch lies in the packed stream, and the attention buckets.

    ``calls`` counts the attention calls that used this plan (a packed forward that made none is refused).
    """

    batch: int  # B
    width: int  # L
    lengths: torch.Tensor  # [B] long
    flat_index: torch.Tensor  # [T] long: position (row * L + column) of each stream token in the batch
    cu_seq_lens: torch.Tensor  # [B + 1] int32: stream offsets of the rows (flash-attn's varlen form)
    max_length: int
    buckets: tuple[Bucket, ...]
    gather: torch.Tensor  # [S] long: the stream token in each bucket slot, bucket after bucket (S = sum b l)
    inverse: torch.Tensor  # [T] long: the bucket slot of each stream token
    calls: int = field(default=0, compare=False)

    @property
    def tokens(self) -> int:
        return int(self.flat_index.numel())


def packable(model: nn.Module) -> str | None:
    """None when ``model`` (a transformers encoder) can run packed; otherwise the reason it cannot."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in PACKABLE:
        return f"{model_type} encoders are not known to route every attention layer through transformers' interface"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return f"this {model_type} is configured as a (causal) decoder"
    if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        # The recomputation in backward would run after the packed call, with the stock attention.
        return "activation checkpointing is on (its recomputation would attend across the packed rows)"
    return None


# Below this hidden size a packed encoder call is slower on CPU than length groups: its per-bucket
# attention calls and gathers cost more than the padding they skip (2 cores, L=128: hidden 128 -4%,
# 256 +5-10%, 768 +22%; benchmarks/results/pretrain_throughput_packed_*.md).
PACKING_MIN_HIDDEN_CPU = 256


def packing_pays(hidden_size: int, device: torch.device) -> bool:
    """Whether ``packed="auto"`` packs: always on CUDA (varlen kernels), on CPU from a hidden size up."""
    return device.type == "cuda" or hidden_size >= PACKING_MIN_HIDDEN_CPU


def pack_rows(
    attention_mask: torch.Tensor, max_buckets: int = ATTENTION_BUCKETS, hidden_size: int = 768
) -> PackedRows:
    """The stream layout of a right-padded batch. attention_mask: [B, L], 1 at real tokens.

    Raises ValueError for masks that are not right-padded (the loss refuses those earlier).
    """
    batch, width = attention_mask.shape
    device = attention_mask.device
    real = attention_mask.bool()
    lengths = real.sum(dim=1)  # [B]
    columns = torch.arange(width, device=device)
    if not torch.equal(columns.unsqueeze(0) < lengths.unsqueeze(1), real):
        raise ValueError("packing needs a right-padded attention mask (each row's tokens first)")
    offsets = torch.zeros(batch + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(lengths, dim=0)  # [B + 1]
    flat_index = torch.nonzero(real.reshape(-1), as_tuple=True)[0]  # [T], row-major: row by row
    buckets = []
    for group in plan_length_groups(attention_mask, max_buckets, hidden_size):
        rows = group.rows if isinstance(group.rows, torch.Tensor) else torch.arange(batch, device=device)
        span = columns[: group.length]  # [l]
        row_lengths = lengths[rows].unsqueeze(1)  # [b, 1]
        valid = span.unsqueeze(0) < row_lengths  # [b, l]
        start = offsets[rows]  # [b]
        index = start.unsqueeze(1) + torch.minimum(span.unsqueeze(0), (row_lengths - 1).clamp(min=0))
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]
        buckets.append(Bucket(index=index, valid=valid, key_mask=key_mask, start=start))
    gather = torch.cat([bucket.index.reshape(-1) for bucket in buckets])  # [S]
    real_slots = torch.cat([bucket.valid.reshape(-1) for bucket in buckets])  # [S] bool
    inverse = torch.empty(int(real_slots.sum()), dtype=torch.long, device=device)
    inverse[gather[real_slots]] = torch.nonzero(real_slots, as_tuple=True)[0]  # each real token: one slot
    return PackedRows(
        batch=batch,
        width=width,
        lengths=lengths,
        flat_index=flat_index,
        cu_seq_lens=offsets.to(torch.int32),
        max_length=int(lengths.max()) if batch else 0,
        buckets=tuple(buckets),
        gather=gather,
        inverse=inverse,
    )


def pack_inputs(
    features: dict[str, torch.Tensor], input_ids: torch.Tensor, rows: PackedRows, position_offset: int = 0
) -> dict[str, Any]:
    """The encoder's packed inputs: ids, per-row positions and token types as [1, T], no attention mask.

    ``position_offset`` is the position table's id of position 0 (RoBERTa: ``padding_idx + 1``, what its
    own position ids give the real tokens of a right-padded row).
    """
    width = rows.width
    positions = (rows.flat_index % width) + position_offset  # [T]
    packed = {
        "input_ids": input_ids.reshape(-1)[rows.flat_index].unsqueeze(0),  # [1, T]
        "position_ids": positions.unsqueeze(0),
        PLAN_KWARG: rows,
    }
    token_types = features.get("token_type_ids")
    if isinstance(token_types, torch.Tensor) and token_types.shape == input_ids.shape:
        packed["token_type_ids"] = token_types.reshape(-1)[rows.flat_index].unsqueeze(0)
    return packed


def unpack(stream: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """[1, T, ...] -> [B, L, ...], zeros at padding. Differentiable in ``stream``."""
    values = stream[0]  # [T, ...]
    padded = values.new_zeros(rows.batch * rows.width, *values.shape[1:])
    return padded.index_copy(0, rows.flat_index, values).view(rows.batch, rows.width, *values.shape[1:])


def ignored_packed_attention(encoder: nn.Module) -> RuntimeError:
    """The error for an encoder whose attention did not go through the packed attention function."""
    return RuntimeError(
        f"{type(encoder).__name__} did not call the packed attention function, so its rows would have "
        "attended to each other; run it as length groups (RetroMAELoss(packed=False))."
    )


# -- the attention and mask functions transformers calls ----------------------------------------------


@dataclass
class PackedMask:
    """What the model's mask creation returns under :data:`PACKED_ATTENTION`: its mask function, to be
    evaluated at stream positions inside each bucket (sliding windows: a distance, the same within a row
    in stream or row coordinates). Evaluated masks are kept per bucket: every layer reuses them.

    The positions are those the bucket gathered (``bucket.index``: a row's padding slots repeat its last
    token), never past the row: transformers >= 5.25 sees the packed position ids and wraps the function
    in a same-row test that indexes the stream at each position, so a slot past the row would compare
    another row's token (a fully masked query) or index past the stream's end (IndexError)."""

    mask_function: Callable
    evaluated: dict[int, torch.Tensor] = field(default_factory=dict)

    def for_bucket(self, number: int, bucket: Bucket) -> torch.Tensor:
        if number not in self.evaluated:
            positions = bucket.index  # [b, l]
            zero = positions.new_zeros(())
            allowed = self.mask_function(
                zero, zero, positions[:, :, None], positions[:, None, :]
            )  # [b, l, l]
            self.evaluated[number] = allowed.to(torch.bool).unsqueeze(1)  # [b, 1, l, l]
        return self.evaluated[number]


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> PackedMask | None:
    """The mask interface under :data:`PACKED_ATTENTION`: no [T, T] tensor, only the pattern (None when it
    is plain bidirectional; rows are kept apart by the buckets themselves)."""
    if mask_function is bidirectional_mask_function:
        return None
    return PackedMask(mask_function)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: PackedMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-row attention over the packed stream: query, key, value [1, H, T, d] -> ([1, T, H, d], None)."""
    rows = kwargs.get(PLAN_KWARG)
    if not isinstance(rows, PackedRows):
        raise RuntimeError(
            f"the {PACKED_ATTENTION!r} attention ran without its row plan; it only serves RetroMAELoss's packed "
            "encoder call."
        )
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise RuntimeError(
            f"{PACKED_ATTENTION!r} attention is bidirectional; this layer asks for causal attention."
        )
    if isinstance(attention_mask, torch.Tensor):
        raise RuntimeError(f"{PACKED_ATTENTION!r} attention got a tensor mask; packed calls take none.")
    rows.calls += 1
    # One gather per input and one scatter for the output (autograd then keeps one buffer per tensor).
    slotted = [x[0].index_select(1, rows.gather) for x in (query, key, value)]  # [H, S, d] each
    chunks = [torch.split(x, [bucket.slots for bucket in rows.buckets], dim=1) for x in slotted]
    outputs = []
    for number, (bucket, qb, kb, vb) in enumerate(zip(rows.buckets, *chunks)):
        shape = (qb.shape[0], *bucket.index.shape, qb.shape[-1])  # [H, b, l, d]
        qb, kb, vb = (x.view(shape).transpose(0, 1) for x in (qb, kb, vb))  # [b, H, l, d]
        mask = bucket.key_mask  # [b, 1, 1, l] or None
        if isinstance(attention_mask, PackedMask):
            pattern = attention_mask.for_bucket(number, bucket)  # [b, 1, l, l]
            mask = pattern if mask is None else pattern & mask
        attended = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        outputs.append(attended.transpose(1, 2).reshape(bucket.slots, *attended.shape[1::2]))  # [b l, H, d]
    stream = torch.cat(outputs).index_select(0, rows.inverse)  # [T, H, d], in stream order
    return stream.unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)


# -- the packed call -----------------------------------------------------------------------------------


def _flash_varlen_available(model: nn.Module, device: torch.device) -> bool:
    """Whether transformers' padding-free flash-attn path can serve this call (CUDA, flash-attn installed,
    half-precision activations: flash kernels take fp16/bf16 only)."""
    if device.type != "cuda" or not getattr(model, "_supports_flash_attn", False):
        return False
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover - older transformers
        return False
    if not is_flash_attn_2_available():
        return False
    half = (torch.float16, torch.bfloat16)
    autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half
    return autocast or getattr(model, "dtype", None) in half


def attention_backend(model: nn.Module, device: torch.device) -> str:
    """The attention implementation a packed call uses: flash varlen where it can, else :data:`PACKED_ATTENTION`."""
    return "flash_attention_2" if _flash_varlen_available(model, device) else PACKED_ATTENTION


@contextlib.contextmanager
def packed_call(
    transformer: nn.Module,
    rows: PackedRows,
    padded_features: dict[str, Any],
    packed_inputs: dict[str, Any],
    backend: str = PACKED_ATTENTION,
) -> Iterator[None]:
    """While open, a call of the model that holds ``transformer`` (a Sentence-Transformers ``Transformer``
    module) on ``packed_inputs`` runs packed, and the modules after ``transformer`` see the padded batch:
    ``padded_features`` with ``token_embeddings`` unpacked to [B, L, D].

    The encoder's attention implementation is switched for the call and restored after it, also on error.
    """
    encoder = transformer.auto_model
    config = encoder.config
    previous = config._attn_implementation
    if backend == "flash_attention_2":  # transformers' own varlen path reads these keyword arguments
        packed_inputs.update(
            cu_seq_lens_q=rows.cu_seq_lens,
            cu_seq_lens_k=rows.cu_seq_lens,
            max_length_q=rows.max_length,
            max_length_k=rows.max_length,
        )
        packed_inputs.pop(PLAN_KWARG, None)
    stream_keys = set(packed_inputs)

    def unpack_output(module: nn.Module, args: tuple, output: dict[str, Any]) -> dict[str, Any]:
        if backend == PACKED_ATTENTION and rows.calls == 0 and rows.tokens:
            raise ignored_packed_attention(encoder)
        restored = dict(padded_features)
        for name, value in output.items():
            if name in stream_keys:
                continue  # the packed inputs: the padded ones stand in for them
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (1, rows.tokens):
                value = unpack(value, rows)  # token_embeddings: [1, T, D] -> [B, L, D]
            elif (
                isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value)
            ):
                value = type(value)(unpack(v, rows) if v.shape[:2] == (1, rows.tokens) else v for v in value)
            restored[name] = value
        return restored

    handle = transformer.register_forward_hook(unpack_output)
    config._attn_implementation = backend
    try:
        yield
    except TypeError as error:
        # A stock attention function handed our mask object fails before the hook can tell why (newer
        # transformers check the mask's type): say what happened instead.
        if backend == PACKED_ATTENTION and rows.calls == 0 and "PackedMask" in str(error):
            raise ignored_packed_attention(encoder) from error
        raise
    finally:
        config._attn_implementation = previous
        handle.remove()

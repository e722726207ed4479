"""The MLM head shared by encoder and decoder, and vocabulary-wide losses that never hold [N, V] at once.

Vocabulary-wide work dominates a small model's RetroMAE step (SPEC section 9: about 73% of the
reference's step). Two things keep it small here: the head runs only at positions that have a label,
and the projection + cross-entropy is fused and chunked (:class:`ChunkedLinearCrossEntropy`): each
chunk of rows computes its logits, its loss and its gradients at once, so neither the logits nor their
softmax are kept for backward. The same idea gives DupMAE's max-pooled bag-of-words loss
(:class:`ChunkedMaxPooledLogits`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from transformers.activations import get_activation

# Rows per chunk: keeps one chunk's logits near 2**22 floats (16 MiB) whatever the vocabulary size
# (137 rows at 30,522 entries). A chunk also needs logsumexp's temporary of the same size; 2**25 (128 MiB)
# cost 0.07 GiB more peak RSS at BERT-base size (benchmarks/results/memory_base128.md).
_CHUNK_ELEMENTS = 2**22
# On CUDA one chunk of 137 rows is too little work per kernel: ~10 small launches per chunk and its
# [V, D] gradient update keep the GPU waiting on the launching thread (measured on an H200:
# benchmarks/results/gpu_throughput.md). 2**26 floats (256 MiB of fp32 logits, 2,198 rows at 30,522
# entries) gives each product thousands of rows at a memory cost a GPU does not notice.
_CHUNK_ELEMENTS_CUDA = 2**26


def default_chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk of the vocabulary-wide cross-entropy on this device type (see the constants)."""
    elements = _CHUNK_ELEMENTS_CUDA if device_type == "cuda" else _CHUNK_ELEMENTS
    return max(64, elements // max(vocab_size, 1))


def join_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [N_p, D], labels [N_p]) parts -> (states [N, D], labels [N]), rows in order; one part as is."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([states for states, _ in parts]), torch.cat([labels for _, labels in parts])


def grad_w_in_compute_dtype(device_type: str) -> bool:
    """Whether :class:`ChunkedLinearCrossEntropy` forms each chunk's d/dW in the compute dtype (CUDA) or
    in fp32 (CPU); see its docstring."""
    return device_type == "cuda"


def vocab_padding(device_type: str, vocab_size: int) -> int:
    """Never-predicted entries :class:`ChunkedLinearCrossEntropy` appends to the vocabulary on CUDA, so
    its products have a multiple of 64 columns: cuBLAS runs an odd width such as BERT's 30,522 on slower
    kernels (sm80 CUTLASS instead of Hopper's, on an H200: ``benchmarks/results/gpu_throughput.md``).
    None on the CPU, where the table would be copied only for this."""
    return -vocab_size % 64 if device_type == "cuda" else 0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run x's matrix products in (x's own dtype outside autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class MLMHead(nn.Module):
    """BERT's prediction head: transform (dense, activation, layer norm), then the vocab projection.

    The projection weight is the encoder's input embedding table (tied, passed in at call time so the
    head never owns or saves a copy of it); the head owns the transform and the output bias.

    A fresh head is initialised as BERT initialises one (``initializer_range``: normal weights of that
    std, zero biases, layer norm 1/0); :func:`pretrained_head_state` finds a checkpoint's own head to
    start from instead.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        activation: str = "gelu",
        eps: float = 1e-12,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = get_activation(activation)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.reset_parameters(initializer_range)

    def reset_parameters(self, initializer_range: float = 0.02) -> None:
        """BERT's initialisation (``BertPreTrainedModel._init_weights``); PyTorch's default for ``dense``
        (Kaiming uniform) is several times larger than what the encoder's own layers were trained from."""
        with torch.no_grad():
            self.dense.weight.normal_(0.0, initializer_range)
            self.dense.bias.zero_()
            self.layer_norm.weight.fill_(1.0)
            self.layer_norm.bias.zero_()
            self.bias.zero_()

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]: everything before the vocabulary projection."""
        return self.layer_norm(self.activation(self.dense(hidden)))

    def loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, embedding_weight: torch.Tensor, chunk_rows: int
    ) -> torch.Tensor:
        """Mean cross-entropy over the labelled rows. hidden [N, D], labels [N] (all valid)."""
        return self.losses([(hidden, labels)], embedding_weight, chunk_rows, joint=False)[0]

    def losses(
        self,
        parts: list[tuple[torch.Tensor, torch.Tensor]],
        embedding_weight: torch.Tensor,
        chunk_rows: int,
        joint: bool = True,
    ) -> list[torch.Tensor]:
        """One mean cross-entropy per (hidden [N_p, D], labels [N_p]) part, each over its own rows.

        ``joint``: all parts in one :class:`ChunkedLinearCrossEntropy` call (one [V, D] gradient buffer for
        all of them); otherwise one call per part."""
        bias = self.bias
        if not torch.is_grad_enabled():
            # Under no_grad (diagnostics, evaluation) the fused function would still form every gradient:
            # a custom Function sees its inputs' requires_grad, not the grad mode.
            parts = [(hidden.detach(), labels) for hidden, labels in parts]
            embedding_weight, bias = embedding_weight.detach(), bias.detach()
        if sum(labels.numel() for _, labels in parts) == 0 or not joint:
            return [
                self._one_loss(hidden, labels, embedding_weight, bias, chunk_rows) for hidden, labels in parts
            ]
        hidden, labels = join_rows(parts)  # [N, D], [N]
        sizes = tuple(part_labels.numel() for _, part_labels in parts)
        means = ChunkedLinearCrossEntropy.apply(
            self.transform(hidden), embedding_weight, bias, labels, chunk_rows, sizes
        )  # [P]
        # Single-index views (not unbind's), so a caller may still scale one in place (loss *= w).
        return [means[part] for part in range(len(sizes))]

    def _one_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        embedding_weight: torch.Tensor,
        bias: torch.Tensor,
        chunk_rows: int,
    ) -> torch.Tensor:
        if labels.numel() == 0:
            # No labelled token in this batch: a zero that still connects to the graph (DDP needs
            # every parameter to receive a gradient each step).
            return hidden.sum() * 0.0 + bias.sum() * 0.0
        return ChunkedLinearCrossEntropy.apply(
            self.transform(hidden), embedding_weight, bias, labels, chunk_rows
        )


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(x_i W^T + b, y_i), computed chunk by chunk with its gradients in the forward pass.

    Why hand-written: autograd would keep every chunk's [c, V] softmax alive until backward, so chunking
    alone saves no memory. Computing d/dx, d/dW, d/db while the chunk's logits exist (the "fused linear
    cross-entropy" of Liger-Kernel and others) keeps peak memory at one chunk and costs no extra matmul.

    Segments: with ``segments=(n_1, ..., n_P)`` the rows are P consecutive losses sharing the head (RetroMAE's
    encoder and decoder), and the result is their P means, [P]. One call forms one [V, D] d/dW for all of
    them instead of one per loss plus their sum: on a CPU each fresh [V, D] buffer costs page faults
    (~35 ms at BERT-base, ``benchmarks/README.md``). d/dW is formed for the losses' plain sum; when backward
    receives unequal weights for them (a caller weighting them differently), the smaller segments' d/dW
    are recomputed to correct it, so the result is exact either way.

    Precision: the two [c, D] x [D, V] products run in the compute dtype (bf16 under autocast, with the
    [V, D] table cast once per call rather than by autocast once per chunk and product); log-sum-exp and
    softmax in fp32, in place on the chunk's logits; d/dW is accumulated in fp32. On the CPU its product
    runs in fp32 too (a bf16 product per chunk would need a [V, D] bf16 temporary and an add of the same
    size: slower on an AMX Xeon); on CUDA it runs in the compute dtype and is added to the fp32 sum (an fp32
    product there runs at a tenth of the bf16 rate, and the [V, D] temporary is small beside a GPU's memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk_rows, segments=None):  # type: ignore[override]
        rows = labels.numel()
        sizes = (rows,) if segments is None else tuple(int(n) for n in segments)
        if sum(sizes) != rows:
            raise ValueError(f"segments {sizes} do not add up to the {rows} labelled rows")
        need_grad = any(ctx.needs_input_grad[:3])
        totals, grads = _chunked_pass(x, weight, bias, labels, sizes, chunk_rows, need_grad)
        ctx.grads = grads  # kept on ctx, not saved: backward scales them in place (no second [V, D])
        ctx.sizes, ctx.chunk_rows = sizes, chunk_rows
        ctx.save_for_backward(x, weight, bias, labels)  # for the rare unequal-weights correction only
        counts = torch.tensor(sizes, device=x.device)  # [P]
        means = totals / counts.clamp(min=1)  # [P]
        return means[0].clone() if segments is None else means  # a scalar of its own, not a view

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "ChunkedLinearCrossEntropy: backward ran twice (retain_graph); its gradients are consumed."
            )
        grad_x, grad_w, grad_b = ctx.grads  # grad_b: [P, V], one row per segment
        ctx.grads = None
        weights = grad_output.reshape(-1).float()  # [P]
        sizes = torch.tensor(ctx.sizes, device=grad_x.device)
        grad_x.mul_(weights.repeat_interleave(sizes).unsqueeze(1).to(grad_x.dtype))
        grad_b = (weights.unsqueeze(1) * grad_b).sum(dim=0).to(grad_b.dtype)
        # The gradient of the losses' plain sum is in grad_w; scale it by the largest segment's weight and
        # correct the others by recomputing their share (only when the weights differ: checked on the CPU
        # here, a sync on CUDA, where RetroMAELoss calls this once per loss instead).
        largest = max(range(len(ctx.sizes)), key=lambda part: ctx.sizes[part])
        scale = weights[largest]
        if weights.device.type != "cpu" or not bool((scale == 1).item()):
            grad_w.mul_(scale.to(grad_w.dtype))
        if len(ctx.sizes) > 1 and not bool((weights == scale).all()):
            x, weight, bias, labels = ctx.saved_tensors
            starts = [0, *itertools.accumulate(ctx.sizes)]
            for part, size in enumerate(ctx.sizes):
                if part == largest or size == 0 or bool(weights[part] == scale):
                    continue
                rows = slice(starts[part], starts[part] + size)
                _, (_, own_w, _) = _chunked_pass(
                    x[rows], weight, bias, labels[rows], (size,), ctx.chunk_rows, True
                )
                grad_w.add_(own_w, alpha=float(weights[part] - scale))
        return grad_x, grad_w, grad_b, None, None, None


def _chunked_pass(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    sizes: tuple[int, ...],
    chunk_rows: int,
    need_grad: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """One pass of :class:`ChunkedLinearCrossEntropy` over x [N, D] whose rows are consecutive segments of
    ``sizes``: the per-segment sums of cross-entropy [P], and (need_grad) d/dx [N, D], d/dW [V, D] and
    per-segment d/db [P, V] of the sum of the segments' means."""
    device, compute = x.device.type, compute_dtype(x)
    counts = torch.tensor(sizes, device=x.device)  # [P]
    row_weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)  # [N]: share of its mean
    ends = list(itertools.accumulate(sizes))
    bounds = list(zip([0, *ends[:-1]], ends))  # [first, last) rows of each segment
    segments = len(sizes)
    low_precision_grad_w = compute != torch.float32 and grad_w_in_compute_dtype(device)
    with torch.autocast(device, enabled=False):  # every cast below is explicit
        x_c, weight_c, bias_c = x.to(compute), weight.to(compute), bias.to(compute)  # [N, D] [V, D] [V]
        vocab, pad = weight.shape[0], vocab_padding(device, weight.shape[0])
        if pad:  # zero rows with a -inf bias: their logits are -inf, their probabilities 0
            weight_c = torch.cat([weight_c, weight_c.new_zeros(pad, weight_c.shape[1])])  # [V + p, D]
            bias_c = torch.cat([bias_c, bias_c.new_full((pad,), float("-inf"))])  # [V + p]
        totals = torch.zeros(segments, dtype=torch.float32, device=x.device)  # [P]
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight_c, dtype=torch.float32) if need_grad else None
        grad_b = (
            torch.zeros((segments, bias_c.shape[0]), dtype=torch.float32, device=x.device)
            if need_grad
            else None
        )
        for start in range(0, labels.numel(), chunk_rows):
            stop = min(start + chunk_rows, labels.numel())
            xc, yc = x_c[start:stop], labels[start:stop]
            # Segments are contiguous runs of rows: per-segment sums are sums over this chunk's slice of each.
            runs = [
                (part, slice(max(first, start) - start, min(last, stop) - start))
                for part, (first, last) in enumerate(bounds)
                if max(first, start) < min(last, stop)
            ]
            logits = torch.addmm(bias_c, xc, weight_c.t()).float()  # [c, V]
            target = logits.gather(1, yc.unsqueeze(1)).squeeze(1)  # [c]
            # log-sum-exp and softmax in place on the logits buffer (no [c, V] temporary).
            peak = logits.amax(dim=-1, keepdim=True)  # [c, 1]
            probs = logits.sub_(peak).exp_()  # [c, V], unnormalised
            norm = probs.sum(dim=-1, keepdim=True)  # [c, 1]
            row_loss = peak.squeeze(1) + norm.log().squeeze(1) - target  # [c]
            for part, rows in runs:
                totals[part] += row_loss[rows].sum()
            if need_grad:
                # d(sum_i w_i CE_i)/d logits = w_i (softmax - onehot).
                share = row_weight[start:stop].unsqueeze(1)  # [c, 1]
                probs.mul_(share / norm)
                probs[torch.arange(len(yc), device=yc.device), yc] -= share.squeeze(1)
                probs_c = probs.to(compute)
                grad_x[start:stop] = probs_c @ weight_c  # [c, D]
                if low_precision_grad_w:
                    grad_w += probs_c.t() @ xc  # [V, D] product in the compute dtype, fp32 sum
                else:
                    grad_w.addmm_(probs.t(), x[start:stop].float())
                for part, rows in runs:  # (an index_add_ of [c, V] rows is slower than these sums)
                    grad_b[part] += probs[rows].sum(dim=0)
    if not need_grad:
        return totals, None
    if pad:
        grad_w, grad_b = grad_w[:vocab], grad_b[:, :vocab]
    # grad_w unsliced where there is no padding: a view would keep its base alive, and autograd then adds
    # the lookups' sparse rows into a fresh copy instead of into it (see loss.sparse_lookup_gradients).
    return totals, (grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype))


class ChunkedMaxPooledLogits(torch.autograd.Function):
    """max over positions of (x W^T + b): [B, P, D] -> [B, V], without a [B, P, V] tensor.

    Positions where ``valid`` is False are excluded. Backward routes each (row, vocab) gradient to the
    position that held the maximum, again chunk by chunk over positions.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, valid, chunk_positions):  # type: ignore[override]
        batch, positions, _ = x.shape
        device, compute = x.device.type, compute_dtype(x)
        best = torch.full((batch, weight.shape[0]), float("-inf"), device=x.device)
        where = torch.zeros((batch, weight.shape[0]), dtype=torch.long, device=x.device)
        with torch.autocast(device, enabled=False):  # the table cast once, not by autocast per chunk
            x_c, weight_t, bias_f = x.to(compute), weight.t().to(compute), bias.float()  # [B, P, D] [D, V]
            for start in range(0, positions, chunk_positions):
                logits = torch.matmul(x_c[:, start : start + chunk_positions], weight_t).float()
                logits = logits + bias_f  # [B, c, V]
                logits.masked_fill_(~valid[:, start : start + chunk_positions].unsqueeze(-1), float("-inf"))
                chunk_best, chunk_where = logits.max(dim=1)  # [B, V]
                better = chunk_best > best
                best = torch.where(better, chunk_best, best)
                where = torch.where(better, chunk_where + start, where)
        ctx.save_for_backward(x, weight, where)
        ctx.chunk_positions = chunk_positions
        ctx.bias_dtype = bias.dtype
        return best

    @staticmethod
    def backward(ctx, grad_best):  # type: ignore[override]
        x, weight, where = ctx.saved_tensors
        batch, positions, _ = x.shape
        grad_x = torch.zeros_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, positions, ctx.chunk_positions):
            stop = min(start + ctx.chunk_positions, positions)
            span = torch.arange(start, stop, device=x.device).view(1, -1, 1)  # [1, c, 1]
            grad_logits = torch.where(where.unsqueeze(1) == span, grad_best.unsqueeze(1), 0.0)  # [B, c, V]
            grad_x[:, start:stop] = torch.matmul(grad_logits, weight.float()).to(x.dtype)
            grad_w += torch.einsum("bcv,bcd->vd", grad_logits, x[:, start:stop].float())
        return grad_x, grad_w.to(weight.dtype), grad_best.sum(dim=0).to(ctx.bias_dtype), None, None


def bag_of_words_loss(
    pooled_logits: torch.Tensor, input_ids: torch.Tensor, word_tokens: torch.Tensor
) -> torch.Tensor:
    """DupMAE: cross-entropy of softmax(pooled logits) against the uniform distribution over the distinct
    ids of each text. pooled_logits [B, V]; input_ids, word_tokens [B, L] (word_tokens: real, non-special).
    """
    log_probs = torch.log_softmax(pooled_logits, dim=-1)  # [B, V]
    target = torch.zeros_like(log_probs)
    target.scatter_(1, input_ids, word_tokens.to(target.dtype))  # 1 at every id present (duplicates collapse)
    counts = target.sum(dim=1).clamp(min=1.0)
    return -((log_probs * target).sum(dim=1) / counts).mean()


# Where each architecture's masked-LM checkpoint keeps its head, as MLMHead's names -> candidate checkpoint
# names (the first present wins). The vocab projection is tied to the word embeddings in every one of them,
# so only its bias is read.
PRETRAINED_HEADS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {  # BertForMaskedLM / BertForPreTraining
        "dense.weight": ("cls.predictions.transform.dense.weight",),
        "dense.bias": ("cls.predictions.transform.dense.bias",),
        # The original Google checkpoints (bert-base-uncased on the hub) still name these gamma / beta.
        "layer_norm.weight": (
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.gamma",
        ),
        "layer_norm.bias": (
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.beta",
        ),
        "bias": ("cls.predictions.bias", "cls.predictions.decoder.bias"),
    },
    "roberta": {  # RobertaForMaskedLM, XLMRobertaForMaskedLM, CamembertForMaskedLM
        "dense.weight": ("lm_head.dense.weight",),
        "dense.bias": ("lm_head.dense.bias",),
        "layer_norm.weight": ("lm_head.layer_norm.weight",),
        "layer_norm.bias": ("lm_head.layer_norm.bias",),
        "bias": ("lm_head.bias", "lm_head.decoder.bias"),
    },
    "distilbert": {  # DistilBertForMaskedLM
        "dense.weight": ("vocab_transform.weight",),
        "dense.bias": ("vocab_transform.bias",),
        "layer_norm.weight": ("vocab_layer_norm.weight",),
        "layer_norm.bias": ("vocab_layer_norm.bias",),
        "bias": ("vocab_projector.bias",),
    },
    "modernbert": {  # ModernBertForMaskedLM: dense and norm biases exist only with classifier/norm_bias
        "dense.weight": ("head.dense.weight",),
        "dense.bias": ("head.dense.bias",),
        "layer_norm.weight": ("head.norm.weight",),
        "layer_norm.bias": ("head.norm.bias",),
        "bias": ("decoder.bias",),
    },
    "electra": {  # ElectraForMaskedLM (the generator)
        "dense.weight": ("generator_predictions.dense.weight",),
        "dense.bias": ("generator_predictions.dense.bias",),
        "layer_norm.weight": ("generator_predictions.LayerNorm.weight",),
        "layer_norm.bias": ("generator_predictions.LayerNorm.bias",),
        "bias": ("generator_lm_head.bias",),
    },
}
# Parameters a checkpoint may leave out because its head has none (ModernBERT without biases): zero.
_OPTIONAL = ("dense.bias", "layer_norm.bias")


def pretrained_head_names() -> set[str]:
    """Every checkpoint tensor name :func:`pretrained_head_state` may read."""
    return {name for mapping in PRETRAINED_HEADS.values() for names in mapping.values() for name in names}


def pretrained_head_state(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str] | None:
    """MLMHead's state from a checkpoint's tensors, and which layout it was found in; None without a head.

    ``tensors``: checkpoint name -> tensor (only head names are needed); ``expected``: the head's own
    ``state_dict()``, whose shapes a found head must match (a different vocabulary or hidden size is no
    head for this model). The layout needs its dense weight, layer norm weight and output bias.
    """
    for layout, mapping in PRETRAINED_HEADS.items():
        state = {}
        for ours, candidates in mapping.items():
            found = next((tensors[name] for name in candidates if name in tensors), None)
            if found is None and ours in _OPTIONAL:
                found = torch.zeros_like(expected[ours])
            if found is None or tuple(found.shape) != tuple(expected[ours].shape):
                break
            state[ours] = found
        else:
            return state, layout
    return None

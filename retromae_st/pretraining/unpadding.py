"""Length groups: run one padded batch as a few sub-batches, each padded only to its own longest row.

A batch of texts of mixed length is padded to its longest text, and the encoder and decoder spend that
padding's compute (46-66% of a random batch of corpus windows, see ``benchmarks/``). RetroMAE's loss is a
sum of per-row terms (no in-batch negatives), so splitting the rows into groups of similar length and
trimming each group's padding changes nothing in the loss or its gradients, only the work. The trainer
still sees one batch of ``batch_size`` rows, one loss and one optimizer step.

How many groups: the split that minimises the estimated cost of the encoder (tokens x layers, plus the
attention term that grows with length), with a small charge per extra group for the fixed cost of a
forward call. A batch of equal lengths (packed windows, or a length-grouped sampler) stays one group.

Why hand-written: variable-length ("unpadded") attention kernels exist for CUDA only (flash-attn's
varlen path); this works on every device and every encoder architecture, through the stock model call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LengthGroup", "plan_length_groups", "select_rows"]

# Each group beyond the first must save at least this share of the one-group cost to be worth its call.
GROUP_CHARGE = 0.03
# Split points are searched among at most this many candidate boundaries (keeps planning ~0.1 ms).
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class LengthGroup:
    """Rows of the batch (indices into dim 0) and the padded length they need (a prefix of dim 1).

    ``rows`` is ``slice(None)`` when the group is the whole batch in its own order (no copy needed).
    """

    rows: torch.Tensor | slice  # [b] long, on the batch's device
    length: int
    size: int  # b


def plan_length_groups(
    attention_mask: torch.Tensor, max_groups: int, hidden_size: int = 768
) -> list[LengthGroup]:
    """Split a right-padded batch into at most ``max_groups`` groups of rows of similar length.

    attention_mask: [B, L], 1 at real tokens. Left-padded or gappy masks (where trimming the tail would
    drop real tokens) give one group holding every row at full length, as does ``max_groups <= 1``.
    """
    batch, width = attention_mask.shape
    lengths = attention_mask.long().sum(dim=1)  # [B]
    everything = [LengthGroup(slice(None), width, batch)]
    if max_groups <= 1 or batch <= 1:
        return everything
    positions = torch.arange(width, device=attention_mask.device)
    if not torch.equal(positions.unsqueeze(0) < lengths.unsqueeze(1), attention_mask.bool()):
        return everything  # not right-padded: a column prefix would not hold each row's tokens
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].cpu().numpy()
    bounds = _best_boundaries(sorted_lengths, max_groups, hidden_size)
    if len(bounds) == 2:
        return [LengthGroup(slice(None), max(int(sorted_lengths[0]), 1), batch)]
    return [
        LengthGroup(order[start:stop], max(int(sorted_lengths[start]), 1), stop - start)
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]


def _best_boundaries(sorted_lengths: np.ndarray, max_groups: int, hidden_size: int) -> list[int]:
    """Group boundaries (0 = b_0 < ... < b_k = B) over lengths sorted longest first, by dynamic programming.

    A group of rows [i, j) costs (j - i) * l_i * (1 + l_i / (6 * hidden)): per-token work of a transformer
    layer is ~24 D^2 FLOPs for the projections and ~4 L D for attention. Candidate boundaries are where
    the length changes (subsampled to :data:`MAX_CANDIDATES`).
    """
    batch = len(sorted_lengths)
    changes = np.flatnonzero(np.diff(sorted_lengths) != 0) + 1
    if len(changes) > MAX_CANDIDATES:
        changes = changes[np.linspace(0, len(changes) - 1, MAX_CANDIDATES).round().astype(int)]
    cands = np.unique(np.concatenate([[0], changes, [batch]]))  # [n]
    n = len(cands)
    lead = sorted_lengths[np.minimum(cands, batch - 1)].astype(np.float64)  # length of a group starting here
    per_row = lead * (1.0 + lead / (6.0 * hidden_size))
    # cost[i, j]: one group from cands[i] to cands[j] (j > i), inf otherwise.
    span = cands[None, :] - cands[:, None]
    cost = np.where(span > 0, span * per_row[:, None], np.inf)
    best = cost[0].copy()  # best[j]: cheapest cover of rows [0, cands[j]) with the groups so far
    back = [np.zeros(n, dtype=int)]
    one_group = best[-1]
    choice, choice_cost = 1, one_group
    for groups in range(2, min(max_groups, n - 1) + 1):
        total = best[:, None] + cost  # [i, j]: groups-1 groups up to i, then one group i..j
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(n)]
        charged = best[-1] + (groups - 1) * GROUP_CHARGE * one_group
        if charged < choice_cost:
            choice, choice_cost = groups, charged
    bounds, j = [batch], n - 1
    for groups in range(choice, 1, -1):
        j = back[groups - 1][j]
        bounds.append(int(cands[j]))
    return [0, *reversed(bounds)]


def select_rows(features: dict[str, torch.Tensor], group: LengthGroup, batch: int, width: int) -> dict:
    """The group's slice of a feature dict: [B, L, ...] tensors -> [b, length, ...], [B] -> [b]."""
    if isinstance(group.rows, slice) and group.length == width:
        return dict(features)
    out = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (batch, width):
            out[key] = value[group.rows, : group.length]
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            out[key] = value[group.rows]
        else:
            out[key] = value
    return out

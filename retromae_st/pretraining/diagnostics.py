"""Stage-1 diagnostics: is RetroMAE training the sentence embedding at all?

Two numbers, computed without gradients on one step's own batch and masks, every ``logging_steps``:

- ``h_gain``: the decoder's loss with every row's sentence embedding h swapped for another row's (a fixed
  derangement: :func:`derangement`) minus its loss with the true h, in nats. It is what h is worth to the
  decoder. Near 0 means the decoder rebuilds the text from its visible context alone and ignores h, so no
  useful gradient reaches the encoder through h: RetroMAE is then plain MLM.
- ``embedding_cosine``: the mean pairwise cosine of the batch's sentence embeddings (:func:`mean_pairwise_cosine`).
  Near 1 means collapse: every text gets nearly the same vector, whatever h_gain says.

Shapes: B batch, D hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

H_GAIN = "h_gain"
EMBEDDING_COSINE = "embedding_cosine"
DIAGNOSTIC_KEYS = (H_GAIN, EMBEDDING_COSINE)

# Below this many nats the decoder is not using h (a trained one gains whole nats per token).
H_GAIN_FLOOR = 0.05
# Share of max_steps after which a persistently small h_gain is worth a warning: before, the decoder and
# head may still be learning to read h at all. From scratch, [CLS] h_gain first rises after 150-200 of 600
# steps (benchmarks/results/cls_init.md), so a quarter of the run warned about runs that then worked.
H_GAIN_PATIENCE = 0.4


def derangement(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row indices [B] that send every row to a different row: row i takes row i+1's h (a roll by one).

    Fixed rather than random so the diagnostic's noise comes from the batch only. Needs B >= 2.
    """
    if batch < 2:
        raise ValueError(f"a derangement needs at least 2 rows, got {batch}.")
    return torch.roll(torch.arange(batch, device=device), shifts=-1)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the B(B-1) ordered pairs of distinct rows: [B, D] -> scalar. Needs B >= 2."""
    batch = embeddings.shape[0]
    if batch < 2:
        raise ValueError(f"a pairwise cosine needs at least 2 rows, got {batch}.")
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    gram = unit @ unit.t()  # [B, B]
    return (gram.sum() - gram.diagonal().sum()) / (batch * (batch - 1))


def is_logging_step(step: int, logging_steps: int, logging_first_step: bool = False) -> bool:
    """Whether the trainer logs after optimizer step ``step`` (1-based), with the ``steps`` strategy."""
    return (logging_steps > 0 and step % logging_steps == 0) or (logging_first_step and step == 1)


def h_gain_stalled(
    h_gains: Sequence[float],
    step: int,
    max_steps: int,
    floor: float = H_GAIN_FLOOR,
    patience: float = H_GAIN_PATIENCE,
) -> bool:
    """Whether h_gain has stayed below ``floor`` past ``patience`` of training.

    ``h_gains`` are the values logged so far, oldest first; each of the last three must be below ``floor``
    (one batch's value is noisy, and one that has just risen through the floor is not a stall). False
    before ``patience * max_steps`` steps or when ``max_steps`` is unknown (<= 0).
    """
    if max_steps <= 0 or step < patience * max_steps or not h_gains:
        return False
    return max(list(h_gains)[-3:]) < floor


def stalled_message(
    h_gain: float, cosine: float | None, step: int, max_steps: int, pooling: str | None = "cls"
) -> str:
    """The warning for :func:`h_gain_stalled`: what was measured and what to change for this ``pooling``."""
    collapse = (
        f" The sentence embeddings have also collapsed (mean pairwise cosine {cosine:.2f}): lower the learning "
        "rate or lengthen warmup."
        if cosine is not None and cosine > 0.9
        else ""
    )
    if pooling == "cls":
        advice = (
            "What made a from-scratch [CLS] learn where measured (benchmarks/results/cls_init.md): the "
            "presets' attention init (model.attention_init_gain: 1.0, the default; under BERT's init, null, "
            "[CLS] is the same vector for every text) and the stage-1 learning rate auto (1e-3 for retromae-tiny, "
            "5e-4 for retromae-small); "
            "h_gain then rises after the first few hundred steps. Otherwise train longer, raise "
            "decoder_mask_ratio, or pool by mean (model.pooling: mean)."
        )
    else:
        # Already a pooled vector over every token (an embedding model's own, or the quickstart's mean):
        # the CLS remedies do not apply.
        advice = (
            f"The decoder reads the model's {pooling or 'own'}-pooled sentence embedding; train longer or raise "
            "decoder_mask_ratio so that rebuilding the text needs h. Continuing a model saved without a "
            "masked-LM head, h_gain stays near 0 while the fresh head learns (head_warmup_steps)."
        )
    return (
        f"RetroMAE stage 1: h_gain is {h_gain:.3f} nats at step {step} of {max_steps}, so the decoder rebuilds "
        f"the text without the sentence embedding and RetroMAE is not training it (this is plain MLM). {advice}"
        f"{collapse}"
    )

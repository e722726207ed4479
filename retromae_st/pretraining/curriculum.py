"""Curricula for RetroMAE stage 1: a per-step schedule of the loss's knobs (mask ratios, the decoder's input).

From random initialisation the decoder learns to rebuild the text from its visible context before the
encoder has learned to write anything into [CLS]; the gradient into h then fades and [CLS] stays
collapsed. Starting the decoder's mask ratio near 1.0 (the decoder sees almost nothing but h, so only h
can help it) and annealing it to the target ratio keeps that gradient alive while the encoder learns.

A second schedule, which moved a from-scratch [CLS] more than the mask curriculum in stage 1 (4x the
h_gain at 300 steps) but not enough to matter in stage 2 at CPU budgets (benchmarks/results/cls_schedule.md): the
decoder reads a blend ``(1 - a) * h + a * mean(token states)``, ``a`` falling from ``mean_mix_start`` to 0
(``loss.mean_mix``). The mean differs between texts from the first step, so the decoder learns to read its
input; as ``a`` fades, the encoder has to carry the text in [CLS] itself.

:class:`MaskRatioCurriculum` is a ``TrainerCallback``: before every optimizer step it sets
``loss.decoder_mask_ratio`` (and optionally ``loss.encoder_mask_ratio`` and ``loss.mean_mix``), which
:class:`~retromae_st.pretraining.loss.RetroMAELoss` reads at each forward. Each is a linear ramp from
``start`` at step 0 to its target at step ``steps``, constant after; it depends only on the global step,
so resuming from a checkpoint continues the schedule exactly. :func:`retromae_st.pretraining.training.pretrain`
adds it (:meth:`MaskRatioCurriculum.from_loss`) when the loss's ``decoder_mask_start`` or ``mean_mix_start``
options are set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainerCallback

__all__ = ["LinearRamp", "MaskRatioCurriculum"]


@dataclass(frozen=True)
class LinearRamp:
    """A value that goes linearly from ``start`` (step 0) to ``end`` (step ``steps``), then stays at ``end``."""

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be a number in [0, 1].")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 0.")

    def at(self, step: int) -> float:
        """The value for the optimizer step that follows ``step`` completed steps."""
        if self.steps == 0 or step >= self.steps:
            return float(self.end)
        return float(self.start + (self.end - self.start) * max(step, 0) / self.steps)


class MaskRatioCurriculum(TrainerCallback):
    """Anneal a :class:`~retromae_st.pretraining.loss.RetroMAELoss`'s mask ratios over the first steps.

    Args:
        loss: the loss given to the trainer; its current ``decoder_mask_ratio`` / ``encoder_mask_ratio``
            are the ratios the ramps end at.
        decoder_start: the decoder mask ratio at step 0, in (0, 1] (1.0: every word hidden from every
            position, the decoder sees only h and the special tokens). None: no decoder schedule.
        decoder_steps: steps over which the decoder ratio goes from ``decoder_start`` to its target.
        encoder_start: the encoder mask ratio at step 0, in (0, 1). None: no encoder schedule.
        encoder_steps: steps over which the encoder ratio goes from ``encoder_start`` to its target.
        mean_mix_start: the weight of the mean-pooled token states in the decoder's input at step 0, in
            [0, 1]; it falls linearly to 0 over ``mean_mix_steps`` steps. None or 0: no blend.
        mean_mix_steps: steps over which that weight falls to 0.
    """

    def __init__(
        self,
        loss,
        decoder_start: float | None = None,
        decoder_steps: int = 0,
        encoder_start: float | None = None,
        encoder_steps: int = 0,
        mean_mix_start: float | None = None,
        mean_mix_steps: int = 0,
    ) -> None:
        self.loss = loss
        if decoder_start is not None and not (isinstance(decoder_start, (int, float)) and decoder_start > 0):
            raise ValueError(f"decoder_start={decoder_start!r} must be in (0, 1].")
        self.decoder = (
            LinearRamp(decoder_start, float(loss.decoder_mask_ratio), decoder_steps)
            if decoder_start is not None
            else None
        )
        if encoder_start is not None and not (
            isinstance(encoder_start, (int, float)) and encoder_start < 1.0
        ):
            raise ValueError(
                f"encoder_start={encoder_start!r} must be below 1 (the encoder must see something)."
            )
        self.encoder = (
            LinearRamp(encoder_start, float(loss.encoder_mask_ratio), encoder_steps)
            if encoder_start is not None
            else None
        )

        self.mean_mix = LinearRamp(mean_mix_start, 0.0, mean_mix_steps) if mean_mix_start else None

    @classmethod
    def from_loss(cls, loss) -> MaskRatioCurriculum | None:
        """The curriculum a loss's own options ask for (``decoder_mask_start``/``_steps``,
        ``mean_mix_start``/``_steps``), or None when they ask for none."""
        decoder_start = getattr(loss, "decoder_mask_start", None)
        mean_mix_start = getattr(loss, "mean_mix_start", 0.0) or None
        if decoder_start is None and mean_mix_start is None:
            return None
        return cls(
            loss,
            decoder_start=decoder_start,
            decoder_steps=getattr(loss, "decoder_mask_steps", 0),
            mean_mix_start=mean_mix_start,
            mean_mix_steps=getattr(loss, "mean_mix_steps", 0),
        )

    def apply(self, step: int) -> None:
        """Set the loss's ratios for the step after ``step`` completed steps."""
        if self.decoder is not None:
            self.loss.decoder_mask_ratio = self.decoder.at(step)
        if self.encoder is not None:
            self.loss.encoder_mask_ratio = self.encoder.at(step)
        if self.mean_mix is not None:
            self.loss.mean_mix = self.mean_mix.at(step)

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        # Leave the loss at its target ratios (what its saved config says).
        self.apply(math.inf)  # type: ignore[arg-type]

    def get_config_dict(self) -> dict:
        out = {}
        if self.decoder is not None:
            out["decoder_mask_start"], out["decoder_mask_steps"] = self.decoder.start, self.decoder.steps
        if self.encoder is not None:
            out["encoder_mask_start"], out["encoder_mask_steps"] = self.encoder.start, self.encoder.steps
        if self.mean_mix is not None:
            out["mean_mix_start"], out["mean_mix_steps"] = self.mean_mix.start, self.mean_mix.steps
        return out

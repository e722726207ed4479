"""The Sentence-Transformers trainer, reading the gradients once a step for their norm.

transformers 5's ``Trainer`` measures the model's gradient norm at every optimizer step just to log it, even
with its clipping turned off (``_get_grad_norm``: a norm and a multiplication by 1.0 over every gradient,
0.07 s of a BERT-base step on a 2-core CPU). RetroMAE training turns the trainer's clipping off and has
:class:`~retromae_st.pretraining.training.RetroMAETrainingCallback` measure, check and clip the joint norm of
the model's and the decoder's gradients; :class:`RetroMAETrainer` logs that norm instead of measuring another.
Everything else is the stock ``SentenceTransformerTrainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

from retromae_st.pretraining.training import RetroMAETrainingCallback


class RetroMAETrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` whose logged ``grad_norm`` is the RetroMAE callback's joint norm.

    Args:
        retromae_callback: the :class:`RetroMAETrainingCallback` among the trainer's callbacks.
        *args, **kwargs: those of ``SentenceTransformerTrainer``.

    The logged ``grad_norm`` is the norm of the model's and the decoder's gradients together, before clipping
    (the stock trainer logs the model's alone).
    """

    def __init__(self, *args: Any, retromae_callback: RetroMAETrainingCallback, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retromae_callback = retromae_callback

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: torch.Tensor | float | None = None):
        # fp16's grad scaler unscales the gradients inside the trainer's own norm pass, and DeepSpeed and
        # FSDP shard them: those keep the stock path (the callback then runs at on_pre_optimizer_step).
        if grad_norm is not None or self.args.fp16 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.retromae_callback.prepare_gradients(self.args, self.state, self.model)

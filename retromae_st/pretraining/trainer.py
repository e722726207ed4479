"""``RetroMAETrainer``: the Sentence-Transformers trainer for a :class:`RetroMAELoss`, callback included.

:class:`~retromae_st.pretraining.training.RetroMAETrainingCallback` handles the weights the loss owns (the
decoder and the head's transform): checkpoints, resume, clipping and multi-process sync. This trainer adds it
when ``callbacks`` has none, and reads the gradients once a step for their norm instead of twice:
transformers 5's ``Trainer`` measures the model's gradient norm at every optimizer step just to log it, even
with its own clipping turned off (``_get_grad_norm``: a norm and a multiplication by 1.0 over every
gradient), while the callback, which turns the trainer's clipping off, measures the joint norm of the
model's and the loss's gradients to check and clip them. This trainer logs the callback's norm. Everything
else is the stock ``SentenceTransformerTrainer``; the stock trainer with the callback trains identically.
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.training import RetroMAETrainingCallback


class RetroMAETrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` for RetroMAE pretraining.

    Args:
        *args: those of ``SentenceTransformerTrainer``.
        callbacks: the trainer's callbacks. When ``loss`` is a :class:`RetroMAELoss` and none of them is a
            :class:`RetroMAETrainingCallback`, one is added first.
        **kwargs: those of ``SentenceTransformerTrainer``.

    The logged ``grad_norm`` is the norm of the model's and the loss's gradients together, before clipping
    (the stock trainer logs the model's alone).

    Example:
        ::

            from datasets import Dataset
            from retromae_st import RetroMAELoss, RetroMAETrainer, build_model, train_wordpiece_tokenizer

            texts = ["the first document", "another unlabeled text", ...]
            model = build_model("retromae-small", train_wordpiece_tokenizer(texts, vocab_size=8000))
            loss = RetroMAELoss(model)
            trainer = RetroMAETrainer(model=model, train_dataset=Dataset.from_dict({"text": texts}), loss=loss)
            trainer.train()
    """

    def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        callbacks = list(callbacks or [])
        callback = next((c for c in callbacks if isinstance(c, RetroMAETrainingCallback)), None)
        if callback is None and isinstance(kwargs.get("loss"), RetroMAELoss):
            callback = RetroMAETrainingCallback(kwargs["loss"])
            callbacks.insert(0, callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.retromae_callback = callback

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: torch.Tensor | float | None = None):
        # fp16's grad scaler unscales the gradients inside the trainer's own norm pass, and DeepSpeed and
        # FSDP shard them: those keep the stock path (the callback then runs at on_pre_optimizer_step).
        stock = self.args.fp16 or self.is_deepspeed_enabled or self.is_fsdp_enabled
        if grad_norm is not None or self.retromae_callback is None or stock:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.retromae_callback.prepare_gradients(self.args, self.state, self.model)

"""``RetroMAELoss(compile=True)``: the step goes through torch.compile and gives the eager loss and gradients.

The masking stays eager (same draws from the same seed); dropout is set to 0 because compiled dropout
draws its own random numbers. Compiling even a tiny model takes tens of seconds on a loaded 2-core
machine, hence ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retromae_st.pretraining import masking
from retromae_st.pretraining.loss import RetroMAELoss

TEXTS = [
    "the package provides a library for parsing configuration files",
    "this module implements a fast database storage engine",
    "a python client for the network server protocol",
    "kernel driver",
]


def _no_dropout(loss: RetroMAELoss) -> None:
    for module in loss.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for layer in loss.decoder.layers:
        layer.attention.dropout = 0.0


def _step(
    loss: RetroMAELoss, features: dict[str, torch.Tensor]
) -> tuple[dict[str, float], list[torch.Tensor]]:
    loss.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    parts = loss([features])
    torch.stack(list(parts.values())).sum().backward()
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in loss.parameters()]
    return {name: value.item() for name, value in parts.items()}, grads


def test_masking_traces_with_dynamic_shapes():
    """The masking functions themselves compile (fullgraph, dynamic shapes): no ``generator=None`` keyword
    reaches ``torch.rand``, which dynamo cannot build fake tensors for."""
    special = torch.zeros(50, dtype=torch.bool)
    special[:5] = True
    tables = masking.VocabTables(special.clone().fill_(False), special, torch.arange(5, 50), 4, "wordpiece")

    def draw(ids, attention):
        words = masking.word_ids(ids, attention, tables)
        masked, labels = masking.encoder_mask(ids, words, tables, 0.3)
        return masked, labels, masking.decoder_visibility(words, attention, 0.5)

    torch._dynamo.reset()
    compiled = torch.compile(draw, fullgraph=True, dynamic=True, backend="eager")
    for length in (7, 9):
        ids = torch.randint(5, 50, (3, length))
        masked, labels, visible = compiled(ids, torch.ones(3, length, dtype=torch.long))
        assert masked.shape == labels.shape == (3, length) and visible.shape == (3, length, length)


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["enhanced"])
def test_compiled_loss_matches_eager(tiny_model, decoding):
    torch.manual_seed(0)
    loss = RetroMAELoss(tiny_model, decoding=decoding, max_length_groups=1)
    loss.callback_attached = True
    _no_dropout(loss)
    loss.train()
    features = {k: v for k, v in tiny_model.preprocess(TEXTS).items() if torch.is_tensor(v)}

    eager_losses, eager_grads = _step(loss, features)
    torch._dynamo.reset()
    loss.compile = True
    compiled_losses, compiled_grads = _step(loss, features)
    assert set(loss._compiled) == {"encoder", decoding}  # the compiled path really ran

    assert compiled_losses.keys() == eager_losses.keys()
    for name in eager_losses:
        assert compiled_losses[name] == pytest.approx(eager_losses[name], rel=1e-4, abs=1e-5), name
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert (eager is None) == (compiled is None)
        if eager is not None:
            torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)
    assert loss.get_config_dict()["compile"] is True

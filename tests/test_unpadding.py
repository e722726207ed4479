"""Length groups: a mixed-length batch split into sub-batches gives the whole batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_texts

from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.unpadding import plan_length_groups, select_rows


def right_padded(lengths: list[int], width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


def padded_cost(groups) -> int:
    return sum(group.size * group.length for group in groups)


def test_groups_cover_every_row_once_and_cut_padding():
    lengths = [120, 118, 64, 60, 12, 10, 9, 8]
    mask = right_padded(lengths, width=128)
    groups = plan_length_groups(mask, max_groups=4, hidden_size=64)
    assert 1 < len(groups) <= 4
    rows = torch.cat([g.rows for g in groups]).tolist()
    assert sorted(rows) == list(range(len(lengths)))
    for group in groups:
        assert all(lengths[r] <= group.length for r in group.rows.tolist())
        assert group.length == max(lengths[r] for r in group.rows.tolist())  # no padding past the longest
    assert padded_cost(groups) < 0.6 * len(lengths) * 128


@pytest.mark.parametrize(
    ("mask", "max_groups"),
    [
        (right_padded([50, 20, 5]), 1),  # splitting turned off
        (right_padded([40] * 6), 4),  # equal lengths: nothing to gain
        (right_padded([40, 40, 39, 39]), 4),  # gains below the charge of an extra call
        (right_padded([50, 20, 5]).flip(1), 4),  # left padding: a column prefix would lose tokens
    ],
)
def test_one_group_when_splitting_cannot_help(mask, max_groups):
    groups = plan_length_groups(mask, max_groups=max_groups)
    assert len(groups) == 1 and groups[0].size == mask.shape[0]
    features = {"input_ids": torch.ones_like(mask), "attention_mask": mask}
    part = select_rows(features, groups[0], *mask.shape)
    assert all(torch.equal(part[k], features[k][:, : groups[0].length]) for k in features)


def test_select_rows_trims_rows_and_columns():
    mask = right_padded([30, 3, 28, 2])
    ids = torch.arange(4 * 30).view(4, 30)
    groups = plan_length_groups(mask, max_groups=2, hidden_size=64)
    short = min(groups, key=lambda g: g.length)
    part = select_rows({"input_ids": ids, "attention_mask": mask, "scores": torch.arange(4)}, short, 4, 30)
    assert sorted(short.rows.tolist()) == [1, 3] and short.length == 3
    assert torch.equal(part["input_ids"], ids[short.rows, :3])
    assert torch.equal(part["scores"], short.rows)


def _grads(loss: RetroMAELoss) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"decoding": "basic"}, {"bow_weight": 0.1}])
def test_grouped_step_equals_the_padded_step(tiny_model, options):
    """Same random draws, no dropout: splitting by length must not change the loss or any gradient."""
    texts = sorted(make_texts(16, seed=3), key=len)[::3] + ["index"]  # lengths from 3 to ~26 tokens
    features = {k: v for k, v in tiny_model.preprocess(texts).items() if torch.is_tensor(v)}
    results = []
    for groups in (1, 4):
        torch.manual_seed(0)
        loss = RetroMAELoss(tiny_model, max_length_groups=groups, **options)
        loss.eval()  # no dropout (masking still draws: it does not depend on the mode)
        tiny_model.zero_grad()
        torch.manual_seed(1)
        parts = loss([features])
        sum(parts.values()).backward()
        planned = plan_length_groups(features["attention_mask"], groups, 32)
        results.append(({k: v.item() for k, v in parts.items()}, _grads(loss), len(planned)))
    (padded, padded_grads, one), (grouped, grouped_grads, several) = results
    assert one == 1 and several > 1  # the batch really was split
    assert padded.keys() == grouped.keys()
    for name in padded:
        assert grouped[name] == pytest.approx(padded[name], rel=1e-5, abs=1e-6), name
    assert padded_grads.keys() == grouped_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(grouped_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_invalid_group_count_is_refused(tiny_model):
    with pytest.raises(ValueError, match="max_length_groups"):
        RetroMAELoss(tiny_model, max_length_groups=0)

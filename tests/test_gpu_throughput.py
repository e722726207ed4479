"""benchmarks/gpu_throughput.py: its configuration parser, FLOP count and A/B switches (no model built)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_throughput  # noqa: E402
from long_context import step_flops  # noqa: E402

from retromae_st.pretraining import heads  # noqa: E402
from retromae_st.pretraining import loss as loss_module  # noqa: E402


def test_configs_parse_and_bad_ones_are_named():
    parsed = gpu_throughput.parse_configs("full:512x32:packed,groups@nopad; natural:128x4:packed")
    assert parsed == [("full", 512, 32, ["packed", "groups@nopad"]), ("natural", 128, 4, ["packed"])]
    with pytest.raises(SystemExit, match="'padded'"):
        gpu_throughput.parse_configs("padded:512x8:packed")


def test_model_flops_count_each_row_at_its_own_length():
    """Padding costs nothing in the count: two rows of 100 and 300 tokens are the sum of the two alone."""
    shape = gpu_throughput.BASE
    dims = {"layers": 12, "hidden": 768, "intermediate": 3072}
    one = step_flops(100, dims, 30522, 0.3)["step"] + step_flops(300, dims, 30522, 0.3)["step"]
    assert gpu_throughput.model_flops([[0] * 100, [0] * 300], shape, 30522) == pytest.approx(one)
    assert gpu_throughput.model_flops([[0] * 300], shape, 30522) > 2.9 * gpu_throughput.model_flops(
        [[0] * 100], shape, 30522
    )


def test_ab_switches_change_the_policy_only_while_open():
    with gpu_throughput.cpu_head_policy():
        assert heads.default_chunk_rows(30522, "cuda") == heads.default_chunk_rows(30522, "cpu")
        assert not heads.grad_w_in_compute_dtype("cuda") and heads.vocab_padding("cuda", 30522) == 0
    assert heads.default_chunk_rows(30522, "cuda") > heads.default_chunk_rows(30522, "cpu")
    assert heads.grad_w_in_compute_dtype("cuda") and heads.vocab_padding("cuda", 30522) == 6
    free = lambda device: contextlib.nullcontext()  # noqa: E731
    with gpu_throughput.patched(loss_module, "attention_kernels", free):
        assert loss_module.attention_kernels is free
    assert not isinstance(loss_module.attention_kernels(torch.device("cuda")), contextlib.nullcontext)
    assert isinstance(loss_module.attention_kernels(torch.device("cpu")), contextlib.nullcontext)

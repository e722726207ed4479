"""benchmarks/long_context.py: bf16 is refused on a CPU that only emulates it, before any work is done."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from retromae_st.precision import CpuBf16Support

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "long_context.py"


@pytest.fixture(scope="module")
def long_context():
    spec = importlib.util.spec_from_file_location("long_context_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bf16_refusal_rules(long_context):
    refuse = long_context.bf16_refusal
    assert refuse("fp32", force=False, native=False, describe="x") is None
    assert refuse("bf16", force=False, native=True, describe="x") is None
    assert refuse("bf16", force=True, native=False, describe="x") is None
    message = refuse("bf16", force=False, native=False, describe="EPYC (AVX2; no AVX512-BF16)")
    assert "EPYC (AVX2; no AVX512-BF16)" in message and "--force" in message and "fp32" in message


def test_main_refuses_emulated_bf16_before_any_work(long_context, monkeypatch, tmp_path):
    import retromae_st.precision as precision

    emulated = CpuBf16Support(native=False, capability="AVX2", features=())
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: emulated)
    with pytest.raises(SystemExit, match="refusing --precision bf16"):
        long_context.main(["--precision", "bf16", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was measured or written


def test_flop_count_grows_quadratically_in_attention(long_context):
    shape = long_context.BASE_SHAPE
    short = long_context.step_flops(1024, shape, 30522, encoder_ratio=0.3)
    long = long_context.step_flops(8192, shape, 30522, encoder_ratio=0.3)
    assert long["with_recompute"] > long["step"] > 8 * short["step"]  # L^2 attention: more than linear
    assert 15e12 < long["with_recompute"] < 30e12  # ~18 TFLOP: the figure the refusal message quotes

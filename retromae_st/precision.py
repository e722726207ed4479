"""bfloat16 on the machine at hand: detected, not assumed.

The transformers trainer refuses ``bf16=True`` without a bf16-capable accelerator ("Your setup doesn't
support bf16/gpu. You need to assign use_cpu ...") although CPU autocast runs bf16 everywhere. On a CPU
without native bf16 units (no AVX512-BF16, no AMX, no Arm BF16) it is emulated and usually *slower* than
fp32, so it runs with a warning instead of silently.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuBf16Support:
    """What this CPU offers for bfloat16 arithmetic."""

    native: bool  # bf16 matrix products run on bf16 hardware (AVX512-BF16, AMX or Arm BF16)
    capability: str  # torch's vector ISA level for its CPU kernels: "AVX2", "AVX512", "DEFAULT", ...
    features: tuple[str, ...]  # the bf16 features found, e.g. ("avx512_bf16", "amx")

    def describe(self) -> str:
        found = ", ".join(self.features) if self.features else "no AVX512-BF16, AMX or Arm BF16"
        return f"{platform.processor() or platform.machine()} ({self.capability}; {found})"


@functools.cache
def cpu_bf16_support() -> CpuBf16Support:
    """Detect whether this CPU computes bfloat16 natively (cached: the CPU does not change)."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    features = []
    # Private but stable probes of torch's own CPU feature detection (cpuinfo), the ones its kernels use.
    for feature, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            features.append(feature)
    if platform.machine().lower() in {"aarch64", "arm64"} and _arm_has_bf16():
        features.append("arm_bf16")
    return CpuBf16Support(native=bool(features), capability=capability, features=tuple(features))


def _arm_has_bf16() -> bool:
    # torch exports no probe for Arm BF16; Linux lists it among the CPU features.
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("Features") and " bf16" in f"{line} " for line in text.splitlines())


def accelerator_supports_bf16() -> bool:
    """The trainer's own test: is there an accelerator (CUDA, XPU, MPS, NPU, TPU...) that runs bf16?"""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def bf16_args(bf16: bool) -> dict[str, Any]:
    """Training arguments that make ``bf16=True`` run on this machine.

    With a bf16-capable accelerator: nothing to add. On a CPU-only machine: ``use_cpu=True``, so the trainer
    trains on the CPU under bf16 autocast, with a warning when the CPU has no native bf16. A CUDA GPU
    without bf16 (before Ampere) is refused rather than silently swapped for the CPU.
    """
    if not bf16 or accelerator_supports_bf16():
        return {}
    if torch.cuda.is_available():
        raise UserInputError(
            f"bf16: the GPU {torch.cuda.get_device_name()} does not support bfloat16; train without --bf16 "
            "(pretrain.bf16 / finetune.bf16: false), or with fp16 (pretrain.fp16) where offered."
        )
    support = cpu_bf16_support()
    if support.native:
        logger.info("bf16 on the CPU (%s): training under CPU autocast.", support.describe())
    else:
        logger.warning(
            "bf16 on a CPU without native bfloat16 (%s): it is emulated and usually slower than fp32; "
            "drop --bf16 (bf16: false) unless you need bf16 numerics.",
            support.describe(),
        )
    return {"use_cpu": True}

"""benchmarks/pretrain_throughput.py's FLOP count: ours counted as it runs (packed encoder where it packs)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pretrain_throughput import step_flops  # noqa: E402


def test_ours_flops_count_the_encoder_packed_where_it_packs():
    """retromae-small (hidden 256) packs on the CPU: its encoder is counted on each row's own length, less
    than the length groups' padded work on ragged rows and the same on rows of one length; ``ours-groups``
    and the 2x128 tiny preset (which does not pack) count length groups; the reference pads every row."""
    ragged = [list(range(n)) for n in (9, 17, 40, 64, 101, 128)]
    even = [list(range(64))] * 6
    flops = {
        variant: step_flops(variant, "retromae-small", 30522, ragged) for variant in ("ours", "ours-groups")
    }
    assert flops["ours"] < flops["ours-groups"] < step_flops("reference", "retromae-small", 30522, ragged)
    assert step_flops("ours", "retromae-small", 30522, even) == step_flops(
        "ours-groups", "retromae-small", 30522, even
    )
    assert step_flops("ours", "retromae-tiny", 30522, ragged) == step_flops(
        "ours-groups", "retromae-tiny", 30522, ragged
    )
    assert step_flops("ours-packed", "retromae-tiny", 30522, ragged) < step_flops(
        "ours-groups", "retromae-tiny", 30522, ragged
    )

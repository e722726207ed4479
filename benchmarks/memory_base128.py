"""Benchmark: peak resident memory of a whole RetroMAE pretraining run (BERT-base shape, length 128).

Runs the real path, ``retromae_st.pretrain()`` (``SentenceTransformerTrainer`` + ``RetroMAELoss`` +
``PaddingCollator`` + ``LengthGroupedBatchSampler``, fused AdamW, logging-step diagnostics), for ``--steps``
optimizer steps on random token windows of the base shape (lengths uniform in [8, L], ids drawn from a
30,522-entry WordPiece vocabulary with word-continuation pieces), and reports the process's resident
memory: after the imports, after building the model and loss, at the end of every step, and the peak
(``VmHWM``). A whole run, not two steps: allocator fragmentation only shows after many steps of varying
batch shapes.

It also times every optimizer step and counts the process's minor page faults in it (``getrusage``): the
allocator decides both. A fresh mmap'd block, or heap memory glibc gave back to the system, is faulted in
and zero-filled by the kernel page by page on first touch. Peak RSS does not depend on the machine's load,
so a memory comparison can run on a busy machine; the step times need an idle one (``--threads 2``).
The allocator is the process's own: compare settings by running it under them, e.g.
``MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/memory_base128.py`` or
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/memory_base128.py``.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/memory_base128.py                     # 30 steps, base, L=128, B=8
    OMP_NUM_THREADS=1 python benchmarks/memory_base128.py --chunk-rows 1099   # the old CE chunk (2**25 floats)
    OMP_NUM_THREADS=1 python benchmarks/memory_base128.py --quick             # smoke run: tiny, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 5


def operator_table(profiler, top: int = 40) -> list[dict]:
    """The ``top`` operators by self CPU time, grouped by input shapes (seconds over the profiled steps)."""
    events = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes),
            "self_s": round(e.self_cpu_time_total / 1e6, 4),
            "calls": e.count,
        }
        for e in events[:top]
    ]


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident (``VmRSS``) or peak resident (``VmHWM``) memory in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def wordpiece_tokenizer(size: int):
    """A BERT tokenizer over a made-up WordPiece vocabulary of ``size`` entries: the specials, then
    words and ``##`` continuation pieces (a quarter), so whole-word masking sees multi-piece words."""
    from tokenizers import Tokenizer, models
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rest = size - len(specials)
    tokens = specials + [f"w{i}" for i in range(rest - rest // 4)] + [f"##p{i}" for i in range(rest // 4)]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="retromae-base")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument(
        "--chunk-rows", type=int, default=None, help="RetroMAELoss chunk_rows (default: its own)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="free text stored with the result (e.g. the allocator)")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: retromae-tiny, 3 steps")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many optimizer steps after the warm-up (torch.profiler, self CPU time per operator "
        "and input shapes, stored in the result); the profiler slows those steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps = "retromae-tiny", 3

    start_rss = rss_gib()
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from retromae_st.models import build_model
    from retromae_st.pretraining.training import pretrain

    torch.set_num_threads(args.threads)
    imports_rss = rss_gib()
    steps_rss: list[float] = []
    step_seconds: list[float] = []
    step_faults: list[int] = []
    started: list[tuple[float, int]] = []

    profiler = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        if args.profile_steps
        else None
    )

    class StepProfile(TrainerCallback):
        """Runs the profiler over ``--profile-steps`` optimizer steps, from the first after the warm-up."""

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                profiler.start()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS + args.profile_steps:
                profiler.stop()

    class StepMemory(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            started.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

        def on_step_end(self, *_args, **_kwargs):
            began_at, faults_at = started[-1]
            step_seconds.append(time.perf_counter() - began_at)
            step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_at)
            steps_rss.append(round(rss_gib(), 3))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = wordpiece_tokenizer(args.vocab_size)
        model = build_model(
            args.preset, tokenizer, max_seq_length=args.length, save_dir=folder / "init", seed=0
        )
        rng = np.random.default_rng(args.seed)
        rows = args.batch_size * args.steps
        lengths = rng.integers(8, args.length + 1, size=rows)
        first, last = 5, args.vocab_size  # ids past the specials
        windows = [
            [tokenizer.cls_token_id, *rng.integers(first, last, size=n - 2).tolist(), tokenizer.sep_token_id]
            for n in lengths
        ]
        dataset = Dataset.from_dict({"input_ids": windows})
        loss_kwargs = {"chunk_rows": args.chunk_rows} if args.chunk_rows else {}
        built_rss = rss_gib()
        began = time.time()
        pretrain(
            model,
            dataset,
            folder / "out",
            loss_kwargs=loss_kwargs,
            batch_size=args.batch_size,
            max_steps=args.steps,
            save_steps=10**6,
            logging_steps=10,
            seed=args.seed,
            callbacks=[StepMemory(), *([StepProfile()] if profiler else [])],
        )
    result = {
        "label": args.label,
        "preset": args.preset,
        "length": args.length,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "vocab_size": args.vocab_size,
        "chunk_rows": args.chunk_rows,
        "threads": args.threads,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "rss_start_gib": round(start_rss, 3),
        "rss_after_imports_gib": round(imports_rss, 3),
        "rss_after_build_gib": round(built_rss, 3),
        "rss_per_step_gib": steps_rss,
        "peak_rss_gib": round(rss_gib("VmHWM"), 3),
        "minutes": round((time.time() - began) / 60, 1),  # under load: not a speed figure
        # The first steps warm up (allocator, caches); the median of the rest, idle machine only.
        "step_s_median": round(statistics.median(step_seconds[WARMUP_STEPS:] or step_seconds), 4),
        "step_s": [round(x, 4) for x in step_seconds],
        "minor_faults_per_step_median": int(statistics.median(step_faults[WARMUP_STEPS:] or step_faults)),
        "minor_faults_per_step": step_faults,
        "profile": (
            {
                "steps": [WARMUP_STEPS + 1, WARMUP_STEPS + args.profile_steps],
                "self_s_total": round(sum(e.self_cpu_time_total for e in profiler.key_averages()) / 1e6, 3),
                "top_operators": operator_table(profiler),
            }
            if profiler
            else None
        ),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print("MEMORY " + json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: the passes over the gradients between backward and the optimizer step, on BERT-base's weights.

A RetroMAE step on the CPU reads every gradient a few times after backward, besides the optimizer: to check
that none is NaN or infinite, to clip them, and (transformers 5) to log their norm. Each pass reads 0.44 GB
at BERT-base, so it costs a noticeable share of a 3-5 s step on 2 cores. This times those passes alone, on
the 117M gradients of ``retromae-base`` and its RetroMAE decoder and head (random values, scaled to a
chosen total norm), in three ways:

- ``before``: what a step did up to 0b163b0: the trainer's norm pass for its log
  (``clip_grad_norm_(params, inf)``: a 2-norm and a x1.0 rescale), a max-norm finite check
  (``torch._foreach_norm(grads, inf)``) and ``clip_grad_norm_(params, 1.0)`` (a 2-norm and a rescale);
- ``stock trainer + callback``: the stock ``SentenceTransformerTrainer``'s norm pass, then
  :meth:`RetroMAETrainingCallback.prepare_gradients` (one 2-norm for the check and the clipping, the rescale
  only above the limit);
- ``RetroMAETrainer``: the callback's pass alone (what ``pretrain()`` runs).

Every variant runs at a total norm below the clipping limit (no rescale needed) and above it, interleaved,
repeated ``--repeats`` times; the median is reported. Steps in a whole run are noisier than these passes
(``results/grad_norm_passes_base128.md`` has both).

Example::

    OMP_NUM_THREADS=2 python benchmarks/grad_norm_passes.py --threads 2
    python benchmarks/grad_norm_passes.py --quick          # smoke run: retromae-tiny, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from retromae_st.models import build_model
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.training import RetroMAETrainingCallback

sys.path.insert(0, str(Path(__file__).parent))
from long_context import cpu_model  # noqa: E402  (lscpu's model name, family and model numbers)
from memory_base128 import wordpiece_tokenizer  # noqa: E402  (the benchmarks' made-up WordPiece vocabulary)


def set_gradients(parameters: list[torch.nn.Parameter], total_norm: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator)
    current = torch.nn.utils.get_total_norm([p.grad for p in parameters]).item()
    for p in parameters:
        p.grad.mul_(total_norm / current)


def before(model: torch.nn.Module, own: list[torch.nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the trainer's log norm
    params = list(model.parameters()) + own
    norms = torch._foreach_norm([p.grad for p in params], math.inf)  # the former finite check
    assert math.isfinite(torch.stack(norms).sum().item())
    torch.nn.utils.clip_grad_norm_(params, 1.0)


def stock_trainer_and_callback(model: torch.nn.Module, callback: RetroMAETrainingCallback) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    callback.prepare_gradients(None, None, model)


def retromae_trainer(model: torch.nn.Module, callback: RetroMAETrainingCallback) -> None:
    callback.prepare_gradients(None, None, model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="retromae-base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke run: retromae-tiny, 2 repeats")
    parser.add_argument("--name", default="grad_norm_passes_base")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.preset, args.repeats = "retromae-tiny", 2
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(
            args.preset, wordpiece_tokenizer(30522), max_seq_length=128, save_dir=folder, seed=0
        )
    loss = RetroMAELoss(model)
    callback = RetroMAETrainingCallback(loss)
    callback.max_grad_norm = 1.0  # what on_train_begin takes over from the trainer's arguments
    own = loss.own_parameters()
    parameters = list(model.parameters()) + own
    variants = {
        "before": lambda: before(model, own),
        "stock trainer + callback": lambda: stock_trainer_and_callback(model, callback),
        "RetroMAETrainer": lambda: retromae_trainer(model, callback),
    }
    times: dict[tuple[str, float], list[float]] = {(v, n): [] for v in variants for n in (0.5, 5.0)}
    for _ in range(args.repeats):
        for total_norm in (0.5, 5.0):
            for name, run in variants.items():
                set_gradients(parameters, total_norm)
                began = time.perf_counter()
                run()
                times[(name, total_norm)].append(time.perf_counter() - began)
    rows = [
        {
            "variant": v,
            "total_norm": n,
            "median_s": round(statistics.median(t), 4),
            "times_s": [round(x, 4) for x in t],
        }
        for (v, n), t in times.items()
    ]
    result = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "preset": args.preset,
        "gradients": sum(p.numel() for p in parameters),
        "repeats": args.repeats,
        "rows": rows,
    }
    lines = [
        f"# Passes over the gradients before the optimizer step ({result['gradients'] / 1e6:.1f}M gradients)",
        "",
        f"CPU: {result['cpu']['model_name']}, {args.threads} threads, torch {torch.__version__}; median of {args.repeats} "
        "interleaved repeats; clipping limit 1.0.",
        "",
        "| variant | total norm 0.5 (no rescale) | total norm 5.0 (rescaled) |",
        "|---|---|---|",
    ]
    for name in variants:
        below, above = (statistics.median(times[(name, n)]) for n in (0.5, 5.0))
        lines.append(f"| {name} | {below:.3f} s | {above:.3f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = Path(args.out)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()

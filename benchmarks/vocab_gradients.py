"""Benchmark: what the word-embedding table's [V, D] gradient buffers cost a CPU step, and the FLOP ceiling.

The table gets three gradients a step: the encoder's input lookup, the decoder's content-stream lookup and
the tied vocabulary head's d/dW (the encoder's and the decoder's losses). Each fresh [V, D] buffer (94 MB at
BERT-base) is zero-filled and page-faulted by the CPU, and autograd adds them up. Three changes cut them:

- ``joint head``: both MLM losses in one ``ChunkedLinearCrossEntropy`` call (one d/dW buffer, not two);
- ``sparse lookups``: the lookups give sparse gradients, to be added into the head's dense d/dW in place;
- ``head d/dW last``: the head reads the table through an identity node made before the lookups, so its
  dense d/dW reaches the table after their sparse rows. Autograd adds sparse rows into a dense sum in place
  only in that order; the other way round it forms each sum out of place (a fresh [V, D] copy each).

One model, one optimizer; every batch is stepped once by each variant, in a rotating order, so a slow phase
of the machine hits every variant alike; paired differences per batch against the previous behaviour (both
off). The switches are the library's own code paths, turned off here by patching (no user option).

It also prints the FLOP ceiling on the same batches: the reference behaviour's step FLOPs (the whole batch
padded to its longest row, both full-vocabulary heads at every position) over ours (from hidden size 256 the encoder
packed on the real tokens, the decoder in length groups, the heads at labelled positions only; both from
``pretrain_throughput.step_flops``): the speed ratio ours/reference if both ran at the same FLOP/s.

Examples::

    python benchmarks/vocab_gradients.py                          # base, L=128, B=8, 12 timed steps
    python benchmarks/vocab_gradients.py --size small --batch 32  # small, L=128
    python benchmarks/vocab_gradients.py --quick                  # smoke run: tiny, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import long_context  # noqa: E402
import pretrain_throughput as pt  # noqa: E402

from retromae_st.data.sources import load_texts  # noqa: E402
from retromae_st.pretraining import heads  # noqa: E402
from retromae_st.pretraining import loss as loss_module  # noqa: E402

logger = logging.getLogger("vocab_gradients")
VARIANTS = {  # name: (joint head call, sparse lookups, head d/dW last)
    "all three (default)": (True, True, True),
    "joint + sparse, head d/dW first": (True, True, False),
    "joint head only": (True, False, False),
    "none (before)": (False, False, False),
}
BEFORE = "none (before)"
# The default, and the previous release's default (sparse lookups with the head's d/dW arriving first):
# the A/B of the arrival order alone, reported beside the table.
DEFAULT, PREVIOUS_DEFAULT = "all three (default)", "joint + sparse, head d/dW first"


class _Identity:
    """Stands in for ``loss._ArrivesLast`` when the head's d/dW is to arrive first (no identity node)."""

    @staticmethod
    def apply(weight: torch.Tensor) -> torch.Tensor:
        return weight


@contextlib.contextmanager
def switches(use_joint: bool, use_sparse: bool, head_last: bool):
    """The library's three code paths, each on or off for one step."""
    original_losses, original_sparse = heads.MLMHead.losses, loss_module.sparse_lookup_gradients
    original_last = loss_module._ArrivesLast

    def losses(self, parts, weight, chunk_rows, joint=True):  # type: ignore[no-untyped-def]
        return original_losses(self, parts, weight, chunk_rows, use_joint and joint)

    heads.MLMHead.losses = losses
    loss_module.sparse_lookup_gradients = lambda table, enabled: original_sparse(
        table, enabled and use_sparse
    )
    loss_module._ArrivesLast = original_last if head_last else _Identity
    try:
        yield
    finally:
        heads.MLMHead.losses, loss_module.sparse_lookup_gradients = original_losses, original_sparse
        loss_module._ArrivesLast = original_last


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    preset = pt.SIZES[args.size]
    dataset, _ = load_texts(args.corpus)
    texts = dataset["text"][: args.docs] if args.docs else dataset["text"]
    tokenizer = pt.train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
    windows = pt.load_windows(args.corpus, tokenizer, args.length, args.docs)
    batches = pt.schedule(windows, args.batch, args.warmup + args.steps, seed=args.seed)
    variant = pt.Variant("ours", preset, tokenizer, args.length, "cpu")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for index, rows in enumerate(batches):
        order = names[index % len(names) :] + names[: index % len(names)]  # rotate who goes first
        for name in order:
            with switches(*VARIANTS[name]):
                elapsed = variant.step(rows)
            if index >= args.warmup:
                times[name].append(elapsed)
        logger.info("step %d: %s", index, ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names if times[n]))
    timed = batches[args.warmup :]
    real = sum(len(r) for rows in timed for r in rows)
    vocab = len(tokenizer)
    reference = sum(pt.step_flops("reference", preset, vocab, rows) for rows in timed)
    ours = sum(pt.step_flops("ours", preset, vocab, rows) for rows in timed)
    results = {}
    for name, values in times.items():
        results[name] = {
            "s_per_step_mean": statistics.mean(values),
            "s_per_step_median": statistics.median(values),
            "real_tokens_per_s": real / sum(values),
            **paired(values, times[BEFORE], "before"),
        }
    cpu = long_context.cpu_model()
    return {
        "benchmark": "vocab_gradients",
        "command": "python " + " ".join(sys.argv),
        "environment": {
            "cpu": cpu,
            "threads": args.threads,
            "torch": torch.__version__,
            "matmul_peak_gflops": pt.matmul_peak("cpu"),
        },
        "config": {
            "size": args.size,
            "length": args.length,
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "vocab_size": vocab,
            "real_tokens_per_step": real / len(timed),
            "padding_share": 1 - real / sum(len(rows) * max(map(len, rows)) for rows in timed),
        },
        "flops_per_step": {"reference": reference / len(timed), "ours": ours / len(timed)},
        "flop_ceiling": reference / ours,
        "arrival_order": paired(times[DEFAULT], times[PREVIOUS_DEFAULT], "head_first"),
        "results": results,
    }


def paired(values: list[float], baseline: list[float], label: str) -> dict[str, float]:
    """Per-batch differences values - baseline (s/step): their mean, standard error, and how many are < 0."""
    diffs = [a - b for a, b in zip(values, baseline)]
    return {
        f"diff_vs_{label}_mean_s": statistics.mean(diffs),
        f"diff_vs_{label}_se_s": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0,
        f"faster_than_{label}_steps": sum(d < 0 for d in diffs),
    }


def markdown(report: dict[str, Any]) -> str:
    env, config = report["environment"], report["config"]
    cpu = env["cpu"]
    lines = [
        f"# The word-embedding table's gradient buffers: {config['size']}, L={config['length']}, "
        f"B={config['batch']}",
        "",
        f"CPU: {cpu.get('model_name')} (family {cpu.get('family', '?')}, model {cpu.get('model', '?')}), "
        f"{env['threads']} threads, torch {env['torch']}; dense matmul peak fp32 "
        f"{env['matmul_peak_gflops']['fp32']:.0f} GFLOP/s. {config['steps']} timed steps after "
        f"{config['warmup']} warm-up, each batch stepped by every variant in a rotating order; "
        f"{config['real_tokens_per_step']:.0f} real tokens a step, {100 * config['padding_share']:.0f}% padding.",
        "",
        "| variant | s/step mean (median) | real tok/s | vs before, s/step (SE) | faster steps |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['s_per_step_mean']:.3f} ({r['s_per_step_median']:.3f}) | "
            f"{r['real_tokens_per_s']:.0f} | {r['diff_vs_before_mean_s']:+.3f} ({r['diff_vs_before_se_s']:.3f}) | "
            f"{r['faster_than_before_steps']}/{config['steps']} |"
        )
    flops, order = report["flops_per_step"], report["arrival_order"]
    lines += [
        "",
        f"The head's d/dW arriving last, alone ({DEFAULT} against {PREVIOUS_DEFAULT}, paired per batch): "
        f"{order['diff_vs_head_first_mean_s']:+.3f} s/step (SE {order['diff_vs_head_first_se_s']:.3f}), "
        f"faster in {order['faster_than_head_first_steps']}/{config['steps']} steps.",
        "",
        f"FLOP ceiling on these batches: the reference behaviour's step is {flops['reference'] / 1e9:.0f} GFLOP, "
        f"ours {flops['ours'] / 1e9:.0f} GFLOP: **{report['flop_ceiling']:.2f}x**, the speed ratio if both ran "
        "at the same FLOP/s.",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", default=pt.DEFAULT_CORPUS, help="BEIR corpus.jsonl or any load_texts source"
    )
    parser.add_argument("--size", default="base", choices=sorted(pt.SIZES))
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny, 1 warm-up + 2 steps, 2,000 docs"
    )
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default vocab_gradients_<size>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.warmup, args.steps, args.docs = "tiny", 8, 1, 2, args.docs or 2000
    args.name = args.name or f"vocab_gradients_{args.size}" + ("_quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retromae_st").setLevel(logging.WARNING)
    start = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

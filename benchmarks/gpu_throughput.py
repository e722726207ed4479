"""Benchmark: RetroMAE pretraining steps on a GPU in bf16: real tokens/s and model FLOP utilisation (MFU).

Issue #12, item 6: "where a GPU machine is available, run the benchmark in bf16 at base L=512 and L=8192
and report tokens/s and model FLOP utilisation" (target: >= 40% bf16 MFU at base L=512). Each configuration
builds a from-scratch BERT with base-sized layers (12 x 768, 12 heads, feed-forward 3072, a 30,522-entry
WordPiece vocabulary: what the corpus supports, padded with never-seen ``[unusedN]`` entries as BERT's),
wraps it in ``RetroMAELoss`` (its defaults: enhanced decoding, one decoder layer) and times full
training steps as ``pretrain_throughput.Variant`` runs them:
collate, host-to-device copy, forward and backward under ``torch.autocast("cuda", bfloat16)``, gradient
clipping and fused AdamW, with ``torch.cuda.synchronize()`` around each step.

Rows: ``full`` windows are the corpus packed into rows of exactly L tokens (``tokenize_corpus(pack=True)``,
no padding: the usual MFU setting); ``natural`` windows are each document cut to at most L tokens (mixed
lengths: what packing and length groups are for). Variants: ``ours-packed`` (``packed=True``: the encoder
on real tokens only), ``ours-groups`` (``packed=False``: length groups), ``ours-compile``
(``compile=True``), and ``reference``, ``pretrain_throughput.py``'s in-process re-implementation of
FlagEmbedding's step (eager attention, full-vocabulary logits everywhere; not the real reference code).

A variant may carry one A/B switch after ``@``: ``cpuheads`` (the vocabulary cross-entropy as on the
CPU), ``nopad`` (no vocabulary padding to a multiple of 64), ``cudnn`` (SDPA may pick cuDNN's attention),
``nocudnn`` (cuDNN excluded around the whole run). ``--profile`` adds a ``torch.profiler`` table of two
more steps per variant.

MFU = model FLOPs per step / step time / peak. Model FLOPs are counted analytically on each row's real
tokens only (``long_context.step_flops``: projections, feed-forward and attention of every encoder layer
and the decoder layer, the two heads on their labelled positions, x3 for forward + backward): the work a
padding-free step must do, whatever a variant really computes. The peak is the bf16 matrix-product rate
measured here at the start (8192^3, median of 10), and the datasheet's 989 TFLOP/s (H100/H200 SXM dense
bf16) is given beside it.

Writes ``<output-dir>/<name>.json`` and ``<name>.md`` after every configuration (a run cut short keeps
what it measured). The corpus defaults to ``python-docs`` (the docstrings and pydoc topics of the running
Python, as the quickstart uses): it needs no data files on the GPU machine. Examples::

    python benchmarks/gpu_throughput.py --profile --steps 8              # results/gpu_throughput.md
    python benchmarks/gpu_throughput.py --configs "full:512x32:groups,reference,compile" --steps 20
    python benchmarks/gpu_throughput.py --quick                          # smoke run on any device
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context import step_flops  # noqa: E402
from pretrain_throughput import Variant, sync  # noqa: E402

from retromae_st.data.python_docs import python_docs_corpus  # noqa: E402
from retromae_st.data.sources import load_texts  # noqa: E402
from retromae_st.data.tokenize import tokenize_corpus  # noqa: E402
from retromae_st.io import atomic_write_json, atomic_write_text  # noqa: E402
from retromae_st.models import Preset, train_wordpiece_tokenizer  # noqa: E402
from retromae_st.pretraining import heads  # noqa: E402
from retromae_st.pretraining import loss as loss_module  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_throughput")

BASE = Preset(layers=12, hidden=768, heads=12, intermediate=3072)
QUICK = Preset(layers=2, hidden=128, heads=2, intermediate=512)
DATASHEET_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16
ENCODER_MASK_RATIO = 0.3  # RetroMAELoss's default encoder masking ratio (the share of labelled positions)
# What results/gpu_throughput.md measured (with --profile --steps 8): about 100 s on an H200.
DEFAULT_CONFIGS = (
    "full:512x32:groups,groups@nopad,groups@cudnn;natural:512x32:packed,groups;full:8192x4:packed;"
    "full:512x64:groups"
)


def parse_configs(text: str) -> list[tuple[str, int, int, list[str]]]:
    """``rows:LxB:variant,variant;...`` -> [(rows, L, B, variants)]."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        rows, shape, variants = part.split(":")
        length, batch = (int(x) for x in shape.split("x"))
        if rows not in ("full", "natural"):
            raise SystemExit(f"--configs: rows must be full or natural, not {rows!r} (in {part!r})")
        configs.append((rows, length, batch, variants.split(",")))
    return configs


def bf16_matmul_tflops(device: str, size: int = 8192, repeats: int = 10) -> float:
    """Median bf16 rate (TFLOP/s) of a size^3 matrix product on random data, timed between synchronizes."""
    if device != "cuda":
        size = 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def windows_for(texts: list[str], tokenizer, length: int, rows: str) -> list[list[int]]:
    dataset = Dataset.from_dict({"text": texts})
    windows, _ = tokenize_corpus(dataset, tokenizer, length, pack=rows == "full")
    return [list(map(int, ids)) for ids in windows["input_ids"]]


def batches_for(windows: list[list[int]], batch: int, steps: int, seed: int) -> list[list[list[int]]]:
    """``steps`` random batches of ``batch`` windows (with replacement across steps, not within one)."""
    rng = np.random.default_rng(seed)
    size = min(batch, len(windows))
    return [[windows[i] for i in rng.choice(len(windows), size=size, replace=False)] for _ in range(steps)]


def model_flops(rows: list[list[int]], shape: Preset, vocab: int) -> float:
    """Analytic FLOPs of one step on these rows' real tokens (see the module docstring)."""
    dims = {"layers": shape.layers, "hidden": shape.hidden, "intermediate": shape.intermediate}
    return sum(step_flops(len(row), dims, vocab, ENCODER_MASK_RATIO)["step"] for row in rows)


@contextlib.contextmanager
def cpu_head_policy():
    """``@cpuheads``: the vocabulary cross-entropy as on the CPU (16 MiB chunks, fp32 d/dW products), for
    an A/B in one sitting against the CUDA policy of ``retromae_st.pretraining.heads``."""
    saved = heads._CHUNK_ELEMENTS_CUDA, heads.grad_w_in_compute_dtype, heads.vocab_padding
    heads._CHUNK_ELEMENTS_CUDA = heads._CHUNK_ELEMENTS
    heads.grad_w_in_compute_dtype, heads.vocab_padding = (lambda device: False), (lambda device, vocab: 0)
    try:
        yield
    finally:
        heads._CHUNK_ELEMENTS_CUDA, heads.grad_w_in_compute_dtype, heads.vocab_padding = saved


@contextlib.contextmanager
def patched(module, name: str, value):
    """``module.name = value`` for the duration (the A/B options ``@nopad`` and ``@cudnn``)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def profile_steps(variant: Variant, batches: list[list[list[int]]], device: str) -> dict[str, Any]:
    """``torch.profiler`` over a few more steps: the busiest operators, and how much of the wall time the
    GPU was busy (the sum of its kernels' times; a low share means the host, not the GPU, sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        for rows in batches:
            variant.step(rows)
    wall = time.perf_counter() - began
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = (
        sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6 if device == "cuda" else None
    )
    return {
        "steps": len(batches),
        "wall_s": wall,
        "gpu_kernel_s": kernels,
        "gpu_busy_share": kernels / wall if kernels else None,
        "table": events.table(sort_by=key, row_limit=25, max_name_column_width=60),
    }


def run_variant(
    name: str,
    shape: Preset,
    tokenizer,
    length: int,
    batches: list[list[list[int]]],
    warmup: int,
    device: str,
    profile: bool = False,
) -> dict[str, Any]:
    """Build one variant, run ``warmup`` untimed then the rest timed; step times, tokens/s, MFU inputs."""
    preset = Preset(shape.layers, shape.hidden, shape.heads, shape.intermediate, max(length, 512))
    if name == "reference":
        from retromae_st.models import PRESETS

        if length > 512 or shape != BASE:
            return {"error": "the in-process reference runs at the base shape and L <= 512 only"}
        preset_name = next(k for k, v in PRESETS.items() if v == BASE)
        variant = Variant("reference", preset_name, tokenizer, length, device)
    else:
        variant = Variant(f"ours-{name}", preset, tokenizer, length, device)  # type: ignore[arg-type]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for rows in batches[:warmup]:
        variant.step(rows)
    warm_seconds = time.perf_counter() - began
    times = [variant.step(rows) for rows in batches[warmup:]]
    result = {
        "warmup_seconds": round(warm_seconds, 2),
        "s_per_step": times,
        "s_per_step_median": statistics.median(times),
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    if profile:
        result["profile"] = profile_steps(variant, batches[warmup : warmup + 2], device)
    if name == "packed" and hasattr(variant, "loss"):
        result["packing_refused"] = getattr(variant.loss, "packing_refused", None)
    del variant
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_config(
    rows_kind: str, length: int, batch: int, names: list[str], args, shape, tokenizer, texts, peak: float
) -> dict[str, Any]:
    windows = windows_for(texts, tokenizer, length, rows_kind)
    batches = batches_for(windows, batch, args.warmup + args.steps, args.seed)
    timed = batches[args.warmup :]
    real = sum(len(r) for rows in timed for r in rows)
    padded = sum(len(rows) * max(map(len, rows)) for rows in timed)
    flops = sum(model_flops(rows, shape, len(tokenizer)) for rows in timed)
    config = {
        "rows": rows_kind,
        "length": length,
        "batch_size": len(timed[0]),
        "windows": len(windows),
        "real_tokens_per_step": real / len(timed),
        "padding_share": 1 - real / padded,
        "model_tflop_per_step": flops / len(timed) / 1e12,
        "variants": {},
    }
    for name in names:
        logger.info("%s L=%d B=%d %s ...", rows_kind, length, batch, name)
        warmup = args.warmup + (args.compile_warmup if name.startswith("compile") else 0)
        runs = batches if warmup == args.warmup else batches[:warmup] + batches
        base, _, option = name.partition("@")
        # "@nocudnn": SDPA may not pick cuDNN's attention (it plans per new shape; an A/B for the GPU run).
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        if option == "cpuheads":
            context = cpu_head_policy()
        elif option == "nopad":  # the vocabulary products at the odd width 30,522
            context = patched(heads, "vocab_padding", lambda device, vocab: 0)
        elif option == "cudnn":  # SDPA free to pick cuDNN's attention, as before RetroMAELoss excluded it
            context = patched(loss_module, "attention_kernels", lambda device: contextlib.nullcontext())
        elif option == "nocudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            context = sdpa_kernel(backends)
        try:
            with context:
                result = run_variant(base, shape, tokenizer, length, runs, warmup, args.device, args.profile)
        except Exception as error:  # one failing variant must not lose the others' figures
            logger.exception("%s failed", name)
            result = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if "s_per_step" in result:
            total = sum(result["s_per_step"])
            result["real_tokens_per_s"] = real / total
            result["model_tflop_per_s"] = flops / total / 1e12
            result["mfu_measured_peak"] = flops / total / 1e12 / peak
            result["mfu_datasheet"] = flops / total / 1e12 / DATASHEET_BF16_TFLOPS
            logger.info(
                "  %.1f ms/step, %.0f real tok/s, MFU %.1f%% (measured peak)",
                1e3 * result["s_per_step_median"],
                result["real_tokens_per_s"],
                100 * result["mfu_measured_peak"],
            )
        config["variants"][name] = result
    return config


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU pretraining throughput ({report['label']})",
        "",
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"sentence-transformers {env['sentence_transformers']}, Python {env['python']}. "
        f"{'bf16 autocast' if report['autocast_bf16'] else 'fp32 (no autocast off CUDA)'}. "
        f"Shape {report['shape']}, vocabulary {report['vocab_size']} ({report['vocab_learnt']} learnt from the "
        f"corpus, the rest never-seen [unusedN] entries), corpus `{report['corpus']}` ({report['texts']} texts).",
        f"Measured bf16 matmul peak: {report['peak_bf16_tflops']:.0f} TFLOP/s (datasheet "
        f"{DATASHEET_BF16_TFLOPS:.0f}). {report['warmup']} warm-up + {report['steps']} timed steps per row; "
        "MFU = analytic model FLOPs on real tokens / time / peak.",
        "",
        "| rows | L | B | pad share | variant | ms/step (median) | real tok/s | model TFLOP/s | MFU (measured peak) "
        "| MFU (datasheet) | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["results"]:
        for name, v in c["variants"].items():
            head = f"| {c['rows']} | {c['length']} | {c['batch_size']} | {c['padding_share']:.0%} | {name} "
            if "error" in v:
                lines.append(head + f"| error: {v['error'][:120]} | | | | | |")
                continue
            peak = v.get("peak_cuda_gib")
            lines.append(
                head + f"| {1e3 * v['s_per_step_median']:.1f} | {v['real_tokens_per_s']:,.0f} "
                f"| {v['model_tflop_per_s']:.3g} | {v['mfu_measured_peak']:.1%} | {v['mfu_datasheet']:.1%} "
                f"| {'' if peak is None else f'{peak:.1f}'} |"
            )
    lines += ["", f"Command: `{report['command']}`", ""]
    for c in report["results"]:
        for name, v in c["variants"].items():
            if "profile" in v:
                p = v["profile"]
                share = (
                    ""
                    if p["gpu_busy_share"] is None
                    else f", GPU kernels busy {p['gpu_busy_share']:.0%} of it"
                )
                lines += [
                    f"## Profile: {c['rows']} L={c['length']} B={c['batch_size']} {name}",
                    "",
                    f"{p['steps']} steps in {p['wall_s']:.3f} s{share}.",
                    "",
                    "```",
                    p["table"],
                    "```",
                    "",
                ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=None, help="rows:LxB:variants;... (see the docstring)")
    parser.add_argument("--corpus", default="python-docs", help="python-docs, or any load_texts source")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-warmup", type=int, default=3, help="extra warm-up steps for compile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler table of 2 more steps per variant"
    )
    parser.add_argument("--quick", action="store_true", help="tiny layers, L<=256, 1+2 steps: a smoke run")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default gpu_throughput[_quick])")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.configs = args.configs or "full:128x4:packed,groups;natural:256x4:packed,groups,compile"
        args.warmup, args.steps, args.compile_warmup, args.vocab_size = 1, 2, 1, 2000
    args.configs = args.configs or DEFAULT_CONFIGS
    args.name = args.name or ("gpu_throughput_quick" if args.quick else "gpu_throughput")
    args.config_list = parse_configs(args.configs)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retromae_st").setLevel(logging.WARNING)
    import sentence_transformers
    import transformers

    shape = QUICK if args.quick else BASE
    texts = python_docs_corpus() if args.corpus == "python-docs" else load_texts(args.corpus)[0]["text"]
    started = time.perf_counter()
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
    learnt = len(tokenizer)
    if learnt < args.vocab_size:
        # A small corpus supports fewer entries (python-docs: ~8k). The heads' cost grows with the
        # vocabulary, so pad it to the asked size with never-seen entries, as BERT's [unused0..993].
        tokenizer.add_tokens([f"[unused{i}]" for i in range(args.vocab_size - learnt)])
    logger.info(
        "%d texts; tokenizer of %d entries in %.0fs",
        len(texts),
        len(tokenizer),
        time.perf_counter() - started,
    )
    peak = bf16_matmul_tflops(args.device)
    logger.info("bf16 matmul: %.0f TFLOP/s", peak)
    report: dict[str, Any] = {
        "benchmark": "gpu_throughput",
        "label": "quick smoke run" if args.quick else "full run",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "environment": {
            "device": torch.cuda.get_device_name(0)
            if args.device == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version(),
        },
        "shape": vars(shape) if hasattr(shape, "__dict__") else str(shape),
        "vocab_size": len(tokenizer),
        "vocab_learnt": learnt,
        "corpus": args.corpus,
        "texts": len(texts),
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_bf16_tflops": peak,
        "autocast_bf16": args.device == "cuda",  # pretrain_throughput.Variant: autocast on CUDA
        "results": [],
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rows_kind, length, batch, names in args.config_list:
        report["results"].append(
            run_config(rows_kind, length, batch, names, args, shape, tokenizer, texts, peak)
        )
        atomic_write_json(out / f"{args.name}.json", report)
        atomic_write_text(out / f"{args.name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

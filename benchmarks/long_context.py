"""Benchmark: RetroMAE training steps at long context (L=8192) with BERT-base-sized layers, on the CPU.

Issue #12, item 6: "one step at L=8192 with BERT-base-sized layers runs within 24 GiB on CPU in bf16
(batch 1, gradient checkpointing allowed)". This script measures it. It builds a from-scratch BERT with
base-sized layers (12 x 768, 12 heads, feed-forward 3072, the 30,522-entry WordPiece vocabulary that
``retromae_st.models.train_wordpiece_tokenizer`` learns from the corpus, ``max_position_embeddings = L``,
no attention dropout as the presets, so attention runs the fused SDPA kernel), wraps it in ``RetroMAELoss``
(its defaults: enhanced decoding, one decoder layer) and runs ``--steps`` full training steps (forward,
backward, gradient clipping, fused AdamW) through the project's real path, ``retromae_st.pretrain()``
(``SentenceTransformerTrainer`` + ``RetroMAETrainingCallback``; ``gradient_checkpointing=True`` turns on
the encoder's HF activation checkpointing), on batch 1 of real text: Debian package descriptions packed
into full windows of L tokens by ``tokenize_corpus(pack=True)``, one window per step.

Each configuration runs alone in a subprocess (so peaks do not mix) and reports seconds per step, the
process's peak resident memory (``VmHWM`` from ``/proc/self/status``: at the end of the last step, and for
the whole process including building the model and the final save), whether that stayed within 24 GiB,
how many times the first encoder layer's attention ran per step (2 with checkpointing: forward and
recompute; it shows that checkpointing is really on through the ST ``Transformer`` module and
``RetroMAELoss``), which SDPA kernel the decoder's [L, L] boolean mask selects, and an analytic FLOP count.

bf16: on a CPU without native bfloat16 (no AVX512-BF16, AMX or Arm BF16, detected by
``retromae_st.precision.cpu_bf16_support``), bf16 matrix products are emulated (measured at 1.3 GFLOP/s on
the 2-core AMD EPYC of ``benchmarks/README.md``, against 175 GFLOP/s for fp32), so one base step at L=8192
(~18 TFLOP) would take hours. ``--precision bf16`` is refused there unless ``--force``.

Writes ``<output-dir>/<name>.json`` (every figure, the full configuration, the command, the CPU and its
bf16 support) and ``<name>.md``. Examples::

    python benchmarks/long_context.py                          # fp32, L=8192, 2 steps, checkpointing, 1 thread
    python benchmarks/long_context.py --precision bf16         # on a CPU with native bf16 (else refused)
    python benchmarks/long_context.py --length 1024,8192 --no-checkpointing --threads 2
    python benchmarks/long_context.py --quick                  # smoke run: tiny layers, L=256, 1 step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = "/work/shared/data/debian-pkgs/corpus.jsonl"
LIMIT_GIB = 24.0  # the budget
# BERT-base-sized layers (the retromae-base preset's shape), with as many positions as the window needs.
BASE_SHAPE = {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072}
QUICK_SHAPE = {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512}


def rss_gib(field: str = "VmRSS", pid: int | str = "self") -> float:
    """Resident (``VmRSS``) or peak resident (``VmHWM``) memory of a process in GiB; NaN when unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_model() -> dict[str, str]:
    """The CPU as ``lscpu`` names it: model name, vendor, family and model numbers (AMD family 23 model 49
    is Zen 2). Falls back to ``platform.processor()`` when lscpu is missing."""
    info = {"model_name": platform.processor() or platform.machine()}
    fields = {"Model name": "model_name", "Vendor ID": "vendor", "CPU family": "family", "Model": "model"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in listing.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in fields and value.strip():
                info.setdefault(fields[key.strip()], value.strip())
                if key.strip() == "Model name":
                    info["model_name"] = value.strip()
    return info


def bf16_refusal(precision: str, force: bool, native: bool, describe: str) -> str | None:
    """Why this run must not start (bf16 asked on a CPU that only emulates it, without ``--force``), or None."""
    if precision != "bf16" or native or force:
        return None
    return (
        f"refusing --precision bf16: this CPU has no native bfloat16 ({describe}), so bf16 matrix products "
        "are emulated (about 1.3 GFLOP/s measured on such a CPU, against ~175 for fp32) and one BERT-base "
        "step at L=8192 (~18 TFLOP) would take hours. Run --precision fp32 here, run bf16 on a CPU with "
        "AVX512-BF16 / AMX / Arm BF16, or pass --force to run it anyway."
    )


def step_flops(length: int, shape: dict[str, int], vocab: int, encoder_ratio: float) -> dict[str, float]:
    """Analytic matmul FLOPs of one RetroMAE step on one window of ``length`` tokens.

    Per transformer layer, forward: ``2 L (4 D^2 + 2 D I)`` for the projections and feed-forward and
    ``4 L^2 D`` for attention (QK^T and AV); the decoder layer costs the same (queries from the query
    stream, keys and values from the content stream). Heads: the transform ``2 N D^2`` and the vocabulary
    projection ``2 N D V`` at N labelled positions (encoder: about ``encoder_ratio`` of the L - 2 text
    tokens; decoder: all L - 2). A step is 3x the forward (backward = 2x); activation checkpointing adds one
    more encoder forward (``with_recompute``).
    """
    d, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    layer = 2 * length * (4 * d * d + 2 * d * i) + 4 * length * length * d
    labelled = encoder_ratio * (length - 2) + (length - 2)
    heads = labelled * (2 * d * d + 2 * d * vocab)
    forward = (layers + 1) * layer + heads
    return {"step": 3 * forward, "with_recompute": 3 * forward + layers * layer}


# ----------------------------------------------------------------------------------------------------------
# Worker: one configuration in its own process
# ----------------------------------------------------------------------------------------------------------


def worker(spec_path: str) -> None:
    """Build the model and loss, run ``spec["steps"]`` training steps through ``pretrain()``, print RESULT."""
    spec = json.loads(Path(spec_path).read_text())
    rss_start = rss_gib()
    import torch
    from datasets import Dataset
    from torch.nn.attention import SDPBackend
    from transformers import BertTokenizerFast, TrainerCallback

    from retromae_st.models import Preset, build_model
    from retromae_st.pretraining.training import pretrain

    torch.set_num_threads(spec["threads"])
    rss_imports = rss_gib()
    length, shape = spec["length"], spec["shape"]
    tokenizer = BertTokenizerFast.from_pretrained(spec["tokenizer"])
    preset = Preset(
        layers=shape["layers"],
        hidden=shape["hidden"],
        heads=shape["heads"],
        intermediate=shape["intermediate"],
        max_positions=max(length, 512),
    )
    steps: list[dict[str, Any]] = []
    attention_calls = [0]
    losses: list[dict[str, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            attention_calls[0] = 0
            self.began = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            steps.append(
                {
                    "seconds": round(time.perf_counter() - self.began, 2),
                    "rss_gib": round(rss_gib(), 3),
                    "peak_rss_gib": round(rss_gib("VmHWM"), 3),
                    "encoder_layer0_attention_calls": attention_calls[0],
                }
            )
            print(f"STEP {json.dumps(steps[-1])}", flush=True)

        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "loss" in logs:
                keys = ("loss", "encoder_mlm", "decoder", "bow", "grad_norm")
                losses.append({k: round(float(logs[k]), 4) for k in keys if k in logs})

    with tempfile.TemporaryDirectory(prefix="long-context-") as tmp:
        folder = Path(tmp)
        model = build_model(preset, tokenizer, max_seq_length=length, save_dir=folder / "init", seed=0)
        encoder = model[0].auto_model
        # The attention module runs inside the checkpointed layer's forward: with checkpointing it runs
        # again in backward (the recompute), so its call count per step shows that checkpointing is on.
        encoder.encoder.layer[0].attention.register_forward_hook(
            lambda *_: attention_calls.__setitem__(0, attention_calls[0] + 1)
        )
        heads, head_dim = shape["heads"], shape["hidden"] // shape["heads"]
        probe = torch.empty(1, heads, length, head_dim)
        mask = torch.ones(1, 1, length, length, dtype=torch.bool)
        sdpa_decoder = SDPBackend(torch._fused_sdp_choice(probe, probe, probe, attn_mask=mask)).name
        del probe, mask
        dataset = Dataset.from_dict({"input_ids": spec["windows"]})
        rss_built = rss_gib()
        began = time.perf_counter()
        pretrain(
            model,
            dataset,
            folder / "out",
            batch_size=1,
            max_steps=len(spec["windows"]),
            warmup_ratio=0.0,
            save_steps=10**6,
            logging_steps=1,
            seed=spec["seed"],
            bf16=spec["precision"] == "bf16",
            gradient_checkpointing=spec["checkpointing"],
            callbacks=[Clock()],
            # The target is the CPU: keep an accelerator out of it where one exists.
            extra_args={"use_cpu": True} if torch.accelerator.is_available() else None,
        )
        minutes = (time.perf_counter() - began) / 60
    result = {
        "rss_start_gib": round(rss_start, 3),
        "rss_after_imports_gib": round(rss_imports, 3),
        "rss_after_build_gib": round(rss_built, 3),
        "steps": steps,
        "losses": losses,
        "peak_rss_steps_gib": steps[-1]["peak_rss_gib"] if steps else None,
        "peak_rss_process_gib": round(rss_gib("VmHWM"), 3),
        "minutes_pretrain_call": round(minutes, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing_on": bool(
            getattr(encoder, "is_activation_checkpointing", None)
            if hasattr(encoder, "is_activation_checkpointing")
            else getattr(encoder, "is_gradient_checkpointing", False)
        ),
        "attention_implementation": getattr(encoder.config, "_attn_implementation", None),
        "sdpa_kernel_decoder_mask": sdpa_decoder,
        "torch_threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(spec: dict[str, Any], kill_above_gib: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; poll its RSS (and stop it above ``kill_above_gib``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", handle.name]
    began = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    watched = {"max_rss_gib": 0.0, "killed": False}

    def watch() -> None:
        while process.poll() is None:
            current = rss_gib(pid=process.pid)
            if not math.isnan(current):
                watched["max_rss_gib"] = max(watched["max_rss_gib"], current)
                if kill_above_gib and current > kill_above_gib:
                    watched["killed"] = True
                    process.kill()
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result: dict[str, Any] = {}
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    process.wait()
    watcher.join(timeout=5)
    Path(handle.name).unlink(missing_ok=True)
    result.update(
        {
            "returncode": process.returncode,
            "wall_minutes": round((time.time() - began) / 60, 2),
            "max_rss_polled_gib": round(watched["max_rss_gib"], 3),
        }
    )
    if watched["killed"]:
        result["error"] = f"stopped: RSS went above --kill-above-gib {kill_above_gib}"
    elif process.returncode != 0:
        result["error"] = f"worker exited with {process.returncode} (-9: killed, e.g. out of memory)"
    return result


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--length", default="8192", help="window length L in tokens; a comma list runs each")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--force", action="store_true", help="run bf16 even on a CPU that only emulates it")
    parser.add_argument("--steps", type=int, default=2, help="training steps (one new window each)")
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="keep every encoder activation (no recompute)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no OpenMP spin-wait on a loaded machine)"
    )
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="BEIR corpus.jsonl or any load_texts source")
    parser.add_argument("--vocab-size", type=int, default=30522, help="WordPiece entries (bert-base size)")
    parser.add_argument(
        "--tokenizer-docs", type=int, default=None, help="train the tokenizer on the first N documents"
    )
    parser.add_argument("--window-docs", type=int, default=5000, help="documents packed into windows")
    parser.add_argument(
        "--kill-above-gib",
        type=float,
        default=0.0,
        help="stop a worker whose RSS exceeds this (protects a shared machine; 0: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny layers, L=256, 8k vocab, 1 step"
    )
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default long_context[_quick])")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = dict(BASE_SHAPE)
    if args.quick:
        args.shape = dict(QUICK_SHAPE)
        args.length = "256" if args.length == "8192" else args.length
        args.steps, args.vocab_size = 1, 8000
        args.tokenizer_docs, args.window_docs = args.tokenizer_docs or 3000, min(args.window_docs, 1000)
    try:
        args.lengths = [int(x) for x in str(args.length).split(",") if x]
    except ValueError:
        parser.error(f"--length {args.length!r}: use whole numbers, e.g. 8192 or 1024,8192")
    if not args.lengths or min(args.lengths) < 8:
        parser.error("--length: every length must be at least 8 tokens")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.name = args.name or ("long_context_quick" if args.quick else "long_context")
    return args


def load_windows(args: argparse.Namespace, tokenizer: Any, length: int) -> list[list[int]]:
    """``args.steps`` full windows of ``length`` tokens: consecutive documents packed by tokenize_corpus."""
    from datasets import Dataset

    from retromae_st.data.sources import load_texts
    from retromae_st.data.tokenize import tokenize_corpus

    dataset, _ = load_texts(args.corpus)
    texts = dataset["text"][: args.window_docs]
    windows, _ = tokenize_corpus(Dataset.from_dict({"text": texts}), tokenizer, length, pack=True)
    full = [list(map(int, ids)) for ids in windows["input_ids"] if len(ids) == length]
    if len(full) < args.steps:
        raise SystemExit(
            f"only {len(full)} full windows of {length} tokens in the first {args.window_docs} documents of "
            f"{args.corpus}: raise --window-docs or lower --steps."
        )
    return full[: args.steps]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import sentence_transformers
    import torch
    import transformers

    from retromae_st.precision import cpu_bf16_support

    support = cpu_bf16_support()
    memory = next(
        (
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        "0",
    )
    cpu = cpu_model()
    return {
        "cpu": cpu["model_name"],
        "cpu_lscpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "cpu_bf16_native": support.native,
        "cpu_bf16": support.describe(),
        "cpu_capability": support.capability,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def summarise(length: int, args: argparse.Namespace, raw: dict[str, Any], vocab: int) -> dict[str, Any]:
    steps = raw.get("steps", [])
    seconds = [s["seconds"] for s in steps]
    flops = step_flops(length, args.shape, vocab, encoder_ratio=0.3)
    work = flops["step"] if args.no_checkpointing else flops["with_recompute"]
    row = {
        "length": length,
        "precision": args.precision,
        "checkpointing": not args.no_checkpointing,
        "batch_size": 1,
        "threads": args.threads,
        "vocab_size": vocab,
        "steps_done": len(steps),
        "s_per_step": seconds,
        "s_per_step_mean": round(sum(seconds) / len(seconds), 1) if seconds else None,
        "s_per_step_last": seconds[-1] if seconds else None,
        "peak_rss_gib": raw.get("peak_rss_process_gib"),
        "within_24_gib": None,
        "analytic_tflop_per_step": round(flops["step"] / 1e12, 4),
        "analytic_tflop_per_step_with_recompute": round(work / 1e12, 4),
        **raw,
    }
    if row["peak_rss_gib"] is not None and "error" not in raw:
        row["within_24_gib"] = row["peak_rss_gib"] <= LIMIT_GIB
    if seconds:
        row["achieved_gflops_last_step"] = round(work / seconds[-1] / 1e9, 1)
    return row


def markdown(report: dict[str, Any]) -> str:
    env, config = report["environment"], report["config"]
    shape = config["shape"]
    lines = [
        f"# RetroMAE at long context: {shape['layers']} x {shape['hidden']} BERT layers, batch 1, "
        f"{config['precision']} ({config['label']})",
        "",
        f"Machine: {env['cpu']} (lscpu family {env['cpu_lscpu'].get('family', '?')}, model "
        f"{env['cpu_lscpu'].get('model', '?')}), {env['cores']} cores, {env['memory_gib']} GiB; native bf16: "
        f"{'yes' if env['cpu_bf16_native'] else 'no'} ({env['cpu_bf16']}); torch {env['torch']}, "
        f"transformers {env['transformers']}, sentence-transformers {env['sentence_transformers']}; "
        f"{env['threads']} torch thread(s); load average {env['load_average_start']} at the start, "
        f"{env.get('load_average_end')} at the end.",
        "",
        f"Model: from-scratch BERT, {shape['layers']} layers x {shape['hidden']}, {shape['heads']} heads, "
        f"feed-forward {shape['intermediate']}, corpus-trained WordPiece of {report['vocab_size']} entries, "
        "max_position_embeddings = max(L, 512); `RetroMAELoss` defaults (enhanced decoding, one decoder "
        "layer); `retromae_st.pretrain()` (fused AdamW, clipping), batch 1, one packed window of L real "
        "tokens (Debian package descriptions) per step, each configuration alone in a subprocess. Peak RSS "
        "is the worker's `VmHWM` (whole process: build, steps, final save).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| L | precision | checkpointing | steps | s/step (each) | peak RSS GiB | within 24 GiB | RSS after build "
        "| TFLOP/step (incl. recompute) | GFLOP/s | layer-0 attention calls/step | decoder SDPA kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        seconds = ", ".join(f"{s:.0f}" for s in row["s_per_step"]) or "-"
        within = {True: "**yes**", False: "**no**", None: "-"}[row["within_24_gib"]]
        calls = sorted({s["encoder_layer0_attention_calls"] for s in row.get("steps", [])})
        lines.append(
            f"| {row['length']} | {row['precision']} | {'on' if row['checkpointing'] else 'off'} | "
            f"{row['steps_done']} | {seconds} | {row['peak_rss_gib']} | {within} | "
            f"{row.get('rss_after_build_gib', '-')} | {row['analytic_tflop_per_step_with_recompute']:.3g} | "
            f"{row.get('achieved_gflops_last_step', '-')} | {', '.join(map(str, calls)) or '-'} | "
            f"{row.get('sdpa_kernel_decoder_mask', '-')} |"
        )
    for row in report["results"]:
        if "error" in row:
            lines += ["", f"L={row['length']}: {row['error']}."]
    if report.get("notes"):
        lines += ["", *[f"* {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def write(args: argparse.Namespace, results: list[dict[str, Any]], env: dict[str, Any], extra: dict) -> None:
    from retromae_st.io import atomic_write_json, atomic_write_text

    config = {k: v for k, v in vars(args).items() if k != "worker"}
    config["label"] = "quick smoke run" if args.quick else "full run"
    done = len(results) == len(args.lengths)
    if not done:
        config["label"] += f", INCOMPLETE ({len(results)} of {len(args.lengths)} lengths done)"
    report = {
        "benchmark": "long_context",
        "config": config,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "environment": env,
        "results": results,
        **extra,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{args.name}.json", report)
    atomic_write_text(out / f"{args.name}.md", markdown(report))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    from retromae_st.precision import cpu_bf16_support

    support = cpu_bf16_support()
    refusal = bf16_refusal(args.precision, args.force, support.native, support.describe())
    if refusal:
        raise SystemExit(refusal)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = environment(args)
    from retromae_st.data.sources import load_texts
    from retromae_st.models import train_wordpiece_tokenizer

    began = time.perf_counter()
    dataset, _ = load_texts(args.corpus)
    texts = dataset["text"][: args.tokenizer_docs] if args.tokenizer_docs else dataset["text"]
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
    notes = []
    if len(tokenizer) < args.vocab_size:
        notes.append(
            f"the corpus supports only {len(tokenizer)} WordPiece entries (asked {args.vocab_size})."
        )
    if args.precision == "bf16" and not support.native:
        notes.append("bf16 was forced on a CPU without native bf16: emulated, expect very slow steps.")
    extra = {"vocab_size": len(tokenizer), "tokenizer_seconds": round(time.perf_counter() - began, 1)}
    print(f"tokenizer: {len(tokenizer)} entries in {extra['tokenizer_seconds']} s", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="long-context-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for length in args.lengths:
            spec = {
                "tokenizer": tmp,
                "length": length,
                "shape": args.shape,
                "precision": args.precision,
                "checkpointing": not args.no_checkpointing,
                "threads": args.threads,
                "seed": args.seed,
                "windows": load_windows(args, tokenizer, length),
            }
            print(f"L={length}: {args.steps} step(s) in a subprocess", flush=True)
            raw = run_worker(spec, args.kill_above_gib)
            results.append(summarise(length, args, raw, len(tokenizer)))
            env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
            write(args, results, env, {**extra, "notes": notes})
    print((Path(args.output_dir) / f"{args.name}.md").read_text(), end="")


if __name__ == "__main__":
    main()

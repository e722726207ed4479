"""Benchmark: a stage-1 schedule under which a from-scratch model's [CLS] embedding learns (issue #11, item 3).

Per (arm, seed): build retromae-tiny from scratch (4k WordPiece trained on debian-pkgs), run stage 1 with
the arm's schedule, measure ``h_gain`` over steps, then the same MNRL stage 2 for every arm and nDCG@10 on
the debian-pkgs **dev** split (a fixed document subset holding every judged dev document).

``h_gain`` = decoder loss with the sentence embeddings rolled by one across the batch minus decoder loss
with the true ones: no grad, eval mode, the same encoder and decoder masks for both, on a fixed probe batch.
Above 0 means the decoder uses h, i.e. [CLS] carries text-specific information. It is reported at the
target decoder ratio 0.5 (``h_gain``) and at ratio 1.0 (``h_gain@1``: the decoder sees only h).

Arms (``<name>``: stage 1, pooling):

* ``none-cls``, ``none-mean``: no stage 1.
* ``retromae-cls``: plain RetroMAE (decoder mask 0.5 from step 0).
* ``dec<start>-<N>``: decoder-mask curriculum, ``start`` (e.g. 100 = 1.0) annealed linearly to 0.5 over N
  steps (:class:`retromae_st.pretraining.curriculum.MaskRatioCurriculum`).
* ``decfix<r>``: decoder mask fixed at r/100 for the whole stage 1.
* ``decw<w>-<N>``: decoder loss weight w annealed linearly to 1 over N steps.
* ``mlmwarm-<N>``: decoder loss weight 0 for N steps (an MLM warm-up), then 1.
* ``enc<start>-<N>``: encoder mask ratio start/100 annealed to 0.3 over N steps.
* ``mix<a>-<N>``: the decoder reads (1 - a_t) CLS + a_t mean-pooled tokens, a_t from a/100 to 0 over N steps.
* ``hbn``: the decoder reads h standardised across the batch (per dimension) during stage 1.
* ``init<g>``: the presets' scaled attention init at gain g/100 (``models.scale_attention_init``); without
  it every arm starts from BERT's init (std 0.02), as the first table's arms did.
* ``retromae-mean``: RetroMAE with mean pooling (the decoder reads the mean vector).
* ``lr<x>``: stage-1 learning rate x; ``s2lr<x>``: stage-2 learning rate x.
  Parts combine with ``+`` (e.g. ``retromae-cls+init100+lr1e-3``, ``none-cls+init100``).

Every run writes ``<work>/records/<arm>-s<seed>.json``; ``--report`` gathers them into
``benchmarks/results/<name>.{json,md}``. Examples::

    OMP_NUM_THREADS=1 python benchmarks/cls_schedule.py --arms retromae-cls,dec100-200 --seeds 0
    python benchmarks/cls_schedule.py --report
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import eval_set, evaluate, mean_cosine  # noqa: E402

from retromae_st.data.sources import load_texts  # noqa: E402
from retromae_st.data.tokenize import tokenize_corpus  # noqa: E402
from retromae_st.finetuning.pairs import load_pairs  # noqa: E402
from retromae_st.finetuning.train import finetune  # noqa: E402
from retromae_st.io import atomic_write_json, atomic_write_text  # noqa: E402
from retromae_st.models import build_model, load_encoder, train_wordpiece_tokenizer  # noqa: E402
from retromae_st.pretraining.curriculum import MaskRatioCurriculum  # noqa: E402
from retromae_st.pretraining.loss import RetroMAELoss  # noqa: E402
from retromae_st.pretraining.masking import (  # noqa: E402
    decoder_labels,
    decoder_visibility,
    encoder_mask,
    labelled_positions,
    word_ids,
)
from retromae_st.pretraining.training import pretrain  # noqa: E402

logger = logging.getLogger("benchmarks.cls_schedule")
DATA = Path("/work/shared/data/debian-pkgs")


class WeightedRetroMAELoss(RetroMAELoss):
    """RetroMAELoss with a per-step decoder loss weight (``decoder_weight``, set by a callback)."""

    decoder_weight = 1.0

    def forward(self, sentence_features, labels=None):  # type: ignore[override]
        losses = super().forward(sentence_features, labels)
        losses["decoder"] = losses["decoder"] * self.decoder_weight
        return losses


class DecoderWeightSchedule(TrainerCallback):
    def __init__(self, loss: WeightedRetroMAELoss, start: float, steps: int, hold: bool = False) -> None:
        self.loss, self.start, self.steps, self.hold = loss, start, steps, hold

    def weight(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.start if self.hold else self.start + (1.0 - self.start) * step / self.steps

    def on_step_begin(self, args, state, control, **kwargs):
        self.loss.decoder_weight = self.weight(state.global_step)


@torch.no_grad()
def h_gain(
    loss: RetroMAELoss, probe: dict[str, torch.Tensor], ratio: float, seed: int = 0
) -> dict[str, float]:
    """Decoder loss with h rolled by one across the batch minus with the true h (same masks, eval mode)."""
    was_training = loss.training
    loss.eval()
    try:
        generator = torch.Generator().manual_seed(seed)
        input_ids, attention_mask = probe["input_ids"], probe["attention_mask"]
        tables = loss.vocab_tables()
        words = word_ids(input_ids, attention_mask, tables)
        enc_ids, _ = encoder_mask(input_ids, words, tables, 0.3, generator)
        visible = decoder_visibility(words, attention_mask, ratio, generator)
        targets = decoder_labels(input_ids, attention_mask)
        h = loss.model({**probe, "input_ids": enc_ids})["sentence_embedding"]
        adapter = loss.encoder()

        content = adapter.content_stream(input_ids, probe.get("token_type_ids"))  # [B, L, D]

        def decoder_loss(sentence: torch.Tensor) -> float:
            states = loss._enhanced(adapter, content, sentence, visible)
            s, t = labelled_positions(states, targets)
            return float(loss.head.loss(s, t, adapter.word_embeddings.weight, loss.chunk_rows))

        true = decoder_loss(h)
        rolled = decoder_loss(h.roll(1, dims=0))
        # Spread of the unmasked [CLS] vectors across texts, relative to their norm.
        clean = loss.model(dict(probe))["token_embeddings"][
            :, 0
        ]  # the raw [CLS] vector, whatever the decoder reads
        spread = float((clean - clean.mean(0)).norm(dim=1).mean() / clean.norm(dim=1).mean())
        normed = torch.nn.functional.normalize(clean, dim=1)
        n = normed.shape[0]
        cos = float(((normed @ normed.T).sum() - n) / (n * (n - 1)))
        return {"h_gain": rolled - true, "dec_loss": true, "spread": spread, "mean_cos": cos}
    finally:
        loss.train(was_training)


class HGainProbe(TrainerCallback):
    """Measure h_gain (at ratios 0.5 and 1.0) at step 0 and every ``every`` steps."""

    def __init__(self, loss: RetroMAELoss, probe: dict[str, torch.Tensor], every: int) -> None:
        self.loss, self.probe, self.every = loss, probe, every
        self.history: list[dict[str, float]] = []

    mix = None

    def measure(self, step: int) -> None:
        alpha = self.mix.alpha if self.mix is not None else 0.0
        if self.mix is not None:
            self.mix.alpha = 0.0  # measure the [CLS] vector alone
        try:
            self._measure(step)
        finally:
            if self.mix is not None:
                self.mix.alpha = alpha

    def _measure(self, step: int) -> None:
        at_half = h_gain(self.loss, self.probe, 0.5)
        at_one = h_gain(self.loss, self.probe, 1.0)
        row = {"step": step, **at_half, "h_gain@1": at_one["h_gain"], "dec_loss@1": at_one["dec_loss"]}
        row["decoder_mask_ratio"] = self.loss.decoder_mask_ratio
        self.history.append(row)
        logger.info(
            "step %d h_gain %.4f h_gain@1 %.4f spread %.4f",
            step,
            row["h_gain"],
            row["h_gain@1"],
            row["spread"],
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.measure(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(state.global_step)


def parse_arm(arm: str) -> dict[str, Any]:
    """``<part>[+<part>...]``: the parts of an arm name combine (see the module docstring)."""
    spec: dict[str, Any] = {"arm": arm, "lr": None}
    spec.update(method="retromae", pooling="cls")
    for part in arm.split("+"):
        if part == "retromae-cls":
            pass
        elif part == "retromae-mean":
            spec["pooling"] = "mean"
        elif part in ("none-cls", "none-mean"):
            spec.update(method="none", pooling=part.split("-")[1])
        elif m := re.fullmatch(r"init(\d+)", part):
            spec["value_gain"] = int(m[1]) / 100
        elif m := re.fullmatch(r"s2lr([0-9.e-]+)", part):
            spec["stage2_lr"] = float(m[1])
        elif m := re.fullmatch(r"lr([0-9.e-]+)", part):
            spec["lr"] = float(m[1])
        elif m := re.fullmatch(r"dec(\d+)-(\d+)", part):
            spec["decoder_start"], spec["decoder_steps"] = int(m[1]) / 100, int(m[2])
        elif m := re.fullmatch(r"decfix(\d+)", part):
            spec["decoder_ratio"] = int(m[1]) / 100
        elif m := re.fullmatch(r"decw(\d+)-(\d+)", part):
            spec["decoder_weight"], spec["weight_steps"] = float(m[1]), int(m[2])
        elif m := re.fullmatch(r"mlmwarm-(\d+)", part):
            spec["decoder_weight"], spec["weight_steps"], spec["hold"] = 0.0, int(m[1]), True
        elif m := re.fullmatch(r"enc(\d+)-(\d+)", part):
            spec["encoder_start"], spec["encoder_steps"] = int(m[1]) / 100, int(m[2])
        elif part == "hbn":
            spec["batch_standardise"] = True
        elif m := re.fullmatch(r"mix(\d+)-(\d+)", part):
            spec["mix_start"], spec["mix_steps"] = int(m[1]) / 100, int(m[2])
        else:
            raise ValueError(f"unknown arm part {part!r} in {arm!r}")
    return spec


class PoolingMix(TrainerCallback):
    """During stage 1 the decoder reads h = (1 - a) * CLS + a * mean(tokens), a annealed linearly from
    ``start`` to 0 over ``steps`` steps; CLS alone afterwards (and in what is saved: the Pooling module
    stays a stock ``Pooling('cls')``; only its instance's forward is wrapped while ``a > 0``)."""

    def __init__(self, pooling, start: float, steps: int) -> None:
        self.pooling, self.start, self.steps = pooling, start, steps
        self.alpha = start
        original = pooling.forward

        def forward(features, *a, **k):
            out = original(features, *a, **k)
            if self.alpha > 0:
                tokens, mask = features["token_embeddings"], features["attention_mask"].unsqueeze(-1)
                mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
                out["sentence_embedding"] = (1 - self.alpha) * out["sentence_embedding"] + self.alpha * mean
            return out

        self.original = original
        pooling.forward = forward

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        self.alpha = 0.0 if step >= self.steps else self.start * (1 - step / self.steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.alpha = 0.0
        del self.pooling.forward  # back to the class's own forward


class BatchStandardise(TrainerCallback):
    """During stage 1 the decoder reads h standardised across the batch, per dimension ((h - mean) / std):
    the tiny text-specific part of a from-scratch [CLS] becomes O(1) for the decoder, and the gradient into
    it is amplified by 1/std. Stage 2 and the saved model use the raw [CLS] vector (the instance's forward is
    unwrapped at the end of training)."""

    def __init__(self, pooling) -> None:
        self.pooling = pooling
        original = pooling.forward

        def forward(features, *a, **k):
            out = original(features, *a, **k)
            h = out["sentence_embedding"]
            if h.shape[0] >= 2:
                out["sentence_embedding"] = (h - h.mean(0)) / (h.std(0) + 1e-5)
            return out

        pooling.forward = forward

    def on_train_end(self, args, state, control, **kwargs):
        del self.pooling.forward


def run(arm: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    spec = parse_arm(arm)
    data = Path(args.data)
    tok_dir = work / "tokenizer"
    dataset, _ = load_texts(str(data))
    texts = dataset["text"]
    if tok_dir.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
        tokenizer.save_pretrained(str(tok_dir))
    run_dir = work / f"{arm}-s{seed}"
    init_dir = run_dir / "init"
    if not (args.reuse_stage1 and (run_dir / "stage1" / "final").is_dir()):
        # BERT's init (std 0.02) unless the arm names a gain: the arms of the first table predate the presets'
        # scaled attention init (models.scale_attention_init).
        build_model(
            args.preset, tokenizer, max_seq_length=args.max_len, save_dir=init_dir, seed=seed,
            attention_init_gain=spec.get("value_gain"),
        )  # fmt: skip
    record: dict[str, Any] = {"arm": arm, "seed": seed, "spec": spec}

    folder = init_dir
    previous = work / "records" / f"{arm}-s{seed}.json"
    if args.reuse_stage1 and spec["method"] == "retromae" and (run_dir / "stage1" / "final").is_dir():
        # Stage 2 only, from a --stage1-only run of the same arm and seed (its record keeps the h_gain curve).
        old = json.loads(previous.read_text())
        record.update({k: old[k] for k in ("h_gain_history", "stage1_log", "stage1_steps") if k in old})
        record["stage1_command"] = old["config"].get("command")
        folder = run_dir / "stage1" / "final"
    elif spec["method"] == "retromae":
        windows, _ = tokenize_corpus(dataset, tokenizer, args.max_len)
        model = load_encoder(str(init_dir), max_seq_length=args.max_len, pooling=spec["pooling"])
        torch.manual_seed(seed)
        loss_cls = WeightedRetroMAELoss if "decoder_weight" in spec else RetroMAELoss
        loss = loss_cls(
            model,
            decoder_mask_ratio=spec.get("decoder_ratio", 0.5),
            # batch statistics need the whole batch in one forward
            **({"max_length_groups": 1} if spec.get("batch_standardise") else {}),
        )
        probe_texts = random.Random(1).sample(texts, 64)
        probe = dict(
            tokenizer(
                probe_texts, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt"
            )
        )
        probe_cb = HGainProbe(loss, probe, args.probe_every)
        callbacks: list[TrainerCallback] = []  # schedules first, so the probe sees this step's ratio
        if "decoder_start" in spec or "encoder_start" in spec:
            callbacks.append(
                MaskRatioCurriculum(
                    loss,
                    decoder_start=spec.get("decoder_start"),
                    decoder_steps=spec.get("decoder_steps", 0),
                    encoder_start=spec.get("encoder_start"),
                    encoder_steps=spec.get("encoder_steps", 0),
                )
            )
        if "decoder_weight" in spec:
            callbacks.append(
                DecoderWeightSchedule(
                    loss, spec["decoder_weight"], spec["weight_steps"], spec.get("hold", False)
                )
            )
        if "mix_start" in spec:
            mix = PoolingMix(model[1], spec["mix_start"], spec["mix_steps"])
            callbacks.append(mix)
            probe_cb.mix = mix
        if spec.get("batch_standardise"):
            callbacks.append(BatchStandardise(model[1]))
        callbacks.append(probe_cb)
        pretrain(
            model,
            windows,
            run_dir / "stage1",
            loss=loss,
            batch_size=args.stage1_batch,
            learning_rate=spec["lr"] or args.stage1_lr,
            max_steps=args.stage1_steps,
            seed=seed,
            save_steps=10**9,
            logging_steps=max(1, args.stage1_steps // 10),
            overwrite=True,
            resume=False,
            callbacks=callbacks,
        )
        folder = run_dir / "stage1" / "final"
        record["h_gain_history"] = probe_cb.history
        log = json.loads((run_dir / "stage1" / "training_log.json").read_text())
        record["stage1_log"] = [r for r in log if "decoder" in r or "encoder_mlm" in r]
        record["stage1_steps"] = args.stage1_steps
        if args.stage1_only:
            record["config"] = {k: v for k, v in vars(args).items() if k not in ("arm_list", "seed_list")}
            return record

    pairs = load_pairs(str(data), split="train").shuffle(seed=0)
    pairs = pairs.select(range(min(args.pairs, len(pairs))))
    dev = eval_set(data, "dev", args.dev_docs)
    probe_texts = random.Random(0).sample(texts, 300)
    model = load_encoder(str(folder), max_seq_length=args.max_len, pooling=spec["pooling"])
    assert model[1].pooling_mode == spec["pooling"], model[1].pooling_mode
    record["mean_cos_after_stage1"] = mean_cosine(model, probe_texts)
    model = finetune(
        model,
        pairs,
        run_dir / "stage2",
        batch_size=args.stage2_batch,
        learning_rate=spec.get("stage2_lr") or args.stage2_lr,
        max_steps=args.stage2_steps,
        save_steps=10**9,
        logging_steps=max(1, args.stage2_steps // 20),
        seed=seed,
        overwrite=True,
        resume=False,
        save_total_limit=1,
    )
    log = json.loads((run_dir / "stage2" / "final" / "training_log.json").read_text())
    history = log["log_history"] if isinstance(log, dict) else log
    losses = [row["loss"] for row in history if "loss" in row]
    record["stage2"] = {
        "steps": args.stage2_steps,
        "losses": losses,
        "final_loss": float(np.mean(losses[-3:])) if losses else float("nan"),
        "ln_batch": math.log(args.stage2_batch),
    }
    record["mean_cos_after_stage2"] = mean_cosine(model, probe_texts)
    record["dev"] = evaluate(model, dev)
    record["dev_docs"], record["dev_queries"] = len(dev["corpus"]), len(dev["queries"])
    record["config"] = {k: v for k, v in vars(args).items() if k not in ("arm_list", "seed_list")}
    logger.info(
        "%s seed %d: dev %s stage-2 loss %.3f", arm, seed, record["dev"], record["stage2"]["final_loss"]
    )
    return record


def cpu_name() -> str:
    try:
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _decoder_untrained(record: dict[str, Any]) -> bool:
    spec = record.get("spec", {})
    held_at_zero = spec.get("hold") and spec.get("decoder_weight") == 0.0
    return bool(held_at_zero and spec.get("weight_steps", 0) >= record.get("stage1_steps", 0))


def report(args: argparse.Namespace, work: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted((work / "records").glob("*.json"))]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["arm"], []).append(r)
    rows = []
    for arm, items in groups.items():
        row: dict[str, Any] = {
            "arm": arm,
            "seeds": sorted(i["seed"] for i in items),
            "stage1_steps": items[0].get("stage1_steps", 0),
            "stage2_setting": f"{items[0]['config'].get('pairs')} / {items[0]['config'].get('stage2_steps')}",
        }
        done = [i for i in items if "dev" in i]  # --stage1-only runs have no stage 2
        if done:
            nd = [i["dev"]["ndcg@10"] for i in done]
            row.update(
                {
                    "stage2_seeds": sorted(i["seed"] for i in done),
                    "ndcg@10": (statistics.mean(nd), statistics.stdev(nd) if len(nd) > 1 else 0.0),
                    "recall@100": statistics.mean(i["dev"]["recall@100"] for i in done),
                    "stage2_final_loss": statistics.mean(i["stage2"]["final_loss"] for i in done),
                    "ln_batch": done[0]["stage2"]["ln_batch"],
                    "cos1": statistics.mean(i["mean_cos_after_stage1"] for i in done),
                    "cos2": statistics.mean(i["mean_cos_after_stage2"] for i in done),
                }
            )
        # An arm whose decoder loss is weighted 0 for the whole stage 1 never trains its decoder: its probe
        # h_gain would measure a random decoder, so it is left out.
        hist = [i["h_gain_history"] for i in items if "h_gain_history" in i and not _decoder_untrained(i)]
        if hist:
            steps = [h["step"] for h in hist[0]]
            row["h_gain_curve"] = {
                s: statistics.mean(h[k]["h_gain"] for h in hist if k < len(h)) for k, s in enumerate(steps)
            }
            row["h_gain_final"] = statistics.mean(h[-1]["h_gain"] for h in hist)
            row["h_gain1_final"] = statistics.mean(h[-1]["h_gain@1"] for h in hist)
            row["spread_final"] = statistics.mean(h[-1]["spread"] for h in hist)
        logs = [i["stage1_log"][-1] for i in items if i.get("stage1_log")]
        if logs:
            row["stage1_mlm"] = statistics.mean(float(r["encoder_mlm"]) for r in logs)
            row["stage1_decoder"] = statistics.mean(float(r["decoder"]) for r in logs)
        row["commands"] = sorted({i["config"].get("command", "") for i in items})
        rows.append(row)
    rows.sort(key=lambda r: r["arm"])
    cfg = records[0]["config"] if records else {}
    out = Path(args.output_dir)
    payload = {
        "benchmark": "cls_schedule",
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": 1,
            "torch": torch.__version__,
            "note": args.machine_note,
        },
        "config": cfg,
        "summary": rows,
        "records": records,
    }
    atomic_write_json(out / f"{args.name}.json", payload)
    # Stage-1-only records (--record-from-log) have no evaluation: take the sizes from one that has.
    evaluated = next((r for r in records if "dev_docs" in r), {"dev_docs": "?", "dev_queries": "?"})
    lines = [
        f"# {args.title}",
        "",
        f"Machine: {payload['environment']['cpu']}, {payload['environment']['cores']} cores, no native bf16; "
        f"{args.machine_note}; compare at equal steps.",
        "",
        f"Model {cfg.get('preset')} from scratch, 4k WordPiece, max length {cfg.get('max_len')}. Stage 1: "
        f"the steps of each row, batch {cfg.get('stage1_batch')}, lr {cfg.get('stage1_lr'):g} (unless "
        f"the arm says +lr). Stage 2: MNRL, CLS pooling unless the arm says mean, {cfg.get('stage2_steps')} steps, "
        f"batch {cfg.get('stage2_batch')}, lr {cfg.get('stage2_lr')}, on {cfg.get('pairs')} train pairs. "
        f"Evaluation: debian-pkgs **dev** split, {evaluated['dev_docs']} docs "
        f"(all judged kept), {evaluated['dev_queries']} queries.",
        "",
        "h_gain: decoder loss with h rolled by one across a fixed 64-text probe batch minus with the true h, "
        "same masks, eval mode, at decoder ratio 0.5 (h_gain@1: ratio 1.0, the decoder sees only h). "
        "spread: mean distance of the clean [CLS] vectors from their mean / mean norm.",
        "",
        "| arm | seeds | stage-1 steps | stage-2 pairs / steps | dev nDCG@10 | dev R@100 | stage-2 loss (ln B) "
        "| h_gain end | h_gain@1 end | spread end | cos s1 / s2 | stage-1 end MLM / decoder loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hg = f"{r['h_gain_final']:.4f}" if "h_gain_final" in r else "-"
        hg1 = f"{r['h_gain1_final']:.4f}" if "h_gain1_final" in r else "-"
        sp = f"{r['spread_final']:.3f}" if "spread_final" in r else "-"
        if "ndcg@10" in r:
            m, sd = r["ndcg@10"]
            s2 = f"{m:.3f} ± {sd:.3f} | {r['recall@100']:.3f} | {r['stage2_final_loss']:.2f} ({r['ln_batch']:.2f})"
            cos = f"{r['cos1']:.2f} / {r['cos2']:.2f}"
        else:
            s2, cos = "not run | - | -", "-"
        lines.append(
            f"| {r['arm']} | {','.join(map(str, r['seeds']))} | {r['stage1_steps']} | {r['stage2_setting']} | "
            f"{s2} | {hg} | {hg1} | {sp} | {cos} | "
            + (f"{r['stage1_mlm']:.2f} / {r['stage1_decoder']:.2f} |" if "stage1_mlm" in r else "- |")
        )
    curves = [r for r in rows if "h_gain_curve" in r]
    if curves:
        steps = list(curves[0]["h_gain_curve"])
        lines += ["", "h_gain (ratio 0.5) over stage-1 steps, mean over seeds:", ""]
        lines += ["| arm | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for r in curves:
            cells = [f"{r['h_gain_curve'].get(s, float('nan')):.4f}" for s in steps]
            lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (the report: `python benchmarks/cls_schedule.py --report`):", ""]
    lines += [f"- {r['arm']}: `{c}`" for r in rows for c in r["commands"]]
    lines.append("")
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--arms", default="none-cls,none-mean,retromae-cls,dec100-200")
    p.add_argument("--seeds", default="0")
    p.add_argument("--preset", default="retromae-tiny")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--stage1-steps", type=int, default=400)
    p.add_argument("--stage1-batch", type=int, default=32)
    p.add_argument("--stage1-lr", type=float, default=5e-4)
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--stage2-steps", type=int, default=200)
    p.add_argument("--stage2-batch", type=int, default=64)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--dev-docs", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/cls-schedule")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="cls_schedule")
    p.add_argument("--title", default="CLS from random init: stage-1 schedules (issue #11 item 3)")
    p.add_argument("--stage1-only", action="store_true", help="stop after stage 1 (h_gain curve only)")
    p.add_argument(
        "--reuse-stage1", action="store_true", help="stage 2 only, from an earlier --stage1-only run's model"
    )
    p.add_argument("--record-from-log", default=None, help="write a stage-1-only record from a run's log")
    p.add_argument("--report", action="store_true", help="gather <work>/records into the result files")
    p.add_argument(
        "--machine-note",
        default="1 thread per run, several runs side by side: wall times not meaningful",
        help="how the runs shared the machine (written into the report)",
    )
    args = p.parse_args(argv)
    args.arm_list = [a for a in args.arms.split(",") if a]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.command = "OMP_NUM_THREADS=1 python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retromae_st").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    (work / "records").mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args, work)
        return
    if args.record_from_log:
        # A run stopped after its stage 1 (e.g. for time): its h_gain curve from the probe log lines (the log
        # must hold that one run only).
        pattern = re.compile(r"step (\d+) h_gain (-?[0-9.]+) h_gain@1 (-?[0-9.]+) spread ([0-9.]+)")
        text = Path(args.record_from_log).read_text(errors="replace")
        arm, seed = args.arm_list[0], args.seed_list[0]
        history = [
            {"step": int(m[1]), "h_gain": float(m[2]), "h_gain@1": float(m[3]), "spread": float(m[4])}
            for m in pattern.finditer(text)
        ]
        # The trainer's stage-1 log lines ({'loss': '13.2', ..., 'encoder_mlm': '6.6', 'decoder': '6.6', ...}).
        stage1_log = [
            entry
            for entry in (ast.literal_eval(m[0]) for m in re.finditer(r"\{'loss'[^{}]*\}", text))
            if "encoder_mlm" in entry
        ]
        record = {
            "arm": arm,
            "seed": seed,
            "spec": parse_arm(arm),
            "h_gain_history": history,
            "stage1_log": stage1_log,
            "stage1_steps": args.stage1_steps,
            "source": f"probe log lines of {args.record_from_log} (stage 2 not run)",
            "config": {k: v for k, v in vars(args).items() if k not in ("arm_list", "seed_list")},
        }
        atomic_write_json(work / "records" / f"{arm}-s{seed}.json", record)
        return
    for seed in args.seed_list:
        for arm in args.arm_list:
            started = time.perf_counter()
            record = run(arm, seed, args, work)
            record["wall_seconds"] = time.perf_counter() - started
            atomic_write_json(work / "records" / f"{arm}-s{seed}.json", record)


if __name__ == "__main__":
    main()

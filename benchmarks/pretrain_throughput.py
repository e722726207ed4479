"""Benchmark: RetroMAE pretraining step throughput and peak memory, ours against the reference behaviour.

A training step is collate + forward + backward + gradient clipping + AdamW step. Two implementations run
on the same batches (same windows, same dynamic padding), interleaved step by step in one process:

* ``ours``: :class:`retromae_st.pretraining.loss.RetroMAELoss` on batches from :class:`retromae_st.data.batching.PaddingCollator`,
  as users run it (masking on the device, each batch run as up to 4 length groups padded only to their own
  longest row, SDPA attention, MLM heads only where there are labels, chunked vocabulary cross-entropy).
  The batches are random, not length-grouped (``pretrain()`` would group them by length, which helps ours
  further).
* ``reference``: written here to do what FlagEmbedding's ``retromae_pretrain`` (and staoxiao/RetroMAE) does
  every step: a per-example Python collator that masks whole words on token strings (``##`` pieces, as
  ``DataCollatorForWholeWordMask``) and builds the decoder's [B, L, L] int64 visibility matrix from a pool of
  min(L, 128) word masks; ``BertForMaskedLM`` with eager attention and full-vocabulary logits at every
  position; an eager BertLayer-like decoder with a float additive [B, 1, L, L] mask; full [B, L, V] decoder
  logits with ``CrossEntropyLoss(ignore_index=-100)``.

Peak memory is measured per variant in its own subprocess (``ru_maxrss``; CUDA: max allocated), on the
longest batch of the schedule. The dense matmul peak of the machine (fp32, bf16) is measured in the same run
and each variant's achieved FLOP/s (analytic count, checked against ``torch.utils.flop_counter``) is
reported as a fraction of it.

Writes ``<output-dir>/<name>.json`` and ``<name>.md``. Examples::

    python benchmarks/pretrain_throughput.py                          # full run (~15 min on 2 CPU cores)
    python benchmarks/pretrain_throughput.py --quick                  # smoke run (1-2 min)
    python benchmarks/pretrain_throughput.py --sizes base --lengths 128 --extra bf16,compile --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast
from transformers.activations import ACT2FN

from retromae_st.data.batching import PaddingCollator
from retromae_st.data.sources import load_texts
from retromae_st.data.tokenize import tokenize_corpus
from retromae_st.io import atomic_write_json, atomic_write_text
from retromae_st.models import PRESETS, build_model, train_wordpiece_tokenizer
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.packing import packing_pays
from retromae_st.pretraining.unpadding import plan_length_groups

logger = logging.getLogger("benchmarks.pretrain_throughput")

DEFAULT_CORPUS = "/work/shared/data/debian-pkgs/corpus.jsonl"
SIZES = {"tiny": "retromae-tiny", "small": "retromae-small", "base": "retromae-base"}
# SPEC section 9 batch sizes: 32 at length 128 (8 for base), 8 at length 512.
DEFAULT_BATCH = {128: 32, 512: 8}
BASE_BATCH = {128: 8, 512: 8}
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------
# Reference behaviour (FlagEmbedding research/baai_general_embedding/retromae_pretrain, data.py + modeling.py)
# ----------------------------------------------------------------------------------------------------------


def whole_word_mask(tokens: list[str], probability: float, rng: random.Random) -> list[int]:
    """``DataCollatorForWholeWordMask._whole_word_mask`` (transformers 4.x), on token strings."""
    candidates: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]"):
            continue
        if candidates and token.startswith("##"):
            candidates[-1].append(i)
        else:
            candidates.append([i])
    rng.shuffle(candidates)
    to_predict = min(512, max(1, int(round(len(tokens) * probability))))
    covered: set[int] = set()
    count = 0
    for index_set in candidates:
        if count >= to_predict:
            break
        if count + len(index_set) > to_predict:
            continue
        for index in index_set:
            covered.add(index)
            count += 1
    return [1 if i in covered else 0 for i in range(len(tokens))]


def tensorize_batch(sequences: list[torch.Tensor], padding_value: int) -> torch.Tensor:
    """FlagEmbedding's ``tensorize_batch``: pad 1-D or 2-D tensors into one batch tensor."""
    if sequences[0].dim() == 1:
        dims: tuple[int, ...] = (len(sequences), max(s.size(0) for s in sequences))
    else:
        dims = (len(sequences), max(s.size(0) for s in sequences), max(s.size(1) for s in sequences))
    out = sequences[0].new_full(dims, padding_value)
    for i, tensor in enumerate(sequences):
        if tensor.dim() == 1:
            out[i, : tensor.size(0)] = tensor
        else:
            out[i, : tensor.size(0), : tensor.size(1)] = tensor
    return out


class ReferenceCollator:
    """FlagEmbedding's ``RetroMAECollator``: per-example Python masking and an L x L int64 matrix per text."""

    def __init__(
        self,
        tokenizer: BertTokenizerFast,
        encoder_ratio: float = 0.3,
        decoder_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder_ratio, self.decoder_ratio = encoder_ratio, decoder_ratio
        self.rng = random.Random(seed)
        self.special_ids = set(tokenizer.all_special_ids)

    def __call__(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids_batch, attention_batch, encoder_mask_batch, labels_batch, matrix_batch = [], [], [], [], []
        for body in rows:
            ids = [self.tokenizer.cls_token_id, *body, self.tokenizer.sep_token_id]
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            encoder_mlm_mask = whole_word_mask(tokens, self.encoder_ratio, self.rng)
            pool_size = min(len(tokens), 128)
            mask_set = [whole_word_mask(tokens, self.decoder_ratio, self.rng) for _ in range(pool_size)]
            matrix = []
            for i in range(len(tokens)):
                row = copy.deepcopy(mask_set[self.rng.randint(0, pool_size - 1)])
                row[i] = 1  # a position never sees itself
                matrix.append(row)
            ids_batch.append(torch.tensor(ids))
            attention_batch.append(torch.tensor([1] * len(ids)))
            labels = list(ids)
            labels[0] = labels[-1] = IGNORE
            labels_batch.append(torch.tensor(labels))
            encoder_mask_batch.append(torch.tensor(encoder_mlm_mask))
            matrix_batch.append(1 - torch.tensor(matrix))  # 1 = visible
        input_ids = tensorize_batch(ids_batch, self.tokenizer.pad_token_id)
        attention = tensorize_batch(attention_batch, 0)
        encoder_ids, encoder_labels = self._mask_tokens(
            input_ids.clone(), tensorize_batch(encoder_mask_batch, 0)
        )
        return {
            "encoder_input_ids": encoder_ids,
            "encoder_attention_mask": attention,
            "encoder_labels": encoder_labels,
            "decoder_input_ids": input_ids,
            "decoder_attention_mask": tensorize_batch(matrix_batch, 0),  # [B, L, L] int64
            "decoder_labels": tensorize_batch(labels_batch, IGNORE),
        }

    def _mask_tokens(
        self, inputs: torch.Tensor, mask_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``DataCollatorForWholeWordMask.torch_mask_tokens``: 80% [MASK], 10% random, 10% kept."""
        labels = inputs.clone()
        probability = mask_labels.clone()
        special = torch.tensor(
            [[tid in self.special_ids for tid in row] for row in labels.tolist()], dtype=torch.bool
        )
        probability.masked_fill_(special, 0)
        masked = probability.bool()
        labels[~masked] = IGNORE
        replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & masked
        inputs[replaced] = self.tokenizer.mask_token_id
        random_words = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & masked & ~replaced
        inputs[random_words] = torch.randint(len(self.tokenizer), labels.shape)[random_words]
        return inputs, labels


class ReferenceDecoderLayer(nn.Module):
    """FlagEmbedding's ``BertLayerForDecoder``: eager attention, queries and keys/values from two streams."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.head_size = hidden // self.heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attention_dense = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.output_dense = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_size).permute(0, 2, 1, 3)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self._split(self.query(query)), self._split(self.key(key)), self._split(self.value(value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + attention_mask
        probs = self.attention_dropout(F.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(query.shape)
        attended = self.attention_norm(self.dropout(self.attention_dense(context)) + query)
        out = self.output_dense(self.activation(self.intermediate(attended)))
        return self.output_norm(self.dropout(out) + attended)


class ReferenceRetroMAE(nn.Module):
    """FlagEmbedding's ``RetroMAEForPretraining`` (modeling.py) on a from-scratch ``BertForMaskedLM``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        config = copy.deepcopy(config)
        config._attn_implementation = "eager"  # the reference ran eager attention (transformers 4.44)
        self.lm = BertForMaskedLM(config)
        self.decoder_embeddings = self.lm.bert.embeddings
        self.c_head = ReferenceDecoderLayer(config)
        self.c_head.apply(self.lm._init_weights)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm_out = self.lm(
            batch["encoder_input_ids"],
            batch["encoder_attention_mask"],
            labels=batch["encoder_labels"],
            output_hidden_states=True,
            return_dict=True,
        )
        cls_hiddens = lm_out.hidden_states[-1][:, :1]  # [B, 1, D]
        decoder_embedding_output = self.decoder_embeddings(input_ids=batch["decoder_input_ids"])
        hiddens = torch.cat([cls_hiddens, decoder_embedding_output[:, 1:]], dim=1)
        query = self.decoder_embeddings(inputs_embeds=cls_hiddens.expand(hiddens.shape))
        matrix = batch["decoder_attention_mask"]  # get_extended_attention_mask on a 3-D mask
        extended = (1.0 - matrix[:, None, :, :].to(hiddens.dtype)) * torch.finfo(hiddens.dtype).min
        hiddens = self.c_head(query, hiddens, hiddens, extended)
        scores = self.lm.cls(hiddens)  # [B, L, V]
        decoder_loss = self.cross_entropy(scores.view(-1, scores.shape[-1]), batch["decoder_labels"].view(-1))
        return decoder_loss + lm_out.loss


# ----------------------------------------------------------------------------------------------------------
# Variants: build, one step
# ----------------------------------------------------------------------------------------------------------


def packed_option(name: str) -> bool | str:
    """``RetroMAELoss(packed=...)`` for a variant of ours: ``ours-packed`` True, ``ours-groups`` False, else
    ``"auto"`` (the default; ``ours-compile`` passes it too, and the compiled loss then refuses packing)."""
    return {"packed": True, "groups": False}.get(name.rsplit("-", 1)[-1], "auto")


class Variant:
    """One implementation under test: owns its model, optimizer and collator; ``step(rows)`` trains once."""

    def __init__(
        self, name: str, preset: str, tokenizer: BertTokenizerFast, max_len: int, device: str
    ) -> None:
        self.name, self.device = name, device
        self.autocast = name.endswith("bf16") or device == "cuda"
        torch.manual_seed(0)
        if name.startswith("ours"):
            with tempfile.TemporaryDirectory() as folder:
                model = build_model(preset, tokenizer, max_seq_length=max_len, save_dir=folder, seed=0)
                # Built while the folder exists: the loss looks for a masked-LM head in the initial weights.
                # "ours-compile": RetroMAELoss(compile=True), as `pretrain --compile` runs it (the encoder
                # and decoder compiled; masking, length groups and the chunked cross-entropy eager).
                # "ours": the defaults (packed="auto": packed from hidden size 256 on CPU).
                # "ours-packed": RetroMAELoss(packed=True), the encoder on real tokens only at any size.
                # "ours-groups": RetroMAELoss(packed=False), length groups only.
                self.loss = RetroMAELoss(
                    model, compile=name.endswith("compile"), packed=packed_option(name)
                ).to(device)
            self.loss.callback_attached = True  # no trainer here: silence the missing-callback warning
            self.collator = PaddingCollator(tokenizer)
            self.module: nn.Module = self.loss
            self.forward = self._ours_forward
        else:
            config = PRESETS[preset].bert_config(tokenizer)
            self.reference = ReferenceRetroMAE(config).to(device)
            self.collator = ReferenceCollator(tokenizer)
            self.module = self.reference
            self.forward = self._reference_forward
        self.module.train()
        decay = [p for n, p in self.module.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.module.named_parameters() if p.ndim <= 1]
        # Both sides: the transformers trainer's default optimizer with torch >= 2.8 ("adamw_torch_fused"),
        # which is what a user of either code base gets today.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            fused=True,
        )

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.name.startswith("ours"):
            # Windows from tokenize_corpus carry their special tokens, as the trainer's dataset rows do.
            return self.collator([{"input_ids": row} for row in rows])
        return self.collator([row[1:-1] for row in rows])

    def _ours_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {key.removeprefix("text_"): value for key, value in batch.items()}
        return sum(self.loss([features]).values())

    def _reference_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.reference(batch)

    def step(self, rows: list[list[int]]) -> float:
        """One full training step; returns its wall time in seconds."""
        sync()
        start = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.collate(rows).items()}
        context = (
            torch.autocast(self.device, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        )
        with context:
            loss = self.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# FLOPs and machine peak
# ----------------------------------------------------------------------------------------------------------


def step_flops(
    variant: str,
    preset: str,
    vocab: int,
    rows: list[list[int]],
    encoder_ratio: float = 0.3,
    device: str = "cpu",
) -> float:
    """Analytic FLOPs of one training step (forward + backward = 3 x forward matmul FLOPs).

    Per transformer layer over B x L tokens: 2 T (4 D^2 + 2 D F) for the projections and 4 B L^2 D for the two
    attention matmuls (encoder layers + one decoder layer). The reference runs the whole batch padded to its
    longest row; ours runs the work it really does: the encoder packed on the real tokens (each row its own
    length, attention within the row) where it packs (``packed="auto"``: :func:`packing_pays`; ``ours-packed``
    always; ``ours-groups`` and ``ours-compile`` never), else in the length groups
    :func:`retromae_st.pretraining.unpadding.plan_length_groups` plans, and the decoder layer in those groups.
    Heads: transform 2 N D^2 plus vocabulary projection 2 N D V over N rows: all B x L positions twice for the
    reference; the encoder-masked tokens plus the decoder's targets for ours.
    """
    shape = PRESETS[preset]
    batch, length = len(rows), max(len(r) for r in rows)
    real = sum(len(r) for r in rows)
    d, f = shape.hidden, shape.intermediate

    def layer(rows_: int, length_: int) -> float:
        return 2 * rows_ * length_ * (4 * d * d + 2 * d * f) + 4 * rows_ * length_ * length_ * d

    if variant.startswith("ours"):
        lengths = [len(r) for r in rows]
        mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        groups = plan_length_groups(mask, RetroMAELoss.DEFAULT_LENGTH_GROUPS, d)
        grouped = sum(layer(g.size, g.length) for g in groups)
        option = packed_option(variant)
        packs = option is True or (
            option == "auto" and not variant.endswith("compile") and packing_pays(d, torch.device(device))
        )
        encoder = sum(layer(1, n) for n in lengths) if packs else grouped
        body = shape.layers * encoder + grouped
        head_rows = encoder_ratio * (real - 2 * batch) + (real - 2 * batch)
    else:
        body = (shape.layers + 1) * layer(batch, length)
        head_rows = 2 * batch * length
    heads = head_rows * (2 * d * d + 2 * d * vocab)
    return 3.0 * (body + heads)


def counted_flops(variant: Variant, rows: list[list[int]]) -> float:
    """FLOPs of one step as ``torch.utils.flop_counter.FlopCounterMode`` counts them (to check the formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {k: v.to(variant.device) for k, v in variant.collate(rows).items()}
    counter = FlopCounterMode(display=False)
    with counter:
        loss = (variant._ours_forward if variant.name.startswith("ours") else variant._reference_forward)(
            batch
        )
        loss.backward()
    variant.optimizer.zero_grad(set_to_none=True)
    # The chunked cross-entropy computes its gradients inside forward with plain matmuls: counted too.
    return float(counter.get_total_flops())


def matmul_peak(device: str, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` dense GFLOP/s of a size x size matmul, fp32 and bf16."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # CPUs without native bf16 matmul run it ~100x slower: a smaller matrix keeps this under seconds.
        size = size if name == "fp32" or device == "cuda" else size // 4
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * size**3 / best / 1e9
    return peaks


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def load_windows(
    corpus: str, tokenizer: BertTokenizerFast, max_len: int, limit: int | None
) -> list[list[int]]:
    """The corpus cut into windows of at most ``max_len`` tokens by ``retromae_st.data.tokenize.tokenize_corpus``."""
    dataset, _ = load_texts(corpus)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    windows, _ = tokenize_corpus(Dataset.from_dict({"text": dataset["text"]}), tokenizer, max_len)
    return [list(map(int, ids)) for ids in windows["input_ids"]]


def schedule(windows: list[list[int]], batch: int, steps: int, seed: int) -> list[list[list[int]]]:
    """``steps`` random batches (same for every variant): random order, no length grouping."""
    rng = np.random.default_rng(seed)
    return [[windows[i] for i in rng.choice(len(windows), size=batch, replace=False)] for _ in range(steps)]


# ----------------------------------------------------------------------------------------------------------
# Memory worker (a subprocess per variant)
# ----------------------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space, unlike
    ``ru_maxrss``, which Linux carries over from the forking parent across exec (it would report the
    benchmark driver's peak instead of the worker's)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_worker(spec_path: str) -> None:
    """Build one variant, run two steps on the given batch, print its peak memory as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    tokenizer = BertTokenizerFast.from_pretrained(spec["tokenizer"])
    device = spec["device"]
    variant = Variant(spec["variant"], spec["preset"], tokenizer, spec["max_len"], device)
    before = peak_rss_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        variant.step(spec["rows"])
    result = {"peak_rss_gib": peak_rss_gib(), "rss_after_build_gib": before}
    if device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("MEMORY " + json.dumps(result))


def measure_memory(
    variant: str,
    preset: str,
    tokenizer_dir: str,
    max_len: int,
    rows: list[list[int]],
    threads: int,
    device: str,
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(
            {
                "variant": variant,
                "preset": preset,
                "tokenizer": tokenizer_dir,
                "max_len": max_len,
                "rows": rows,
                "threads": threads,
                "device": device,
            },
            handle,
        )
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-worker", handle.name],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.unlink(handle.name)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY ") :])
    logger.error("memory worker for %s failed:\n%s", variant, proc.stderr[-3000:])
    return {"error": proc.stderr[-500:]}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def run_config(
    args: argparse.Namespace,
    size: str,
    length: int,
    vocab_label: str,
    tokenizer: BertTokenizerFast,
    tokenizer_dir: str,
    windows: list[list[int]],
    peaks: dict[str, float],
    device: str,
) -> dict[str, Any]:
    preset = SIZES[size]
    batch_size = args.batch_size or (BASE_BATCH if size == "base" else DEFAULT_BATCH).get(length, 8)
    warmup, timed = (args.warmup_base, args.steps_base) if size == "base" else (args.warmup, args.steps)
    batches = schedule(windows, batch_size, warmup + timed, seed=args.seed)
    names = ["ours", "reference", *[f"ours-{extra}" for extra in args.extra]]
    logger.info("config %s L=%d vocab=%s batch=%d: building %s", size, length, vocab_label, batch_size, names)
    variants: dict[str, Variant] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            variants[name] = Variant(name, preset, tokenizer, length, device)
        except Exception as error:  # a variant that cannot be built (e.g. no compiler) is reported, not fatal
            errors[name] = f"{type(error).__name__}: {error}"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index, rows in enumerate(batches):
        # Alternate the order each step, so slow phases of a noisy machine hit every variant alike.
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            if name in errors:
                continue
            try:
                elapsed = variants[name].step(rows)
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {error}"
                continue
            if index >= warmup:
                times[name].append(elapsed)
        logger.info(
            "  step %d (L=%d): %s",
            index,
            max(map(len, rows)),
            ", ".join(f"{n} {times[n][-1]:.2f}s" for n in variants if times.get(n) and index >= warmup),
        )
    timed_batches = batches[warmup:]
    real_tokens = sum(len(r) for rows in timed_batches for r in rows)
    padded_tokens = sum(len(rows) * max(map(len, rows)) for rows in timed_batches)
    vocab = len(tokenizer)
    result: dict[str, Any] = {
        "size": size,
        "preset": preset,
        "max_seq_length": length,
        "vocab": vocab_label,
        "vocab_size": vocab,
        "batch_size": batch_size,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "real_tokens_per_step": real_tokens / timed,
        "padding_share": 1 - real_tokens / padded_tokens,
        "mean_padded_length": padded_tokens / timed / batch_size,
        "variants": {},
        "errors": errors,
    }
    for name, values in times.items():
        if len(values) != timed:
            continue
        total = sum(values)
        flops = sum(step_flops(name, preset, vocab, rows, device=device) for rows in timed_batches)
        result["variants"][name] = {
            "s_per_step_mean": total / timed,
            "s_per_step_median": statistics.median(values),
            "s_per_step_min": min(values),
            "s_per_step_stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "real_tokens_per_s": real_tokens / total,
            "gflop_per_step": flops / timed / 1e9,
            "gflop_per_s": flops / total / 1e9,
            "fraction_of_fp32_peak": flops / total / 1e9 / peaks["fp32"],
            "fraction_of_bf16_peak": flops / total / 1e9 / peaks["bf16"],
        }
    if args.check_flops and variants and size != "base":  # one more step each: too slow for base
        check = {}
        for name in ("ours", "reference"):
            if name in variants and name not in errors:
                counted = counted_flops(variants[name], batches[0])
                check[name] = {
                    "counted": counted,
                    "analytic": step_flops(name, preset, vocab, batches[0], device=device),
                }
        result["flop_check"] = check
    del variants
    if not args.no_memory:
        longest = max(batches, key=lambda rows: max(map(len, rows)))
        result["memory_batch_length"] = max(map(len, longest))
        for name in ("ours", "reference"):
            result.setdefault("memory", {})[name] = measure_memory(
                name, preset, tokenizer_dir, length, longest, args.threads, device
            )
    ours, ref = result["variants"].get("ours"), result["variants"].get("reference")
    if ours and ref:
        result["ratio_tokens_per_s"] = ours["real_tokens_per_s"] / ref["real_tokens_per_s"]
        result["ratio_median_step"] = ref["s_per_step_median"] / ours["s_per_step_median"]
    memory = result.get("memory", {})
    if "peak_rss_gib" in memory.get("ours", {}) and "peak_rss_gib" in memory.get("reference", {}):
        key = "peak_cuda_gib" if device == "cuda" else "peak_rss_gib"
        result["ratio_peak_memory"] = memory["ours"][key] / memory["reference"][key]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="BEIR corpus.jsonl or any load_texts source")
    parser.add_argument("--sizes", default="tiny,small,base", help="comma list of tiny,small,base")
    parser.add_argument("--lengths", default="128,512", help="comma list of max_seq_length values")
    parser.add_argument("--vocab-size", type=int, default=30522, help="bert-base-uncased size (SPEC 9)")
    parser.add_argument(
        "--small-vocab",
        type=int,
        default=8000,
        help="our recommended corpus-trained vocab (extra rows; 0: off)",
    )
    parser.add_argument("--small-vocab-sizes", default="small", help="sizes that get the small-vocab row")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 at length 128, 8 at 512")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per config (tiny, small)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per config (tiny, small)")
    parser.add_argument("--steps-base", type=int, default=4, help="timed steps per config for base")
    parser.add_argument("--warmup-base", type=int, default=2, help="warm-up steps per config for base")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: no OpenMP spin-wait under contention)",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="extra variants of ours, comma list of bf16 (CPU autocast), compile, packed (packed=True), "
        "groups (packed=False: length groups only)",
    )
    parser.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--check-flops", action="store_true", help="check the FLOP formula with FlopCounterMode"
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of ours per config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny+small, 1 warm-up + 3 steps")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default pretrain_throughput[_quick])")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "tiny,small" if args.sizes == "tiny,small,base" else args.sizes
        args.warmup, args.steps, args.steps_base, args.warmup_base = 1, 3, 2, 1
        args.docs = args.docs or 4000
        args.small_vocab_sizes = "tiny"
    args.size_list = [s for s in args.sizes.split(",") if s]
    args.length_list = [int(x) for x in args.lengths.split(",") if x]
    args.extra = [x for x in args.extra.split(",") if x]
    for size in args.size_list:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}: choose from {sorted(SIZES)}")
    for extra in args.extra:
        if extra not in ("bf16", "compile", "packed", "groups"):
            parser.error(f"unknown extra variant {extra!r}: choose bf16, compile, packed or groups")
    args.name = args.name or ("pretrain_throughput_quick" if args.quick else "pretrain_throughput")
    return args


def profile_ours(variant: Variant, rows: list[list[int]], steps: int = 2) -> str:
    """Top operators of ours by self CPU time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.step(rows)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# RetroMAE pretraining throughput: ours vs reference behaviour ({report['config']['label']})",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['threads']} threads, "
        f"device {env['device']}. Corpus: `{report['config']['corpus']}`. Dense matmul peak "
        f"(2048^3): fp32 {report['peak_gflops']['fp32']:.1f} GFLOP/s, bf16 {report['peak_gflops']['bf16']:.1f} "
        "GFLOP/s.",
        "",
        "Step = collate + forward + backward + clip + AdamW (fused, the trainer's default, both). Same batches for both (random windows, each batch "
        "padded to its longest; ours, with its defaults, runs the encoder packed on the real tokens from hidden size 256 "
        '(`packed="auto"`) and the rest as up to 4 length groups, each padded to its own longest row '
        "(`max_length_groups=4`); `ours-groups`: length groups only; pad % is the batch's). Times: mean over the timed steps, variants interleaved step by step. "
        "Peak RSS: each variant alone in a subprocess, two steps on the longest batch of the schedule.",
        "",
        "| size | L | vocab | batch | pad % | variant | s/step (median) | real tok/s | GFLOP/s | % fp32 peak "
        "| peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for name, v in row["variants"].items():
            mem = row.get("memory", {}).get(name.split("-")[0] if name in ("ours", "reference") else "", {})
            peak = mem.get("peak_cuda_gib", mem.get("peak_rss_gib"))
            lines.append(
                f"| {row['size']} | {row['max_seq_length']} | {row['vocab_size']} | {row['batch_size']} | "
                f"{100 * row['padding_share']:.0f} | {name} | {v['s_per_step_mean']:.2f} "
                f"({v['s_per_step_median']:.2f}) | {v['real_tokens_per_s']:.0f} | {v['gflop_per_s']:.1f} | "
                f"{100 * v['fraction_of_fp32_peak']:.1f} | {'' if peak is None else f'{peak:.2f}'} |"
            )
        for name, error in row.get("errors", {}).items():
            lines.append(
                f"| {row['size']} | {row['max_seq_length']} | {row['vocab_size']} | | | {name} | "
                f"failed: {error[:80]} | | | | |"
            )
    lines += [
        "",
        "## Ratios ours / reference and targets",
        "",
        "| size | L | vocab | tokens/s ratio | peak memory ratio | target tok/s | target memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ratio = row.get("ratio_tokens_per_s")
        mem = row.get("ratio_peak_memory")
        need = 4.0 if row["max_seq_length"] >= 512 else 2.0
        tok_ok = "n/a" if ratio is None else ("met" if ratio >= need else "MISSED") + f" (>= {need:.0f}x)"
        mem_ok = "-"
        if row["max_seq_length"] >= 512 and mem is not None:
            mem_ok = ("met" if mem <= 0.6 else "MISSED") + " (<= 0.6x)"
        lines.append(
            f"| {row['size']} | {row['max_seq_length']} | {row['vocab_size']} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if mem is None else f'{mem:.2f}x'} | {tok_ok} "
            f"| {mem_ok} |"
        )
    base = [r for r in report["results"] if r["size"] == "base" and r["max_seq_length"] == 128]
    if base and "ours" in base[0]["variants"]:
        frac = base[0]["variants"]["ours"]["fraction_of_fp32_peak"]
        lines += [
            "",
            f"FLOP/s target (base, L=128, ours >= 50% of fp32 matmul peak): {100 * frac:.1f}% -> "
            f"{'met' if frac >= 0.5 else 'MISSED'}.",
        ]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retromae_st").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    peaks = matmul_peak(device)
    logger.info("matmul peak: %s GFLOP/s", {k: round(v, 1) for k, v in peaks.items()})
    dataset, _ = load_texts(args.corpus)
    texts = dataset["text"][: args.docs] if args.docs else dataset["text"]
    vocabs = [("bert-size", args.vocab_size, args.size_list)]
    if args.small_vocab:
        vocabs.append(("corpus-8k", args.small_vocab, [s for s in args.small_vocab_sizes.split(",") if s]))
    results, notes, profiles = [], [], {}
    tmp = tempfile.TemporaryDirectory(prefix="throughput-tok-")
    for label, size_request, sizes in vocabs:
        sizes = [s for s in sizes if s in args.size_list] or (sizes if label != "bert-size" else [])
        if not sizes:
            continue
        start = time.perf_counter()
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=size_request)
        tokenizer_dir = str(Path(tmp.name) / label)
        tokenizer.save_pretrained(tokenizer_dir)
        logger.info(
            "tokenizer %s: %d entries (asked %d) in %.0fs",
            label,
            len(tokenizer),
            size_request,
            time.perf_counter() - start,
        )
        if len(tokenizer) < size_request:
            notes.append(
                f"{label}: the corpus supports only {len(tokenizer)} WordPiece entries (asked "
                f"{size_request})."
            )
        for length in args.length_list:
            windows = load_windows(args.corpus, tokenizer, length, args.docs)
            for size in sizes:
                row = run_config(args, size, length, label, tokenizer, tokenizer_dir, windows, peaks, device)
                if args.profile:
                    variant = Variant("ours", SIZES[size], tokenizer, length, device)
                    rows = schedule(windows, row["batch_size"], 1, seed=args.seed + 1)[0]
                    variant.step(rows)
                    profiles[f"{size}-{length}-{label}"] = profile_ours(variant, rows)
                results.append(row)
                write(args, out, results, peaks, notes, profiles, device, complete=False)
    write(args, out, results, peaks, notes, profiles, device)
    print(markdown(build_report(args, results, peaks, notes, profiles, device)))


def build_report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    peaks: dict[str, float],
    notes: list[str],
    profiles: dict[str, str],
    device: str,
    complete: bool = True,
) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    config = {k: v for k, v in vars(args).items() if k not in ("memory_worker",)}
    config["label"] = "quick smoke run" if args.quick else "full run"
    if not complete:  # written after each config: a run cut short says so in its files
        config["label"] += f", INCOMPLETE ({len(results)} configs done when this file was written)"
    return {
        "benchmark": "pretrain_throughput",
        "config": config,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "environment": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": device if device == "cpu" else torch.cuda.get_device_name(0),
            "python": platform.python_version(),
        },
        "peak_gflops": peaks,
        "results": results,
        "notes": notes,
        "profiles": profiles,
    }


def write(
    args: argparse.Namespace,
    out: Path,
    results: list[dict[str, Any]],
    peaks: dict[str, float],
    notes: list[str],
    profiles: dict[str, str],
    device: str,
    complete: bool = True,
) -> None:
    report = build_report(args, results, peaks, notes, profiles, device, complete)
    atomic_write_json(out / f"{args.name}.json", report)
    atomic_write_text(out / f"{args.name}.md", markdown(report))


if __name__ == "__main__":
    main()

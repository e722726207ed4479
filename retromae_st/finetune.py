"""Stage 2: contrastive fine-tuning of a (RetroMAE-pretrained) Sentence-Transformers model.

The training loop is the stock ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (or its
GradCache variant ``CachedMultipleNegativesRankingLoss`` for batches larger than memory allows),
``NO_DUPLICATES`` batches (a text that appears twice in a batch would be its own "negative"), an
``InformationRetrievalEvaluator`` on a dev split that picks the best checkpoint, and resumption from the
last checkpoint of an interrupted run. What this module adds is the plumbing around it: reading
(query, positive[, negatives]) data from BEIR qrels, pair files or the hub with clear errors, a corpus
subset for a fast dev evaluator, hard-negative mining defaults, an atomic final folder with the training
log, and a model card that also describes stage 1.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, DatasetInfo
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import (
    BatchSamplers,
    SentenceTransformerTrainingArguments,
)
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from retromae_st.beir import load_beir
from retromae_st.errors import NonFiniteLossError, UserInputError
from retromae_st.io import atomic_dir, atomic_write_json, ensure_can_write
from retromae_st.loss import RETROMAE_CITATION
from retromae_st.training import launcher_args

logger = logging.getLogger(__name__)

# Column names tried, in order, when the caller does not name the query / positive columns.
QUERY_COLUMNS = ("anchor", "query", "question", "sentence1")
POSITIVE_COLUMNS = ("positive", "passage", "document", "answer", "pos", "sentence2")
PAIR_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TRAINING_LOG = "training_log.json"


# --------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------


def load_pairs(
    source: str | os.PathLike,
    *,
    split: str = "train",
    query_column: str | None = None,
    positive_column: str | None = None,
    negative_columns: Sequence[str] | None = None,
    hf_config: str | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Read (query, positive[, negatives]) training pairs as a ``Dataset`` with columns
    ``anchor``, ``positive`` and ``negative_1`` ... ``negative_n``.

    ``source`` is one of:

    * a BEIR folder: one row per (query, judged document) of ``qrels/<split>.tsv`` with relevance > 0;
      the document text is title + text, as BEIR evaluators read it;
    * a pair file (``.jsonl``/``.json``, ``.csv``, ``.tsv``, ``.parquet``) with named columns;
    * a Hugging Face dataset name (``hf_config`` and ``split`` select the part); needs the hub or its cache.

    Without ``query_column``/``positive_column`` the first present name of :data:`QUERY_COLUMNS` /
    :data:`POSITIVE_COLUMNS` is used; without ``negative_columns`` every column named ``negative`` or
    ``negative_*`` is kept. ``max_pairs`` keeps a random subset of that many rows (label-scarce runs).
    """
    path = Path(source)
    if path.is_dir():
        dataset, label = _beir_pairs(path, split), f"{path.name} ({split} qrels)"
    elif path.is_file():
        dataset = _read_pair_file(path)
        dataset = _select_columns(dataset, path, query_column, positive_column, negative_columns)
        label = path.name
    elif path.suffix.lower() in PAIR_FILE_SUFFIXES or (
        os.sep in str(source) and not _looks_like_hub_id(str(source))
    ):
        raise UserInputError(
            f"{source} does not exist: pass a BEIR folder, a pair file or a hub dataset name."
        )
    else:
        dataset = _load_hub_dataset(str(source), hf_config, split)
        dataset = _select_columns(dataset, str(source), query_column, positive_column, negative_columns)
        label = f"{source} ({split})"
    dataset = _drop_empty(dataset, label)
    if max_pairs is not None:
        if max_pairs < 1:
            raise UserInputError(f"max_pairs={max_pairs}: use a positive number of pairs, or None for all.")
        if max_pairs < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(max_pairs))
    logger.info("Loaded %d training pairs from %s (columns %s).", len(dataset), label, dataset.column_names)
    # The name travels with the data so that finetune() can put it in the model card.
    dataset.info.dataset_name = label
    return dataset


def _beir_pairs(folder: Path, split: str) -> Dataset:
    data = load_beir(folder, split)
    anchors, positives = [], []
    for query_id, judged in data.qrels.items():
        for doc_id, relevance in judged.items():
            if relevance > 0:
                anchors.append(data.queries[query_id])
                positives.append(data.document_text(doc_id))
    if not anchors:
        raise UserInputError(f"{folder / 'qrels' / (split + '.tsv')} has no judgement with relevance > 0.")
    return Dataset.from_dict({"anchor": anchors, "positive": positives}, info=DatasetInfo())


def _read_pair_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    # The datasets loaders (Arrow-backed, memory-mapped) handle files far larger than memory.
    try:
        if suffix in (".jsonl", ".json"):
            return Dataset.from_json(str(path))
        if suffix == ".csv":
            return Dataset.from_csv(str(path), keep_default_na=False)
        if suffix == ".tsv":
            # QUOTE_NONE (3): a tab-separated line is split on tabs only; quotes are part of the text.
            return Dataset.from_csv(str(path), sep="\t", quoting=3, keep_default_na=False)
        if suffix == ".parquet":
            return Dataset.from_parquet(str(path))
    # The loaders raise many types (ArrowInvalid, ParserError, DatasetGenerationError): all mean "unreadable".
    except Exception as error:
        raise UserInputError(
            f"{path}: cannot read it as {suffix[1:]} ({type(error).__name__}: {error})."
        ) from None
    raise UserInputError(
        f"{path}: unknown pair file type {suffix!r}; use one of {', '.join(PAIR_FILE_SUFFIXES)} or a BEIR folder."
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def _load_hub_dataset(name: str, config: str | None, split: str) -> Dataset:
    from datasets import load_dataset

    offline = any(
        os.environ.get(var, "0").lower() in {"1", "true", "yes"}
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as error:  # hub, cache and config errors come in many types; all mean "cannot load it"
        hint = (
            " HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: download the dataset first (it is then read from the "
            "cache), or pass a local pair file or BEIR folder."
            if offline
            else " Check the name, hf_config and split, or pass a local pair file or BEIR folder."
        )
        raise UserInputError(f"cannot load hub dataset {name!r} (split {split!r}): {error}.{hint}") from None
    if not isinstance(dataset, Dataset):
        raise UserInputError(
            f"hub dataset {name!r} split {split!r} is not a plain dataset: pass a single split."
        )
    return dataset


def _select_columns(
    dataset: Dataset,
    where: Path | str,
    query_column: str | None,
    positive_column: str | None,
    negative_columns: Sequence[str] | None,
) -> Dataset:
    available = dataset.column_names
    query = _pick_column(available, query_column, QUERY_COLUMNS, "query", where)
    positive = _pick_column(available, positive_column, POSITIVE_COLUMNS, "positive", where)
    if negative_columns is None:
        negatives = sorted(
            (c for c in available if c == "negative" or c.startswith("negative_")), key=_negative_order
        )
    else:
        negatives = [_pick_column(available, c, (), "negative", where) for c in negative_columns]
    for column in (query, positive, *negatives):
        if getattr(dataset.features[column], "dtype", None) not in ("string", "large_string"):
            raise UserInputError(
                f"{where}: column {column!r} holds {dataset.features[column]}, not text; name a text column."
            )
    columns = [query, positive, *negatives]
    dataset = dataset.select_columns(columns)
    names = ["anchor", "positive", *(f"negative_{i}" for i in range(1, len(negatives) + 1))]
    # Rename through temporary names: a source column may already be called like a target one.
    dataset = dataset.rename_columns({c: f"__tmp_{i}" for i, c in enumerate(columns)})
    return dataset.rename_columns({f"__tmp_{i}": name for i, name in enumerate(names)})


def _negative_order(column: str) -> tuple[int, str]:
    suffix = column.rsplit("_", 1)[-1]
    return (int(suffix) if suffix.isdigit() else 0, column)


def _pick_column(
    available: list[str], wanted: str | None, candidates: Sequence[str], role: str, where: Path | str
) -> str:
    if wanted is not None:
        if wanted not in available:
            raise UserInputError(
                f"{where}: no column {wanted!r} for the {role} text; available columns: {available}. "
                f"Pass the right name as {role}_column."
            )
        return wanted
    for candidate in candidates:
        if candidate in available:
            return candidate
    raise UserInputError(
        f"{where}: found no {role} column (looked for {list(candidates)}); available columns: {available}. "
        f"Name it with {role}_column."
    )


def _drop_empty(dataset: Dataset, label: str) -> Dataset:
    """Rows with an empty text teach nothing and can crash tokenisation: drop them, saying how many."""
    columns = dataset.column_names
    kept = dataset.filter(lambda row: all(isinstance(row[c], str) and row[c].strip() for c in columns))
    if len(kept) < len(dataset):
        logger.warning("%s: dropped %d rows with an empty text.", label, len(dataset) - len(kept))
    if len(kept) == 0:
        raise UserInputError(f"{label}: no pair with a non-empty query and positive text.")
    return kept


# --------------------------------------------------------------------------------------------------
# Dev evaluation
# --------------------------------------------------------------------------------------------------


def dev_evaluator(
    beir_folder: str | os.PathLike,
    split: str = "dev",
    *,
    max_corpus: int | None = None,
    max_queries: int | None = None,
    name: str = "dev",
    batch_size: int = 64,
    seed: int = 0,
    show_progress_bar: bool = False,
) -> InformationRetrievalEvaluator:
    """An ``InformationRetrievalEvaluator`` on one split of a BEIR folder, for model selection.

    Encoding the whole corpus at every evaluation is the cost of dev evaluation; ``max_corpus`` bounds it:
    the corpus keeps every document judged for the chosen queries plus randomly drawn others up to
    ``max_corpus`` documents (scores are then higher than on the full corpus, but rank models the same way,
    which is all model selection needs). ``max_queries`` keeps a random subset of the queries.
    """
    data = load_beir(beir_folder, split)
    relevant = {q: {d for d, rel in judged.items() if rel > 0} for q, judged in data.qrels.items()}
    relevant = {q: docs for q, docs in relevant.items() if docs}
    if not relevant:
        raise UserInputError(f"{beir_folder}: split {split!r} has no judgement with relevance > 0.")
    rng = random.Random(seed)
    query_ids = sorted(relevant)
    if max_queries is not None and max_queries < len(query_ids):
        query_ids = sorted(rng.sample(query_ids, max_queries))
    judged_docs = sorted({d for q in query_ids for d in relevant[q]})
    doc_ids = list(judged_docs)
    if max_corpus is not None and max_corpus > len(judged_docs):
        judged = set(judged_docs)
        others = [d for d in data.corpus if d not in judged]
        doc_ids += rng.sample(others, min(len(others), max_corpus - len(judged_docs)))
    elif max_corpus is None:
        doc_ids = list(data.corpus)
    elif max_corpus < len(judged_docs):
        logger.warning(
            "max_corpus=%d is below the %d judged documents of %d queries: all judged documents are kept.",
            max_corpus,
            len(judged_docs),
            len(query_ids),
        )
    logger.info("Dev evaluator %r: %d queries, %d documents.", name, len(query_ids), len(doc_ids))
    return InformationRetrievalEvaluator(
        queries={q: data.queries[q] for q in query_ids},
        corpus={d: data.document_text(d) for d in doc_ids},
        relevant_docs={q: relevant[q] for q in query_ids},
        name=name,
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
    )


# --------------------------------------------------------------------------------------------------
# Hard negatives
# --------------------------------------------------------------------------------------------------


def mine_negatives(
    pairs: Dataset,
    model: SentenceTransformer,
    num_negatives: int = 1,
    *,
    corpus: Sequence[str] | None = None,
    range_min: int = 0,
    range_max: int | None = 50,
    relative_margin: float | None = 0.05,
    max_score: float | None = None,
    sampling_strategy: Literal["top", "random"] = "top",
    batch_size: int = 64,
    use_faiss: bool = True,
    verbose: bool = True,
) -> Dataset:
    """Add ``negative_1`` ... ``negative_n`` columns of hard negatives mined with ``model``.

    A thin wrapper around ``sentence_transformers.util.mine_hard_negatives`` (FAISS search) whose defaults
    follow NV-Retriever's best setting, *TopK-PercPos*: take the top-ranked candidates, but only those whose
    similarity to the query is at least 5 % below the positive's (``relative_margin=0.05``). The margin is
    what keeps unlabeled positives (near-duplicates of the positive, common in real corpora) out of the
    negatives; raise ``range_min`` to skip the very top as well when the labels are known to be sparse.
    Candidates are the positives of the other pairs plus ``corpus``. Rows for which not enough negatives
    pass the filters are dropped by the library (it reports how many).
    """
    from sentence_transformers.util import mine_hard_negatives

    if num_negatives < 1:
        raise UserInputError(f"num_negatives={num_negatives}: mine at least one negative.")
    missing = {"anchor", "positive"} - set(pairs.column_names)
    if missing:
        raise UserInputError(
            f"the pairs lack the columns {sorted(missing)}: pass the output of load_pairs()."
        )
    candidates = len(set(pairs["positive"]) | set(corpus or ()))
    if range_max is not None:
        range_max = min(range_max, candidates - 1)
    if range_max is not None and num_negatives > range_max - range_min:
        raise UserInputError(
            f"cannot mine {num_negatives} negatives from ranks {range_min}..{range_max} of {candidates} candidates: "
            "lower num_negatives or range_min, or add documents with corpus=."
        )
    mined = mine_hard_negatives(
        pairs.select_columns(["anchor", "positive"]),
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        corpus=list(corpus) if corpus is not None else None,
        range_min=range_min,
        range_max=range_max,
        relative_margin=relative_margin,
        max_score=max_score,
        num_negatives=num_negatives,
        sampling_strategy=sampling_strategy,
        output_format="n-tuple",
        batch_size=batch_size,
        use_faiss=use_faiss,
        verbose=verbose,
    )
    if len(mined) == 0:
        raise UserInputError(
            "no pair kept enough negatives: lower relative_margin or num_negatives, or raise range_max."
        )
    renames = {c: f"negative_{c.rsplit('_', 1)[-1]}" for c in mined.column_names if c.startswith("negative")}
    if num_negatives == 1 and "negative" in mined.column_names:
        renames = {"negative": "negative_1"}
    mined = mined.rename_columns({k: v for k, v in renames.items() if k != v})
    mined.info.dataset_name = pairs.info.dataset_name
    return mined


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class _EffectiveBatchLogger(TrainerCallback):
    """Logs the effective batch and the number of in-batch negatives once training starts."""

    def __init__(self, loss_name: str, mini_batch_size: int | None) -> None:
        self.loss_name = loss_name
        self.mini_batch_size = mini_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        extra = f", GradCache mini-batches of {self.mini_batch_size}" if self.mini_batch_size else ""
        logger.info(
            "Effective batch size %d (%d per device x %d gradient accumulation x %d processes); %s sees %d "
            "in-batch candidates per query%s; %d optimizer steps, from step %d.",
            effective,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.world_size,
            self.loss_name,
            args.per_device_train_batch_size,
            extra,
            state.max_steps,
            state.global_step,
        )


class _NonFiniteLossGuard(TrainerCallback):
    """Stops training with :class:`NonFiniteLossError` when the loss is NaN or infinite.

    A forward hook on the loss checks each training loss as it is computed, so the error is raised before
    the backward pass and the optimizer step: the last checkpoint keeps the last good weights.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.name = type(loss).__name__
        self.step: int | None = None
        loss.register_forward_hook(self._check)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        self.step = None

    def _check(self, module, inputs, output):
        if self.step is None or not torch.is_grad_enabled():
            return  # outside training (evaluation loss): not our business
        values = output.values() if isinstance(output, dict) else [output]
        for value in values:
            if isinstance(value, torch.Tensor) and not torch.isfinite(value.detach()).all():
                bad = value.detach()[~torch.isfinite(value.detach())].reshape(-1)[0].item()
                raise NonFiniteLossError(
                    f"the {self.name} loss became {bad} at step {self.step}; training stopped before applying "
                    "it, so the last checkpoint is intact. Usual causes: a learning rate that is too high (lower "
                    "it or add warmup), fp16 overflow (use bf16 or fp32), or corrupt input."
                )


def build_loss(
    model: SentenceTransformer, loss: str = "mnrl", *, scale: float = 20.0, mini_batch_size: int = 32
) -> nn.Module:
    """``mnrl`` -> ``MultipleNegativesRankingLoss``; ``cached_mnrl`` -> ``CachedMultipleNegativesRankingLoss``.

    Gradient accumulation does not add in-batch negatives (each micro-batch is its own softmax); the
    cached loss does: it embeds the whole batch in ``mini_batch_size`` chunks without keeping the graph,
    so batches of thousands fit in the memory of ``mini_batch_size``.
    """
    if loss == "mnrl":
        return MultipleNegativesRankingLoss(model, scale=scale)
    if loss == "cached_mnrl":
        if mini_batch_size < 1:
            raise UserInputError(f"mini_batch_size={mini_batch_size}: use a positive size.")
        return CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch_size)
    raise UserInputError(f"unknown loss {loss!r}: choose 'mnrl' or 'cached_mnrl'.")


def primary_metric_key(evaluator: BaseEvaluator, model: SentenceTransformer) -> str:
    """The evaluator's primary metric as the trainer logs it (``eval_<name>_<similarity>_ndcg@10``).

    ``InformationRetrievalEvaluator`` only fills ``primary_metric`` on its first call; its value is derived
    here the same way (the model's similarity function, the largest nDCG cut-off) so that no evaluation
    has to run before training. Other evaluators are run once when they do not declare it.
    """
    metric = evaluator.primary_metric
    if not metric and isinstance(evaluator, InformationRetrievalEvaluator):
        if evaluator.main_score_function is not None:
            function = evaluator.main_score_function.value
        elif evaluator.score_function_names and len(evaluator.score_function_names) == 1:
            function = evaluator.score_function_names[0]
        else:
            function = model.similarity_fn_name or "cosine"
        metric = f"{function}_ndcg@{max(evaluator.ndcg_at_k)}"
        if evaluator.name:
            metric = f"{evaluator.name}_{metric}"
    elif not metric:
        logger.info("Running the evaluator once to learn its primary metric.")
        evaluator(model)
        metric = evaluator.primary_metric
        if not metric:
            raise UserInputError(
                f"{type(evaluator).__name__} declares no primary_metric to select checkpoints with."
            )
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def finetune(
    model: SentenceTransformer,
    train_pairs: Dataset,
    output_dir: str | os.PathLike,
    *,
    evaluator: BaseEvaluator | None = None,
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl",
    mini_batch_size: int = 32,
    batch_size: int = 64,
    learning_rate: float = 2e-5,
    epochs: float = 1,
    max_steps: int = -1,
    warmup_ratio: float = 0.1,
    scale: float = 20.0,
    eval_steps: int | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    bf16: bool = False,
    gradient_accumulation_steps: int = 1,
    dataloader_num_workers: int = 0,
    dataloader_drop_last: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    extra_args: dict[str, Any] | None = None,
    train_dataset_name: str | None = None,
    stage1_info: dict[str, Any] | None = None,
    language: str | list[str] | None = None,
) -> SentenceTransformer:
    """Fine-tune ``model`` on (anchor, positive[, negative_1...]) rows and save it to ``output_dir/final``.

    * Checkpoints go to ``output_dir/checkpoints``. With ``resume`` (the default) a run that finds one there
      continues from the last (optimizer, scheduler, RNG and data position included) instead of starting
      over; with ``resume=False`` existing checkpoints are an error unless ``overwrite``.
    * With an ``evaluator`` the model is evaluated every ``eval_steps`` (default ``save_steps``) and at the
      end, a checkpoint is saved at each evaluation, and the best one by the evaluator's primary metric is
      what ends up in ``final`` (``load_best_model_at_end``). ``save_total_limit`` never deletes the best.
    * ``final`` is written atomically: the model (loadable with ``SentenceTransformer(path)``), its model
      card (README.md: datasets, loss, metrics, and stage 1 when ``stage1_info`` is given) and
      ``training_log.json`` (the trainer's ``log_history`` plus the best checkpoint and metric).
    * ``extra_args`` are passed on to ``SentenceTransformerTrainingArguments`` and win over the above.

    Returns the fine-tuned model (the best checkpoint's weights when an evaluator is given).
    """
    output_dir = Path(output_dir)
    final_dir, checkpoint_dir = output_dir / "final", output_dir / "checkpoints"
    _check_training_options(train_pairs, batch_size, save_steps, eval_steps, evaluator, max_steps, epochs)
    ensure_can_write(final_dir, overwrite)
    last_checkpoint = _last_checkpoint(checkpoint_dir, resume, overwrite)
    _fill_card_data(model, train_pairs, train_dataset_name, stage1_info, language)

    loss_module = build_loss(model, loss, scale=scale, mini_batch_size=mini_batch_size)
    eval_steps = eval_steps or save_steps
    metric = primary_metric_key(evaluator, model) if evaluator is not None else None
    arguments: dict[str, Any] = {
        "output_dir": str(checkpoint_dir),
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate,
        # transformers 5 takes a float in [0, 1) in warmup_steps as the warmup ratio.
        "warmup_steps": float(warmup_ratio) if 0 < warmup_ratio < 1 else int(warmup_ratio),
        "bf16": bf16,
        "batch_sampler": BatchSamplers.NO_DUPLICATES,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "logging_steps": logging_steps,
        "logging_first_step": True,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": dataloader_num_workers,
        "dataloader_drop_last": dataloader_drop_last,
        "report_to": "none",
        # Under torchrun / accelerate launch on CPU-only machines the trainer needs use_cpu=True to set up DDP.
        **launcher_args(),
    }
    if evaluator is not None:
        arguments |= {
            "eval_strategy": "steps",
            "eval_steps": eval_steps,
            "load_best_model_at_end": True,
            "metric_for_best_model": metric,
            "greater_is_better": getattr(evaluator, "greater_is_better", True),
        }
    arguments |= extra_args or {}
    args = SentenceTransformerTrainingArguments(**arguments)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_pairs,
        loss=loss_module,
        evaluator=evaluator,
        callbacks=[
            _EffectiveBatchLogger(
                type(loss_module).__name__, mini_batch_size if loss == "cached_mnrl" else None
            ),
            _NonFiniteLossGuard(loss_module),
            *callbacks,
        ],
    )
    if last_checkpoint:
        logger.info("Resuming from %s.", last_checkpoint)
    trainer.train(resume_from_checkpoint=last_checkpoint)
    model = trainer.model
    if trainer.is_world_process_zero():  # one writer: every rank holds the same weights
        _save_final(model, trainer, final_dir, overwrite, metric, stage1_info)
    return model


def _check_training_options(
    train_pairs: Dataset,
    batch_size: int,
    save_steps: int,
    eval_steps: int | None,
    evaluator: BaseEvaluator | None,
    max_steps: int,
    epochs: float,
) -> None:
    if not isinstance(train_pairs, Dataset) or len(train_pairs) == 0:
        raise UserInputError(
            "train_pairs is empty or not a datasets.Dataset: pass the output of load_pairs()."
        )
    if list(train_pairs.column_names[:2]) != ["anchor", "positive"]:
        raise UserInputError(
            f"train_pairs has columns {train_pairs.column_names}; expected anchor, positive[, negative_1...] "
            "(MNRL reads the columns by position): pass the output of load_pairs()."
        )
    if batch_size < 2:
        raise UserInputError(f"batch_size={batch_size}: in-batch negatives need a batch of at least 2.")
    if save_steps < 1:
        raise UserInputError(f"save_steps={save_steps}: use a positive number of steps.")
    if max_steps <= 0 and epochs <= 0:
        raise UserInputError("neither max_steps nor epochs is positive: the run would train nothing.")
    if evaluator is not None and eval_steps is not None and save_steps % eval_steps != 0:
        raise UserInputError(
            f"save_steps={save_steps} is not a multiple of eval_steps={eval_steps}: the best checkpoint can only be "
            "kept if a checkpoint is saved at every evaluation that may be best; make save_steps a multiple."
        )


def _last_checkpoint(checkpoint_dir: Path, resume: bool, overwrite: bool) -> str | None:
    if not checkpoint_dir.is_dir():
        return None
    last = get_last_checkpoint(str(checkpoint_dir))
    if last is None:
        return None
    if resume:
        # A checkpoint cut short by a crash has no trainer_state.json (written last): resume from the one before.
        from retromae_st.training import last_complete_checkpoint

        complete = last_complete_checkpoint(checkpoint_dir)
        if complete is None:
            logger.warning("No complete checkpoint in %s; starting from scratch.", checkpoint_dir)
        return str(complete) if complete is not None else None
    if not overwrite:
        raise UserInputError(
            f"{checkpoint_dir} holds checkpoints of an earlier run ({Path(last).name}): resume it (resume=True), "
            "choose another output folder, or pass overwrite=True to start over."
        )
    logger.warning("Starting over: the checkpoints in %s will be replaced.", checkpoint_dir)
    import shutil

    shutil.rmtree(checkpoint_dir)
    return None


def _fill_card_data(
    model: SentenceTransformer,
    train_pairs: Dataset,
    train_dataset_name: str | None,
    stage1_info: dict[str, Any] | None,
    language: str | list[str] | None,
) -> None:
    card = model.model_card_data
    name = train_dataset_name or train_pairs.info.dataset_name
    if name:
        # Exactly one entry per training dataset, or the trainer's card callback discards it.
        card.train_datasets = [{"name": name}]
    if language:
        card.set_language(language)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        card.local_files_only = True  # do not look datasets or base models up on the hub
    card.add_tags(["retromae-st"])
    if stage1_info is not None:
        card.add_tags(["retromae"])
    if not card.model_name:
        base = "RetroMAE-pretrained encoder" if stage1_info is not None else "Sentence Transformer"
        card.model_name = f"{base} fine-tuned on {name}" if name else f"{base} fine-tuned with MNRL"


def _save_final(
    model: SentenceTransformer,
    trainer: SentenceTransformerTrainer,
    final_dir: Path,
    overwrite: bool,
    metric: str | None,
    stage1_info: dict[str, Any] | None,
) -> None:
    state = trainer.state
    if stage1_info is not None:
        # set_losses() rebuilt the citations during training; RetroMAE is added after it.
        model.model_card_data.citations["RetroMAE"] = RETROMAE_CITATION
    args = trainer.args
    log = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "metric_for_best_model": metric,
        "best_metric": state.best_metric,
        "best_model_checkpoint": Path(state.best_model_checkpoint).name
        if state.best_model_checkpoint
        else None,
        "effective_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "stage1": stage1_info,
        "log_history": state.log_history,
    }
    with atomic_dir(final_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if stage1_info is not None:
            _add_stage1_section(tmp / "README.md", stage1_info)
        atomic_write_json(tmp / TRAINING_LOG, log)
    best = f", best {metric} = {state.best_metric:.4f} at {log['best_model_checkpoint']}" if metric else ""
    logger.info("Saved the fine-tuned model to %s (step %d%s).", final_dir, state.global_step, best)


def _add_stage1_section(readme: Path, stage1_info: dict[str, Any]) -> None:
    """The stock card knows only the run that wrote it; the RetroMAE stage is described by hand."""
    lines = [
        "### Stage 1: RetroMAE pretraining",
        "",
        "Before this contrastive fine-tuning (stage 2), the encoder was pretrained with RetroMAE "
        "([Xiao et al., 2022](https://arxiv.org/abs/2205.12035)): a masked auto-encoder whose light decoder "
        "rebuilds heavily masked text from the encoder's [CLS] sentence embedding.",
        "",
    ]
    lines += [f"- **{key}:** {_card_value(value)}" for key, value in stage1_info.items()]
    section = "\n".join(lines) + "\n\n### Stage 2: contrastive fine-tuning\n"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    marker = "## Training Details\n"
    text = (
        text.replace(marker, marker + "\n" + section, 1)
        if marker in text
        else text + "\n## Training Details\n\n" + section
    )
    readme.write_text(text, encoding="utf-8")


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)

"""Stage-2 training data: (query, positive[, negatives]) pairs from BEIR qrels, pair files or the hub, with
clear errors, and the dev-split evaluator used to pick the best checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetInfo
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from retromae_st.data.beir import load_beir
from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)

# Column names tried, in order, when the caller does not name the query / positive columns.
QUERY_COLUMNS = ("anchor", "query", "question", "sentence1")
POSITIVE_COLUMNS = ("positive", "passage", "document", "answer", "pos", "sentence2")
PAIR_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


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

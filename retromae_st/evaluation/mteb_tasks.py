"""MTEB: built-in tasks by name and local BEIR folders as custom ``AbsTaskRetrieval`` tasks (mteb 2.x).

Scores are stored by mteb's own ``ResultCache`` in a folder keyed by the model label *and* its weights
fingerprint, so two different models (or two trainings saved under the same name) never share cached
scores. Local BEIR tasks carry a fingerprint of their files as dataset revision; a cached score for
changed data is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mteb
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.cache import ResultCache
from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
from sentence_transformers import SentenceTransformer

from retromae_st.data.beir import BeirData, load_beir
from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)

# mteb score names -> the names used in our reports.
_SCORE_NAMES = {
    "ndcg_at_10": "ndcg@10",
    "mrr_at_10": "mrr@10",
    "recall_at_10": "recall@10",
    "recall_at_100": "recall@100",
    "recall_at_1000": "recall@1000",
    "map_at_100": "map@100",
}


def slug(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def folder_fingerprint(folder: Path, split: str) -> str:
    """A digest of the files a BEIR split is read from (content, not modification time)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class LocalBeirRetrieval(AbsTaskRetrieval):
    """A local BEIR folder as an MTEB retrieval task; create it with :func:`beir_task`.

    The data is read and validated by :func:`retromae_st.data.beir.load_beir`, never fetched from the hub.
    """

    metadata: TaskMetadata
    folder: Path
    split: str
    beir: BeirData

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """Turn the already validated BEIR data into mteb's ``RetrievalSplitData`` (no hub access)."""
        if self.data_loaded:
            return
        from datasets import Dataset

        beir = self.beir
        corpus = Dataset.from_list(
            [
                {"id": doc_id, "title": doc["title"], "text": doc["text"]}
                for doc_id, doc in beir.corpus.items()
            ]
        )
        queries = Dataset.from_list(
            [{"id": query_id, "text": text} for query_id, text in beir.queries.items()]
        )
        relevant = {query_id: dict(docs) for query_id, docs in beir.qrels.items()}
        self.dataset = {
            "default": {
                self.split: RetrievalSplitData(
                    corpus=corpus, queries=queries, relevant_docs=relevant, top_ranked=None
                )
            }
        }
        self.data_loaded = True


def beir_task(
    folder: str | os.PathLike, split: str = "test", *, language: str = "eng-Latn"
) -> LocalBeirRetrieval:
    """A :class:`LocalBeirRetrieval` task for one BEIR folder and split (validated at once)."""
    folder = Path(folder)
    beir = load_beir(folder, split)
    metadata = TaskMetadata(
        name=f"LocalBeir-{slug(folder.name)}",
        description=f"Local BEIR folder {folder.resolve()} (split {split}).",
        reference=None,
        dataset={"path": str(folder.resolve()), "revision": folder_fingerprint(folder, split)},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=[language],
        main_score="ndcg_at_10",
        license="not specified",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )
    # A class per folder: mteb reads ``metadata`` from the class (unload_data drops instance copies).
    cls = type(
        f"LocalBeir_{slug(folder.name).replace('-', '_')}", (LocalBeirRetrieval,), {"metadata": metadata}
    )
    task = cls()
    task.folder, task.split, task.beir = folder, split, beir
    return task


def resolve_task(name_or_folder: str | os.PathLike, split: str = "test") -> mteb.AbsTask:
    """A local BEIR folder (an existing path) or a built-in MTEB task name, with its data loaded.

    Built-in tasks download their data from the Hugging Face hub; offline without a cached copy this
    fails at once with a :class:`UserInputError` (no retries).
    """
    path = Path(name_or_folder)
    if path.exists():
        return beir_task(path, split)
    name = str(name_or_folder)
    try:
        task = mteb.get_task(name)
    except KeyError as error:
        raise UserInputError(
            f"{name!r} is neither a folder nor an MTEB task name ({error.args[0] if error.args else error})."
        ) from None
    try:
        task.load_data()
    except Exception as error:  # datasets/hub raise many types (ConnectionError, OSError, HfHubHTTPError)
        offline = any(
            os.environ.get(v, "0").lower() in {"1", "true", "yes"}
            for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the data is not in the local Hugging Face cache: "
            "download it once online, or evaluate a local BEIR folder instead"
            if offline
            else "check the network and the task name"
        )
        raise UserInputError(
            f"cannot load the data of MTEB task {name!r}: {hint} ({type(error).__name__}: {error})."
        ) from None
    return task


def _wrap(model: SentenceTransformer, label: str, fingerprint: str) -> SentenceTransformerEncoderWrapper:
    wrapper = SentenceTransformerEncoderWrapper(model)
    # A unique name + revision per model and weights: mteb keys its result files by them.
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(
        update={"name": f"retromae-st/{slug(label)}", "revision": fingerprint[:12]}
    )
    return wrapper


def _scores_of(task_result: Any, split: str | None) -> dict[str, float]:
    """The scores of one task, averaged over its subsets (languages) on ``split`` (or its first split)."""
    splits = task_result.scores
    chosen = split if split in splits else next(iter(splits))
    entries = splits[chosen]
    scores: dict[str, float] = {}
    for key in {"main_score", *_SCORE_NAMES}:
        values = [entry[key] for entry in entries if isinstance(entry.get(key), (int, float))]
        if values:
            scores[_SCORE_NAMES.get(key, key)] = float(sum(values) / len(values))
    return scores


def results_folder(root: str | os.PathLike, label: str, fingerprint: str) -> Path:
    """Where mteb stores the scores of one model: ``root/<label>-<fingerprint[:12]>``."""
    return Path(root) / f"{slug(label)}-{fingerprint[:12]}"


def run_mteb(
    model: SentenceTransformer,
    tasks: Sequence[mteb.AbsTask],
    *,
    label: str,
    fingerprint: str,
    results_dir: str | os.PathLike,
    batch_size: int = 32,
    split: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` with ``mteb.evaluate`` and return ``{task name: {metric: value}}``.

    Scores already stored for this model and fingerprint are reused (mteb's ``only-missing`` policy),
    except for local tasks whose data changed since.
    """
    wrapper = _wrap(model, label, fingerprint)
    cache = ResultCache(cache_path=results_folder(results_dir, label, fingerprint))
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        cached = cache.load_task_result(task.metadata.name, wrapper.mteb_model_meta)
        stale = cached is not None and cached.dataset_revision != task.metadata.revision
        if stale:
            logger.info("data of %s changed since its cached score: re-running", task.metadata.name)
        result = mteb.evaluate(
            wrapper,
            task,
            cache=cache,
            overwrite_strategy="always" if stale else "only-missing",
            encode_kwargs={"batch_size": batch_size},
            show_progress_bar=False,
            raise_error=True,
        )
        task_split = split if isinstance(task, LocalBeirRetrieval) else None
        scores[task.metadata.name] = _scores_of(
            result.task_results[0], task_split or task.metadata.eval_splits[0]
        )
    return scores


def task_label(task: mteb.AbsTask) -> str:
    """The name a task has in reports: the folder name for local BEIR tasks, else the MTEB name."""
    return f"mteb:{task.folder.name}" if isinstance(task, LocalBeirRetrieval) else task.metadata.name


def label_scores(
    tasks: Sequence[mteb.AbsTask], scores: Mapping[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Re-key ``run_mteb`` output by :func:`task_label`."""
    return {task_label(task): scores[task.metadata.name] for task in tasks if task.metadata.name in scores}

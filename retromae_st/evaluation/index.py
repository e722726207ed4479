"""FAISS indexes over normalised embeddings: exact, HNSW and IVF-PQ; atomic save/load; search; merging.

All indexes use the inner-product metric on L2-normalised vectors, which ranks by cosine similarity
(the similarity of the models this project trains). ``index`` names accepted everywhere:

* ``"flat"``: exact search (``IndexFlatIP``);
* ``"hnsw"``: graph search, ``HNSW32`` with ``efSearch=128``;
* ``"ivfpq"``: inverted lists + product quantisation, ``IVF{nlist},PQ{m}x{bits}`` sized from the corpus;
* any other string is passed to ``faiss.index_factory`` as it is (e.g. ``"IVF1024,Flat"``,
  ``"HNSW64,Flat"``, ``"OPQ16,IVF4096,PQ16"``).

For corpora split across machines: :func:`train_template` trains one empty index on a sample, each
machine fills a copy with :func:`fill_index`, and :func:`merge_indexes` joins the parts (``merge_from``
for flat and IVF indexes; ``IndexShards`` for graph indexes, which cannot be merged).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retromae_st.errors import UserInputError
from retromae_st.evaluation.encode import ShardedEmbeddings
from retromae_st.io import ensure_can_write, make_readable, remove_stale_temporaries, temp_prefix

logger = logging.getLogger(__name__)

PRESETS = ("flat", "hnsw", "ivfpq")
DEFAULT_SEARCH_PARAMS = {"hnsw": "efSearch=128", "ivf": "nprobe={nprobe}"}
# faiss warns below 39 training points per centroid; training on more than this gains little.
POINTS_PER_CENTROID = 39
MAX_TRAIN = 256 * 1024

Vectors = np.ndarray | ShardedEmbeddings


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def factory_string(index: str, count: int, dim: int) -> str:
    """The ``faiss.index_factory`` string for a preset name (or ``index`` itself if it is not one)."""
    if not index or not index.strip():
        raise UserInputError("index must be 'flat', 'hnsw', 'ivfpq' or a faiss index_factory string.")
    name = index.strip()
    if name.lower() == "flat":
        return "Flat"
    if name.lower() == "hnsw":
        return "HNSW32"
    if name.lower() == "ivfpq":
        # nlist ~ 4 sqrt(n) (the faiss guideline), capped so every list gets enough training points.
        nlist = max(1, min(int(4 * math.sqrt(count)), count // POINTS_PER_CENTROID))
        # m sub-quantisers of >= 4 dimensions each, m dividing dim; 8-bit codes when the corpus can train them.
        m = max((c for c in range(1, min(dim, 64) + 1) if dim % c == 0 and dim // c >= 4), default=1)
        bits = max(1, min(8, int(math.log2(max(2, count // POINTS_PER_CENTROID)))))
        return f"IVF{nlist},PQ{m}x{bits}"
    return name


def _default_params(index: faiss.Index) -> str | None:
    with contextlib.suppress(RuntimeError):
        ivf = faiss.extract_index_ivf(index)
        # A few lists per query: a common speed/recall balance; "nprobe=..." in search_params overrides.
        return DEFAULT_SEARCH_PARAMS["ivf"].format(nprobe=max(1, min(ivf.nlist, max(8, ivf.nlist // 16))))
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        return DEFAULT_SEARCH_PARAMS["hnsw"]
    return None


def set_search_params(index: faiss.Index, params: str | None) -> None:
    """Apply ``"nprobe=32,efSearch=256"``-style parameters through ``faiss.ParameterSpace``."""
    if not params:
        return
    space = faiss.ParameterSpace()
    for item in params.split(","):
        name, _, value = item.partition("=")
        try:
            space.set_index_parameter(index, name.strip(), float(value))
        except (RuntimeError, ValueError) as error:
            raise UserInputError(f"cannot set search parameter {item!r} on this index: {error}") from None


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turn off faiss's polysemous PQ training: it only serves Hamming pre-filtering, which we never use,
    and makes training IVF-PQ about 40x slower (minutes instead of seconds on 5,000 vectors)."""
    inner = faiss.downcast_index(index)
    with contextlib.suppress(RuntimeError):
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def train_template(
    sample: np.ndarray, index: str = "flat", *, count: int | None = None, seed: int = 0
) -> faiss.Index:
    """An empty index of the given kind, trained (when it needs training) on ``sample``.

    ``count`` is the full corpus size, used to size presets (defaults to ``len(sample)``).
    """
    sample = _as_float32(sample)
    if sample.ndim != 2 or len(sample) == 0:
        raise UserInputError("cannot build an index from an empty set of vectors: the corpus is empty.")
    factory = factory_string(index, count or len(sample), sample.shape[1])
    try:
        built = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UserInputError(f"faiss cannot build index {factory!r}: {str(error).splitlines()[-1]}") from None
    _skip_polysemous_training(built)
    if not built.is_trained:
        if len(sample) > MAX_TRAIN:
            sample = sample[np.random.default_rng(seed).choice(len(sample), MAX_TRAIN, replace=False)]
        logger.info("training %s on %d vectors", factory, len(sample))
        try:
            built.train(sample)
        except RuntimeError as error:
            raise UserInputError(
                f"faiss cannot train {factory!r} on {len(sample)} vectors ({str(error).splitlines()[-1]}): "
                "use a smaller index (fewer lists or codes) or 'flat'/'hnsw' for small corpora."
            ) from None
    set_search_params(built, _default_params(built))
    return built


def _batches(vectors: Vectors, batch: int = 65_536) -> Iterable[np.ndarray]:
    arrays = vectors.shards() if isinstance(vectors, ShardedEmbeddings) else [vectors]
    for array in arrays:
        for start in range(0, len(array), batch):
            yield _as_float32(array[start : start + batch])


def fill_index(template: faiss.Index, vectors: Vectors, *, copy: bool = True) -> faiss.Index:
    """Add ``vectors`` (an array or on-disk shards, streamed) to a copy of a trained ``template``."""
    index = faiss.clone_index(template) if copy else template
    if copy:
        set_search_params(index, _default_params(index))
    with tqdm(total=len(vectors), desc="Indexing", unit="vec") as bar:
        for batch in _batches(vectors):
            index.add(batch)
            bar.update(len(batch))
    return index


def build_index(
    vectors: Vectors, index: str = "flat", *, search_params: str | None = None, seed: int = 0
) -> faiss.Index:
    """Build a filled index over ``vectors`` (normalised embeddings, an array or :class:`ShardedEmbeddings`)."""
    count = len(vectors)
    if count == 0:
        raise UserInputError("cannot build an index over an empty corpus.")
    if isinstance(vectors, ShardedEmbeddings):
        sample = vectors.sample(MAX_TRAIN, seed=seed)
    else:
        sample = vectors if len(vectors) <= MAX_TRAIN else vectors[:MAX_TRAIN]
    template = train_template(sample, index, count=count, seed=seed)
    built = fill_index(template, vectors, copy=False)
    set_search_params(built, search_params)
    return built


def search(
    index: faiss.Index, queries: np.ndarray, k: int, *, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores, ids)`` for each query; ids are -1 where the index has fewer than ``k`` hits."""
    queries = _as_float32(queries)
    k = max(1, min(k, index.ntotal))
    scores, ids = [], []
    for start in range(0, len(queries), batch_size):
        batch_scores, batch_ids = index.search(queries[start : start + batch_size], k)
        scores.append(batch_scores)
        ids.append(batch_ids)
    if not scores:
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    return np.concatenate(scores), np.concatenate(ids)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`search` plus the queries per second it achieved."""
    begin = time.perf_counter()
    scores, ids = search(index, queries, k)
    elapsed = max(time.perf_counter() - begin, 1e-9)
    return scores, ids, len(queries) / elapsed


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-``k`` that the approximate search also returned in its top-``k``."""
    if len(exact_ids) == 0:
        return float("nan")
    hits = [
        len(set(a[:k]) & set(e[:k]) - {-1}) / max(1, len(set(e[:k]) - {-1}))
        for a, e in zip(approx_ids, exact_ids)
    ]
    return float(np.mean(hits))


def save_index(index: faiss.Index, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``index`` with ``faiss.write_index`` to a temporary sibling, then rename it into place."""
    path = Path(path)
    ensure_can_write(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        make_readable(tmp)  # mkstemp makes it 0600 whatever the umask
        os.replace(tmp, path)
    except RuntimeError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise UserInputError(
            f"faiss cannot save this index to {path}: {str(error).splitlines()[-1]}"
        ) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_index(path: str | os.PathLike, *, mmap: bool = False) -> faiss.Index:
    """Read an index written by :func:`save_index` (``mmap=True`` maps it instead of reading it)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} is missing: pass a file written by save_index / faiss.write_index.")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as error:
        raise UserInputError(f"{path} is not a readable faiss index: {str(error).splitlines()[-1]}") from None
    set_search_params(index, _default_params(index))
    return index


def _mergeable(index: faiss.Index) -> bool:
    with contextlib.suppress(RuntimeError):
        faiss.extract_index_ivf(index)
        return True
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def merge_indexes(parts: Sequence[faiss.Index]) -> faiss.Index:
    """Join per-part indexes (in corpus order) into one whose ids are global row numbers.

    Flat and IVF parts (built from one trained template) are merged into a single index with
    ``merge_from``, which can be saved. Other kinds (HNSW graphs cannot be merged) are wrapped in
    ``faiss.IndexShards`` with successive ids, which searches every part and merges the hits; save
    such parts one by one and wrap them again after loading.
    """
    if not parts:
        raise UserInputError("no index parts to merge.")
    dims = {part.d for part in parts}
    if len(dims) > 1:
        raise UserInputError(
            f"index parts have different dimensions {sorted(dims)}: they come from different models."
        )
    if all(_mergeable(part) for part in parts):
        merged = faiss.clone_index(parts[0])
        is_flat = isinstance(faiss.downcast_index(merged), faiss.IndexFlat)
        for part in parts[1:]:
            try:
                # IVF: add_id shifts the part's local ids (0..n-1) to global row numbers. Flat indexes
                # store no ids (a row's id is its position), so appending is already global.
                merged.merge_from(part, 0 if is_flat else merged.ntotal)
            except RuntimeError as error:
                raise UserInputError(
                    f"cannot merge index parts ({str(error).splitlines()[-1]}): build every part from the same "
                    "trained template (train_template + fill_index)."
                ) from None
        set_search_params(merged, _default_params(merged))
        return merged
    shards = faiss.IndexShards(parts[0].d, False, True)  # threaded=False, successive_ids=True
    for part in parts:
        shards.add_shard(part)
    return shards

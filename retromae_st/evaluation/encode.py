"""Encoding texts in batches, streamed to ``.npy`` shards on disk and cached by content fingerprint.

Layout of an embeddings folder (written atomically, so a crash never leaves a half-written one)::

    manifest.json        {"format", "dim", "count", "offset", "total", "normalized", "kind",
                          "model_fingerprint", "texts_fingerprint", "shards": [{"file", "rows"}]}
    shard-00000.npy      float32 [rows, dim]
    shard-00001.npy      ...

Shards are read back with ``numpy.load(mmap_mode="r")``, so a corpus larger than memory is never held
in RAM at once. ``part``/``num_parts`` split one corpus across processes or machines: each writes its
own folder with the global row ``offset`` of its slice; :func:`open_parts` checks the parts cover
the corpus exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from retromae_st.errors import UserInputError
from retromae_st.evaluation.fingerprint import combine, model_fingerprint, texts_fingerprint
from retromae_st.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = "retromae-st-embeddings/1"
Kind = Literal["query", "document"]


@dataclass
class ShardedEmbeddings:
    """An embeddings folder on disk: a manifest and ``.npy`` shards loaded lazily with mmap."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ShardedEmbeddings:
        """Open and validate an embeddings folder written by :func:`encode_to_shards`."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise UserInputError(f"{path} is missing: {folder} is not an embeddings folder.")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserInputError(
                f"{path}: invalid JSON ({error.msg}); delete {folder} and encode again."
            ) from None
        if manifest.get("format") != FORMAT:
            raise UserInputError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}.")
        rows = sum(shard["rows"] for shard in manifest["shards"])
        if rows != manifest["count"]:
            raise UserInputError(
                f"{path}: shards hold {rows} rows but the manifest says {manifest['count']}."
            )
        for shard in manifest["shards"]:
            if not (folder / shard["file"]).is_file():
                raise UserInputError(
                    f"{folder / shard['file']} is missing; delete {folder} and encode again."
                )
        return cls(folder=folder, manifest=manifest)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def offset(self) -> int:
        """Global index of this folder's first row (non-zero for a part of a split corpus)."""
        return int(self.manifest.get("offset", 0))

    def shards(self, mmap: bool = True) -> Iterator[np.ndarray]:
        """Yield each shard as a ``[rows, dim]`` float32 array, memory-mapped by default."""
        for shard in self.manifest["shards"]:
            yield np.load(self.folder / shard["file"], mmap_mode="r" if mmap else None, allow_pickle=False)

    def to_array(self) -> np.ndarray:
        """All rows in one array: the mmap itself when there is one shard, else a concatenated copy."""
        arrays = list(self.shards())
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(arrays)

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """``size`` rows drawn uniformly without replacement (e.g. to train an IVF/PQ index)."""
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(self), size=min(size, len(self)), replace=False))
        rows, start = [], 0
        for shard in self.shards():
            stop = start + len(shard)
            local = chosen[(chosen >= start) & (chosen < stop)] - start
            rows.append(np.asarray(shard[local]))
            start = stop
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)


def _plural(kind: str) -> str:
    return "queries" if kind == "query" else f"{kind}s"


def encode_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    kind: Kind = "document",
    batch_size: int = 32,
    normalize: bool = True,
    pool: dict[str, Any] | None = None,
    progress: tqdm | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Encode ``texts`` into a float32 ``[len(texts), dim]`` array with a progress bar.

    ``kind`` picks ``encode_query`` or ``encode_document``, so models with query/document prompts
    are used as intended. ``pool`` is a Sentence-Transformers multi-process pool
    (``model.start_multi_process_pool()``) to spread encoding over several processes.
    """
    if batch_size < 1:
        raise UserInputError(f"batch_size={batch_size} must be at least 1.")
    encode = model.encode_query if kind == "query" else model.encode_document
    # Chunks of several batches so one outer bar can show progress while each call stays vectorised.
    chunk = chunk_size or batch_size * 16
    own_bar = progress is None
    bar = (
        progress
        if progress is not None
        else tqdm(total=len(texts), desc=f"Encoding {_plural(kind)}", unit="text")
    )
    parts = []
    try:
        for start in range(0, len(texts), chunk):
            batch = list(texts[start : start + chunk])
            vectors = encode(
                batch,
                batch_size=batch_size,
                normalize_embeddings=normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
                pool=pool,
            )
            parts.append(np.asarray(vectors, dtype=np.float32))
            bar.update(len(batch))
    finally:
        if own_bar:
            bar.close()
    if not parts:
        dim = model.get_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts))


def part_range(total: int, part: int, num_parts: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` that part ``part`` of ``num_parts`` encodes."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise UserInputError(f"part={part} must be in [0, num_parts={num_parts}).")
    return total * part // num_parts, total * (part + 1) // num_parts


def encode_to_shards(
    model: SentenceTransformer,
    texts: Sequence[str],
    folder: str | os.PathLike,
    *,
    kind: Kind = "document",
    shard_size: int = 100_000,
    batch_size: int = 32,
    normalize: bool = True,
    part: int = 0,
    num_parts: int = 1,
    pool: dict[str, Any] | None = None,
    overwrite: bool = False,
    fingerprint: str | None = None,
) -> ShardedEmbeddings:
    """Encode ``texts`` (or part ``part`` of ``num_parts`` of them) into ``.npy`` shards in ``folder``.

    At most ``shard_size`` vectors are in memory at once. The folder appears only when complete.
    ``fingerprint`` is the model fingerprint when the caller already has it (hashing a large model
    takes a moment).
    """
    if shard_size < 1:
        raise UserInputError(f"shard_size={shard_size} must be at least 1.")
    start, stop = part_range(len(texts), part, num_parts)
    model_fp = fingerprint or model_fingerprint(model)
    shards = []
    dim = model.get_embedding_dimension()
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        bar = tqdm(
            total=stop - start, desc=f"Encoding {_plural(kind)} (part {part + 1}/{num_parts})", unit="text"
        )
        try:
            for number, begin in enumerate(range(start, stop, shard_size)):
                vectors = encode_texts(
                    model,
                    texts[begin : min(begin + shard_size, stop)],
                    kind=kind,
                    batch_size=batch_size,
                    normalize=normalize,
                    pool=pool,
                    progress=bar,
                )
                dim = vectors.shape[1]
                name = f"shard-{number:05d}.npy"
                np.save(tmp / name, vectors, allow_pickle=False)
                shards.append({"file": name, "rows": len(vectors)})
        finally:
            bar.close()
        atomic_write_json(
            tmp / "manifest.json",
            {
                "format": FORMAT,
                "dim": dim,
                "count": stop - start,
                "offset": start,
                "total": len(texts),
                "part": part,
                "num_parts": num_parts,
                "kind": kind,
                "normalized": normalize,
                "model_fingerprint": model_fp,
                "texts_fingerprint": texts_fingerprint(texts),
                "shards": shards,
            },
        )
    return ShardedEmbeddings.open(folder)


def open_parts(folders: Sequence[str | os.PathLike]) -> list[ShardedEmbeddings]:
    """Open the parts of one split corpus, sorted by offset, and check that they fit together.

    They must come from the same model and texts and cover rows ``0 .. total-1`` exactly once.
    """
    if not folders:
        raise UserInputError("no embedding parts given.")
    parts = sorted((ShardedEmbeddings.open(folder) for folder in folders), key=lambda p: p.offset)
    first = parts[0].manifest
    expected = 0
    for embeddings in parts:
        manifest = embeddings.manifest
        for key in ("model_fingerprint", "texts_fingerprint", "dim", "normalized", "kind", "total"):
            if manifest.get(key) != first.get(key):
                raise UserInputError(
                    f"{embeddings.folder} has {key}={manifest.get(key)!r} but {parts[0].folder} has "
                    f"{first.get(key)!r}: the parts do not belong to the same encoding."
                )
        if embeddings.offset != expected:
            raise UserInputError(
                f"{embeddings.folder} starts at row {embeddings.offset}, expected {expected}: a part is missing or repeated."
            )
        expected += len(embeddings)
    if expected != first["total"]:
        raise UserInputError(f"the parts cover {expected} of {first['total']} rows: a part is missing.")
    return parts


def encode_cached(
    model: SentenceTransformer,
    texts: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    kind: Kind = "document",
    batch_size: int = 32,
    normalize: bool = True,
    shard_size: int = 100_000,
    pool: dict[str, Any] | None = None,
    fingerprint: str | None = None,
) -> ShardedEmbeddings:
    """Encode ``texts`` once: reuse ``cache_dir/<key>`` when the model, texts and settings are unchanged.

    The key hashes the model fingerprint (weights, configuration, tokenizer), the texts, ``kind`` and
    ``normalize``; the batch size and shard size do not change the vectors and are not part of it.
    """
    model_fp = fingerprint or model_fingerprint(model)
    corpus_fp = texts_fingerprint(texts)
    key = combine(FORMAT, model_fp, corpus_fp, kind, normalize)
    folder = Path(cache_dir) / f"{kind}-{key}"
    if (folder / "manifest.json").is_file():
        try:
            cached = ShardedEmbeddings.open(folder)
        except UserInputError as error:
            logger.warning("re-encoding: the cached embeddings in %s are unreadable (%s)", folder, error)
        else:
            manifest = cached.manifest
            if manifest["model_fingerprint"] == model_fp and manifest["texts_fingerprint"] == corpus_fp:
                logger.info("reusing %d cached %s embeddings from %s", len(cached), kind, folder)
                return cached
    return encode_to_shards(
        model,
        texts,
        folder,
        kind=kind,
        shard_size=shard_size,
        batch_size=batch_size,
        normalize=normalize,
        pool=pool,
        overwrite=True,  # only ever replaces a cache entry that failed validation above
        fingerprint=model_fp,
    )

"""Pretraining corpora: reading text from where people keep it, tokenising it once, cutting it into
windows, and batching the windows by length.

The pipeline is three calls::

    texts, stats = load_texts("corpus.jsonl")                       # a Dataset with one column "text"
    windows, stats = tokenize_corpus(texts, tokenizer, 128, stats=stats, cache_dir="cache")
    # windows: columns "input_ids" (one window, special tokens included) and "length"

and, for the Sentence-Transformers trainer, ``data_collator=PaddingCollator(tokenizer)`` with
``args.batch_sampler=LengthGroupedBatchSampler``.

Reading goes through ``datasets.load_dataset`` (its ``text``, ``json``, ``csv`` and ``parquet`` builders),
tokenising through the fast tokenizer inside ``datasets.map``. What is hand-written is what those
libraries do not do: checks that name the bad file and byte offset, cutting long documents into windows
(never truncating them), packing, and an explicit on-disk cache of the tokenised corpus.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import PreTrainedTokenizerBase

from retromae_st.beir import iter_jsonl
from retromae_st.errors import UserInputError
from retromae_st.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

TextFormat = Literal["lines", "paragraphs"]

#: File suffix -> ``datasets`` builder that reads it.
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

#: Documents longer than this many characters are tokenised in pieces of at most this size, cut at
#: whitespace, so that one huge document never makes the tokenizer slow or memory-hungry.
DEFAULT_CHUNK_CHARS = 20_000

# Bumped whenever the windowing changes, so that old caches are not mistaken for new ones.
_CACHE_VERSION = "1"
_STATS_FILE = "corpus_stats.json"
_SCAN_BLOCK = 1 << 20  # bytes read at a time when checking a file's encoding


@dataclass
class CorpusStats:
    """What happened to a corpus: documents read, skipped (reason -> count), windows and tokens made.

    ``tokens`` counts document tokens (without special tokens or packing separators); ``cached`` is
    True when :func:`tokenize_corpus` loaded the windows from its cache instead of tokenising.
    """

    source: str = ""
    files: int = 0
    documents_read: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    tokens: int = 0
    cached: bool = False

    @property
    def documents_kept(self) -> int:
        return self.documents_read - sum(self.documents_skipped.values())

    def skip(self, reason: str, count: int) -> None:
        """Record ``count`` documents dropped for ``reason`` (zero counts are not recorded)."""
        if count:
            self.documents_skipped[reason] = self.documents_skipped.get(reason, 0) + count

    def summary(self) -> str:
        """One line for logs and reports."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.documents_skipped.items()))
        text = f"{self.source or 'corpus'}: {self.documents_read} documents read"
        if self.files > 1:
            text += f" from {self.files} files"
        text += f", {sum(self.documents_skipped.values())} skipped" + (f" ({reasons})" if reasons else "")
        if self.windows:
            text += f", {self.windows} windows, {self.tokens} tokens" + (
                " (from cache)" if self.cached else ""
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load_texts(
    source: str | os.PathLike,
    *,
    text_column: str = "text",
    title_column: str | None = "title",
    hf_config: str | None = None,
    hf_split: str = "train",
    text_format: TextFormat | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, CorpusStats]:
    """Read a pretraining corpus into a ``datasets.Dataset`` with one column, ``"text"``.

    ``source`` is, in this order of detection:

    * a BEIR folder (holds ``corpus.jsonl``): title and text of each document joined with a space;
    * another folder: every ``.txt``/``.jsonl``/``.json``/``.csv``/``.parquet`` file inside it,
      recursively, in sorted order (hidden files and other suffixes are ignored, with a log line);
    * a file, read by its suffix: ``.txt`` one document per line (``text_format="lines"``) or per
      blank-line separated paragraph (``"paragraphs"``); ``None`` guesses from the file (see
      :func:`detect_text_format`); the other suffixes read the column ``text_column``;
    * otherwise a Hugging Face dataset name, loaded with ``hf_config`` and ``hf_split``.

    When ``title_column`` is present in a table, non-empty titles are put in front of the text.
    Documents that are missing (null) or hold only whitespace are skipped and counted.

    Raises:
        UserInputError: a missing path, unknown suffix, empty or binary or non-UTF-8 file, invalid
            JSON, missing column, a folder without readable files, a dataset that cannot be
            downloaded, or nothing left after skipping. The message names the file (and line, byte
            offset or column) and what to do.
    """
    if text_format not in (None, "lines", "paragraphs"):
        raise UserInputError(f"text_format={text_format!r}: use 'lines', 'paragraphs' or None (guess).")
    path = Path(source).expanduser()
    stats = CorpusStats(source=str(source))
    cache = str(cache_dir) if cache_dir is not None else None
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            logger.info("%s is a BEIR folder: reading corpus.jsonl (title + text)", path)
            files = [path / "corpus.jsonl"]
        else:
            files = _list_folder(path)
        dataset = _load_files(files, stats, text_column, title_column, text_format, cache, label=str(path))
    elif path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserInputError(
                f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)} (rename the file, or pass the folder that holds it)."
            )
        dataset = _load_files([path], stats, text_column, title_column, text_format, cache, label=str(path))
    elif _looks_like_path(str(source)):
        raise UserInputError(f"{source} does not exist: check the path (a file or a folder of text files).")
    else:
        dataset = _load_hub(str(source), hf_config, hf_split, cache)
        stats.documents_read = len(dataset)
        dataset = _to_text_column(dataset, text_column, title_column, f"dataset {source!r}")
    dataset = _drop_empty(dataset, stats)
    logger.info("%s", stats.summary())
    return dataset, stats


def detect_text_format(path: str | os.PathLike, sample_bytes: int = _SCAN_BLOCK) -> TextFormat:
    """Guess how a text file separates documents, from its first ``sample_bytes``.

    ``"paragraphs"`` when at least 5% of the lines are empty and some paragraph spans two or more
    lines (a hard-wrapped text); ``"lines"`` otherwise. A file with one document per line and a few
    stray blank lines stays ``"lines"``. Pass ``text_format`` explicitly when the guess is wrong.
    """
    with open(path, "rb") as handle:
        sample = handle.read(sample_bytes).decode("utf-8", errors="replace")
    lines = sample.splitlines()
    # Empty lines at the start or end separate nothing (a trailing "\n\n" is common in line files).
    while lines and not lines[-1]:
        lines.pop()
    first = next((i for i, line in enumerate(lines) if line), len(lines))
    lines = lines[first:]
    # Only truly empty lines count: the datasets "text" builder splits paragraphs on "\n\n" exactly.
    blank = sum(1 for line in lines if not line)
    multi_line_block = any(a and b for a, b in zip(lines, lines[1:]))
    if lines and blank / len(lines) >= 0.05 and multi_line_block:
        return "paragraphs"
    return "lines"


def _looks_like_path(source: str) -> bool:
    """True when ``source`` cannot be a Hugging Face dataset name (``name`` or ``owner/name``)."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith("/")
        or Path(source).suffix.lower() in SUPPORTED_SUFFIXES
    )


def _list_folder(folder: Path) -> list[Path]:
    files, ignored = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        (files if path.suffix.lower() in SUPPORTED_SUFFIXES else ignored).append(path)
    if ignored:
        logger.info(
            "%s: ignoring %d files with other suffixes (e.g. %s)", folder, len(ignored), ignored[0].name
        )
    if not files:
        found = (
            f"; it holds {len(ignored)} other files (e.g. {ignored[0].name})" if ignored else "; it is empty"
        )
        raise UserInputError(
            f"{folder} has no files to read{found}: put {', '.join(SUPPORTED_SUFFIXES)} files in it."
        )
    return files


def _load_files(
    files: list[Path],
    stats: CorpusStats,
    text_column: str,
    title_column: str | None,
    text_format: TextFormat | None,
    cache_dir: str | None,
    label: str,
) -> datasets.Dataset:
    """Check every file, then read them with one ``load_dataset`` call per builder and text format."""
    groups: dict[tuple[str, str | None], list[Path]] = {}
    for path in files:
        if path.stat().st_size == 0:
            if len(files) == 1:
                raise UserInputError(f"{path} is empty: pass a file with at least one document.")
            logger.warning("%s is empty: skipped", path)
            continue
        builder = SUPPORTED_SUFFIXES[path.suffix.lower()]
        _check_file(path, builder)
        sample_by = None
        if builder == "text":
            chosen = text_format or detect_text_format(path)
            if text_format is None:
                logger.info("%s: reading one document per %s (pass text_format to choose)", path, chosen[:-1])
            sample_by = "paragraph" if chosen == "paragraphs" else "line"
        groups.setdefault((builder, sample_by), []).append(path)
    if not groups:
        raise UserInputError(f"{label}: every file is empty; there is nothing to read.")
    stats.files = sum(len(group) for group in groups.values())
    parts = []
    for (builder, sample_by), group in groups.items():
        where = str(group[0]) if len(group) == 1 else f"{label} ({len(group)} {builder} files)"
        dataset = _read_group(builder, sample_by, group, cache_dir)
        stats.documents_read += len(dataset)
        if builder == "text":
            parts.append(dataset.select_columns(["text"]))
        else:
            parts.append(_to_text_column(dataset, text_column, title_column, where))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_file(path: Path, builder: str) -> None:
    """Fail on binary or non-UTF-8 files with the byte offset, before ``datasets`` fails without it.

    Reads the file once in blocks, so a file of any size costs little memory. Parquet files only get
    their magic number checked (they are binary by design).
    """
    if builder == "parquet":
        with path.open("rb") as handle:
            if handle.read(4) != b"PAR1":
                raise UserInputError(
                    f"{path} is not a Parquet file (no PAR1 header): check the file or its suffix."
                )
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while block := handle.read(_SCAN_BLOCK):
            nul = block.find(b"\x00")
            if nul >= 0:
                nul_line = line + block.count(b"\n", 0, nul)
                raise UserInputError(
                    f"{path} looks binary: NUL byte at byte offset {offset + nul} (line {nul_line}); pass a "
                    "UTF-8 text file (UTF-16 files must be re-encoded as UTF-8)."
                )
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                # error.start counts from the bytes still pending from the previous block.
                bad = offset - pending + error.start
                line_at = line + block.count(b"\n", 0, max(bad - offset, 0))
                raise UserInputError(
                    f"{path}: not UTF-8 at byte offset {bad} (line {line_at}); re-encode the file as UTF-8 "
                    f"(e.g. iconv -f latin1 -t utf-8)."
                ) from None
            offset += len(block)
            line += block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserInputError(
            f"{path}: the file ends inside a UTF-8 character (byte offset {offset})."
        ) from None


def _read_group(
    builder: str, sample_by: str | None, files: list[Path], cache_dir: str | None
) -> datasets.Dataset:
    kwargs: dict[str, Any] = {"sample_by": sample_by} if sample_by else {}
    if builder == "text":
        kwargs["keep_linebreaks"] = False
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as error:  # datasets wraps parser errors in several types; explain them all the same way
        cause = error.__cause__ or error
        if builder == "json":
            for path in files:
                _raise_on_bad_json(path)
        where = str(files[0]) if len(files) == 1 else f"{len(files)} {builder} files ({files[0]}, ...)"
        raise UserInputError(f"cannot read {where} as {builder}: {type(cause).__name__}: {cause}") from error


def _raise_on_bad_json(path: Path) -> None:
    """Find the line that broke the JSON reader (only run after a failure, so the cost is no concern)."""
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if whole is not None:
        if not isinstance(whole, (list, dict)) or (
            isinstance(whole, list) and not all(isinstance(r, dict) for r in whole)
        ):
            raise UserInputError(f"{path}: expected a JSON list of objects (or one object per line).")
        return
    for _ in iter_jsonl(path):  # raises on the first line that is not a JSON object
        pass


def _to_text_column(
    dataset: datasets.Dataset, text_column: str, title_column: str | None, where: str
) -> datasets.Dataset:
    """Keep only ``text_column`` (renamed ``"text"``), with the title in front when there is one."""
    columns = dataset.column_names
    if text_column not in columns:
        raise UserInputError(
            f"{where} has no column {text_column!r}; available columns: {', '.join(columns) or 'none'}. "
            "Pass the right text column (text_column / --text-column)."
        )
    for column in (text_column, title_column):
        if column in columns and not _is_string(dataset.features[column]):
            if column == title_column and column != text_column:
                logger.warning("%s: column %r does not hold strings; titles are not used", where, column)
                title_column = None
                continue
            raise UserInputError(
                f"{where}: column {column!r} holds {dataset.features[column]}, not text; pick a text column."
            )
    if title_column and title_column in columns and title_column != text_column:
        dataset = dataset.map(
            _join_title,
            batched=True,
            fn_kwargs={"text_column": text_column, "title_column": title_column},
            desc="Joining titles",
        )
    dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in {"string", "large_string"}


def _join_title(batch: dict[str, list], text_column: str, title_column: str) -> dict[str, list]:
    # Same joining as retromae_st.beir.BeirData.document_text, so pretraining sees what evaluation sees.
    joined = []
    for title, text in zip(batch[title_column], batch[text_column]):
        if title and title.strip():
            joined.append(f"{title} {text or ''}".strip())
        else:
            joined.append(text)
    return {text_column: joined}


def _is_present(batch: dict[str, list]) -> list[bool]:
    return [text is not None for text in batch["text"]]


def _is_not_blank(batch: dict[str, list]) -> list[bool]:
    return [bool(text.strip()) for text in batch["text"]]


def _drop_empty(dataset: datasets.Dataset, stats: CorpusStats) -> datasets.Dataset:
    """Skip null and whitespace-only documents, counting each reason; fail when nothing is left."""
    before = len(dataset)
    dataset = dataset.filter(_is_present, batched=True, desc="Dropping missing documents")
    stats.skip("missing text", before - len(dataset))
    before = len(dataset)
    dataset = dataset.filter(_is_not_blank, batched=True, desc="Dropping empty documents")
    stats.skip("empty", before - len(dataset))
    if len(dataset) == 0:
        raise UserInputError(
            f"{stats.source}: no documents left ({stats.documents_read} read, all skipped: "
            f"{stats.documents_skipped or 'none found'}); pass a corpus with text in it."
        )
    return dataset


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "").lower() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags) or bool(datasets.config.HF_HUB_OFFLINE)


def _load_hub(name: str, config: str | None, split: str, cache_dir: str | None) -> datasets.Dataset:
    """Load a Hugging Face dataset, failing at once (not after minutes of retries) without the hub."""
    hint = f"no file or folder {name!r} exists here, so it was taken as a Hugging Face dataset name"
    if _hub_offline() and not datasets.config.HF_HUB_OFFLINE:
        # The variable was set after `datasets` was imported, so `datasets` would still try the network
        # and retry for half a minute; refuse now instead.
        raise UserInputError(f"{hint}, but HF_HUB_OFFLINE is set: pass a local path instead.")
    if not _hub_offline():
        _check_hub_reachable(name, hint)
    try:
        dataset = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as error:
        offline = " (offline mode: only datasets already in the local cache load)" if _hub_offline() else ""
        raise UserInputError(
            f"{hint}, and it cannot be loaded{offline}: {error}. Pass a local file or folder, or download "
            "the dataset where the hub is reachable."
        ) from None
    except ValueError as error:  # unknown split or config
        raise UserInputError(f"dataset {name!r} (config {config!r}, split {split!r}): {error}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise UserInputError(
            f"dataset {name!r} did not load as one split: pass a split (hf_split / --hf-split)."
        )
    return dataset


def _check_hub_reachable(name: str, hint: str) -> None:
    """Ask the hub about the dataset once, with a short timeout, before ``load_dataset`` retries for long."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        huggingface_hub.dataset_info(name, timeout=10)
    except GatedRepoError:
        return  # load_dataset reports access problems itself
    except RepositoryNotFoundError:
        raise UserInputError(
            f"{hint}, but the hub has no dataset {name!r}: check the name or the path."
        ) from None
    except HfHubHTTPError:
        return  # the hub answered; let load_dataset give its own error if there is one
    except Exception as error:  # network failures come as httpx, requests or OS errors depending on versions
        raise UserInputError(
            f"{hint}, but the hub cannot be reached ({type(error).__name__}: {error}). Pass a local path, or set "
            "HF_HUB_OFFLINE=1 to use a dataset already in the local cache."
        ) from None


# --------------------------------------------------------------------------------------------------
# Tokenising and windowing
# --------------------------------------------------------------------------------------------------


def tokenize_corpus(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    pack: bool = False,
    stats: CorpusStats | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> tuple[datasets.Dataset, CorpusStats]:
    """Tokenise a ``"text"`` dataset once and cut it into windows of at most ``max_seq_length`` tokens.

    Each document's tokens (without special tokens) are cut into pieces of ``max_seq_length - n``
    tokens, ``n`` being the number of special tokens the tokenizer adds, and each piece gets the
    special tokens back (``[CLS] ... [SEP]`` for BERT, ``<s> ... </s>`` for RoBERTa). No token is
    dropped: a long document becomes several windows. With ``pack=True`` consecutive documents are
    joined, separated by the tokenizer's separator token, and cut into full windows, so short documents
    share a window instead of filling most of it with padding.

    With ``cache_dir`` the windows are saved there (atomically) under a key made of the dataset's
    fingerprint, the tokenizer's full definition and these options; the next call with the same inputs
    loads them instead of tokenising (``stats.cached`` tells which happened).

    Returns:
        The windows, with columns ``"input_ids"`` (list of int32) and ``"length"``, and the stats
        (a copy of ``stats`` with ``windows``, ``tokens`` and any ``"no tokens"`` skips added).
    """
    if "text" not in dataset.column_names:
        raise UserInputError(
            f"the dataset has no 'text' column (columns: {dataset.column_names}); use load_texts()."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: load one with use_fast=True."
        )
    prefix, suffix = special_token_frame(tokenizer)
    body = max_seq_length - len(prefix) - len(suffix)
    if body < 1:
        raise UserInputError(
            f"max_seq_length={max_seq_length} leaves no room for text next to {len(prefix) + len(suffix)} "
            f"special tokens: use max_seq_length >= {len(prefix) + len(suffix) + 1}."
        )
    if chunk_chars < 100:
        raise UserInputError(f"chunk_chars={chunk_chars} is too small: use at least 100.")
    separator = _separator_id(tokenizer) if pack else None
    # A fresh copy: the caller's stats stay as they were, and a repeated call does not count twice.
    stats = CorpusStats(**{**(stats or CorpusStats()).to_dict(), "windows": 0, "tokens": 0, "cached": False})
    stats.documents_skipped.pop("no tokens", None)
    if not stats.documents_read:
        stats.documents_read = len(dataset)

    target = None
    if cache_dir is not None:
        # Packed windows restart at every map batch and process shard, so those settings shape them too.
        packing = (batch_size, num_proc or 1) if pack else None
        key = _cache_key(dataset, tokenizer, max_seq_length, packing, chunk_chars)
        target = Path(cache_dir) / f"windows-{key}"
        if (target / _STATS_FILE).is_file():
            return _load_cached(target, stats)

    with _scratch_dir(cache_dir) as scratch:

        def cache_file(name: str) -> dict[str, Any]:
            # Intermediate Arrow files on disk (not in memory) when there is a cache folder.
            return {"cache_file_name": str(scratch / f"{name}.arrow")} if scratch else {}

        documents = dataset.map(
            _tokenize_batch,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            remove_columns=dataset.column_names,
            features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
            fn_kwargs={"tokenizer": tokenizer, "chunk_chars": chunk_chars},
            desc="Tokenising",
            **cache_file("documents"),
        )
        lengths = pc.list_value_length(documents.with_format("arrow")["ids"])
        stats.tokens = int(pc.sum(lengths).as_py() or 0)
        stats.skip("no tokens", int(pc.sum(pc.equal(lengths, 0)).as_py() or 0))
        windows = documents.map(
            _window_batch,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            remove_columns=["ids"],
            features=datasets.Features(
                {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")}
            ),
            fn_kwargs={
                "body": body,
                "prefix": prefix,
                "suffix": suffix,
                "pack": pack,
                "separator": separator,
            },
            desc="Cutting windows",
            **cache_file("windows"),
        )
        stats.windows = len(windows)
        if stats.windows == 0:
            raise UserInputError(
                f"{stats.source or 'the corpus'}: no document produced a token; check the tokenizer."
            )
        if target is not None:
            with atomic_dir(target, overwrite=True) as tmp:
                windows.save_to_disk(str(tmp))
                atomic_write_json(tmp / _STATS_FILE, stats.to_dict())
            windows = datasets.load_from_disk(str(target))
    logger.info("%s", stats.summary())
    return windows, stats


def special_token_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text, e.g. ([CLS], [SEP]).

    Found by encoding a probe with and without special tokens, which works for any tokenizer whose
    post-processor wraps a single sequence (transformers 5 tokenizers have no
    ``build_inputs_with_special_tokens``).
    """
    for probe in ("a", "the", "0", "x y"):
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        framed = tokenizer(probe)["input_ids"]
        if not plain:
            continue
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[:start], framed[start + len(plain) :]
    raise UserInputError(f"cannot find where {type(tokenizer).__name__} puts its special tokens.")


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    for token_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    logger.warning("the tokenizer has no sep or eos token: packed documents are joined without a separator")
    return None


def _split_text(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut a long text into pieces of at most ``chunk_chars`` characters, each cut just before whitespace.

    Cutting before (not after) the whitespace keeps byte-level BPE tokens such as ``Ġword`` intact, so the
    pieces tokenise as the whole text would. Only a run of over ``chunk_chars / 2`` characters without
    whitespace is cut inside a word.
    """
    start = 0
    while len(text) - start > chunk_chars:
        end = start + chunk_chars
        cut = max(text.rfind(space, start + chunk_chars // 2, end) for space in (" ", "\n", "\t"))
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _tokenize_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, chunk_chars: int
) -> dict[str, list]:
    pieces, owners = [], []
    for index, text in enumerate(batch["text"]):
        for piece in _split_text(text, chunk_chars):
            pieces.append(piece)
            owners.append(index)
    # One call for the whole batch: the Rust tokenizer runs the pieces in parallel.
    encoded = tokenizer(
        pieces,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    ids: list[list[int]] = [[] for _ in batch["text"]]
    for owner, piece_ids in zip(owners, encoded):
        ids[owner].extend(piece_ids)
    return {"ids": ids}


def _window_batch(
    batch: dict[str, list], body: int, prefix: list[int], suffix: list[int], pack: bool, separator: int | None
) -> dict[str, list]:
    if pack:
        stream: list[int] = []
        for ids in batch["ids"]:
            if not ids:
                continue
            if stream and separator is not None:
                stream.append(separator)
            stream.extend(ids)
        pieces = [stream[i : i + body] for i in range(0, len(stream), body)]
    else:
        pieces = [ids[i : i + body] for ids in batch["ids"] for i in range(0, len(ids), body)]
    input_ids = [prefix + piece + suffix for piece in pieces]
    return {"input_ids": input_ids, "length": [len(window) for window in input_ids]}


def _cache_key(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    packing: tuple[int, int] | None,
    chunk_chars: int,
) -> str:
    # datasets has no public accessor for the fingerprint; it is stable for the same files and operations.
    fingerprint = getattr(dataset, "_fingerprint", None) or datasets.fingerprint.generate_fingerprint(dataset)
    parts = {
        "version": _CACHE_VERSION,
        "dataset": fingerprint,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest(),
        "tokenizer_class": type(tokenizer).__name__,
        "special_tokens": sorted(tokenizer.special_tokens_map.items(), key=str),
        "max_seq_length": max_seq_length,
        "packing": packing,
        "chunk_chars": chunk_chars,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _load_cached(target: Path, stats: CorpusStats) -> tuple[datasets.Dataset, CorpusStats]:
    saved = json.loads((target / _STATS_FILE).read_text(encoding="utf-8"))
    stats.windows, stats.tokens, stats.cached = saved["windows"], saved["tokens"], True
    stats.skip("no tokens", saved.get("documents_skipped", {}).get("no tokens", 0))
    windows = datasets.load_from_disk(str(target))
    logger.info("loaded tokenised windows from %s; %s", target, stats.summary())
    return windows, stats


@contextlib.contextmanager
def _scratch_dir(cache_dir: str | os.PathLike | None) -> Iterator[Path | None]:
    """A temporary folder inside ``cache_dir`` (None without one), removed on exit."""
    if cache_dir is None:
        yield None
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".tokenising-", dir=cache_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


@dataclass
class PaddingCollator:
    """Pads tokenised windows into a batch for the Sentence-Transformers trainer (``data_collator=``).

    Takes rows with ``"input_ids"`` (other keys are ignored) and returns
    ``{f"{column}_input_ids", f"{column}_attention_mask"}`` (and ``f"{column}_token_type_ids"``, all
    zero, when the tokenizer uses them) as LongTensors padded to the longest row, on the tokenizer's
    padding side. The trainer turns these keys into one features dict for the loss.
    """

    tokenizer: PreTrainedTokenizerBase
    column: str = "text"
    pad_to_multiple_of: int | None = None
    # Read by the trainer to build its batch sampler; windows have no labels.
    valid_label_columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise UserInputError(
                f"{type(self.tokenizer).__name__} has no padding token: set tokenizer.pad_token."
            )
        self.token_type_ids = "token_type_ids" in self.tokenizer.model_input_names

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [row["input_ids"] for row in rows]
        lengths = torch.tensor([len(ids) for ids in sequences])
        width = int(lengths.max()) if len(sequences) else 0
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        positions = torch.arange(width).unsqueeze(0)
        if self.tokenizer.padding_side == "left":
            mask = positions >= (width - lengths).unsqueeze(1)
        else:
            mask = positions < lengths.unsqueeze(1)
        if sequences and isinstance(sequences[0], torch.Tensor):
            flat = torch.cat(sequences).long()
        else:
            # np.fromiter over a chain runs in C: ~10x faster than building a Python list of the tokens.
            total = int(lengths.sum())
            flat = torch.from_numpy(
                np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=total)
            )
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        # Boolean-mask assignment fills the rows in order: one vectorised op for the whole batch.
        input_ids[mask] = flat
        batch = {f"{self.column}_input_ids": input_ids, f"{self.column}_attention_mask": mask.long()}
        if self.token_type_ids:
            batch[f"{self.column}_token_type_ids"] = torch.zeros_like(input_ids)
        return batch


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of windows of similar length, so that little of each batch is padding.

    Each epoch: shuffle all indices, cut them into mega-batches of ``mega_batch_factor * batch_size``,
    sort each mega-batch by length, cut it into batches, and shuffle the order of the batches; the batch
    holding the longest window goes first, so that a batch too large for memory fails at the first step.
    The order depends only on ``seed`` and the epoch (the trainer calls ``set_epoch``).

    Pass the class as ``SentenceTransformerTrainingArguments(batch_sampler=LengthGroupedBatchSampler)``.
    Lengths come from the ``"length"`` column (made by :func:`tokenize_corpus`), else from ``"input_ids"``.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        if mega_batch_factor < 1:
            raise UserInputError(f"mega_batch_factor={mega_batch_factor}: use 1 or more.")
        self.mega_batch_factor = mega_batch_factor
        self.lengths = _lengths(dataset)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator if self.generator is not None else torch.Generator()
        generator.manual_seed((self.seed or 0) + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        mega = self.batch_size * self.mega_batch_factor
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            group = order[start : start + mega]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # mega-batches are whole multiples of batch_size, so only the last can be short
        if not batches:
            return
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(shuffled)), key=lambda i: self.lengths[shuffled[i]].max())
        shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        for batch in shuffled:
            yield batch.tolist()


def _lengths(dataset: datasets.Dataset) -> np.ndarray:
    if "length" in dataset.column_names:
        return np.asarray(dataset.with_format("arrow")["length"].to_numpy(), dtype=np.int64)
    if "input_ids" in dataset.column_names:
        return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy().astype(np.int64)
    raise UserInputError(
        f"LengthGroupedBatchSampler needs a 'length' or 'input_ids' column; the dataset has {dataset.column_names}."
    )

"""Reading text from where people keep it: files, folders, Hugging Face datasets and BEIR folders, into a
Dataset with one ``text`` column, with checks that name the bad file and byte offset.

``load_texts`` goes through ``datasets.load_dataset`` (its ``text``, ``json``, ``csv`` and ``parquet``
builders); :class:`CorpusStats` counts what was read and skipped on the way to the windows.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from retromae_st.data.beir import iter_jsonl
from retromae_st.errors import UserInputError

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


def check_text_source(source: str | os.PathLike) -> None:
    """The cheap part of :func:`load_texts`, for checking a run before it starts: a path that exists, a
    supported suffix, a folder that holds files to read (or a BEIR ``corpus.jsonl``), a file that is not
    empty. Nothing is read; a name that is no path is taken as a hub dataset and left to the loader.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "corpus.jsonl").is_file():
            _list_folder(path)
    elif path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserInputError(
                f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; supported: "
                f"{', '.join(SUPPORTED_SUFFIXES)} (rename the file, or pass the folder that holds it)."
            )
        if path.stat().st_size == 0:
            raise UserInputError(f"{path} is empty: pass a file with at least one document.")
    elif _looks_like_path(str(source)):
        raise UserInputError(f"{source} does not exist: check the path (a file or a folder of text files).")


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
    # Same joining as retromae_st.data.beir.BeirData.document_text, so pretraining sees what evaluation sees.
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

"""Offline quickstart data: the documentation that ships with Python itself.

Stage 1 pretrains on :func:`python_docs_corpus` (the pydoc topics of the language reference plus the
docstrings of a fixed list of standard-library modules); stage 2 fine-tunes on :func:`python_docs_pairs`,
retrieval pairs made from docstrings: the query is a docstring's summary line ("Return the number of
items in the queue."), the relevant document is the rest of that docstring, titled with the object's
qualified name. The summary is removed from the document, so a query cannot be matched by copying; the
body and the name usually restate it in other words, so the task is learnable. A held-out part of the
pairs (chosen by a hash of the object's name, so stable across runs) is written as a BEIR folder by
:func:`write_beir` and scored by the BEIR-based evaluation.

Nothing is downloaded. The exact counts depend on the Python version (its docstrings and topics).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import logging
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from retromae_st.errors import UserInputError
from retromae_st.io import atomic_dir

logger = logging.getLogger(__name__)

# Pure-Python standard-library modules whose import has no side effect (no window, browser, print or
# thread), present in Python 3.10 to 3.13. Modules removed by PEP 594 (cgi, nntplib, ...) and those with
# side effects (antigravity, this, idlelib, tkinter, turtle, turtledemo) are left out on purpose.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "base64", "bdb", "bisect",
    "bz2", "calendar", "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys",
    "compileall", "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread",
    "configparser", "contextlib", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm",
    "decimal", "difflib", "dis", "doctest", "email.charset", "email.generator", "email.header",
    "email.headerregistry", "email.message", "email.parser", "email.policy", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "getpass", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc",
    "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.util", "inspect", "io",
    "ipaddress", "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "mimetypes", "modulefinder",
    "multiprocessing.connection", "multiprocessing.context", "multiprocessing.managers",
    "multiprocessing.pool", "multiprocessing.process", "multiprocessing.queues",
    "multiprocessing.shared_memory", "multiprocessing.synchronize", "netrc", "ntpath", "numbers", "opcode",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "types", "typing", "unittest.case", "unittest.loader", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.robotparser", "uuid", "venv", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zoneinfo",
)  # fmt: skip

# Importing these opens a browser or a window, prints, or starts an editor: never imported, even on request.
UNSAFE_MODULES = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}
)

MIN_DOC_WORDS = 20  # shorter docstrings ("Return self.") carry too little text to pretrain on
CHUNK_WORDS = (
    200  # long topics and module docstrings are cut at paragraph ends into pieces of about this size
)
MIN_QUERY_WORDS = 4  # a summary like "Close the file." is too generic to identify one document
MIN_PASSAGE_WORDS = 15
MAX_PASSAGE_WORDS = 300
TEST_FRACTION = 0.15


# ------------------------------------------------------------------------------------------------ walking


def _import_quietly(name: str) -> ModuleType | None:
    """Import a module with warnings and output silenced; None when it does not exist on this platform
    or is one of :data:`UNSAFE_MODULES`."""
    if name.split(".")[0] in UNSAFE_MODULES:
        logger.warning("not importing %s: importing it has side effects", name)
        return None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # ImportError, or a platform-specific failure (e.g. a missing C extension)
        logger.debug("skipping standard-library module %s: it does not import here", name)
        return None


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring, cleaned; inherited ones (``inspect.getdoc``) would repeat texts."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def iter_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of each module, its public classes and functions, and the classes' public
    methods, in a fixed order. Objects re-exported from another module are visited only where defined."""
    for module_name in modules:
        module = _import_quietly(module_name)
        if module is None:
            continue
        if doc := _own_doc(module):
            yield module_name, doc
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj):
                yield from _class_docstrings(f"{module_name}.{name}", obj)
            elif inspect.isfunction(obj) and (doc := _own_doc(obj)):
                yield f"{module_name}.{name}", doc


def _class_docstrings(qualified: str, cls: type) -> Iterator[tuple[str, str]]:
    if doc := _own_doc(cls):
        yield qualified, doc
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if isinstance(function, property):
            function = function.fget
        if inspect.isfunction(function) and (doc := _own_doc(function)):
            yield f"{qualified}.{name}", doc


# ------------------------------------------------------------------------------------------------ corpus


def _clean(text: str) -> str:
    """Collapse whitespace inside paragraphs; keep paragraph breaks (blank lines)."""
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def _chunks(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Cut a cleaned text at paragraph ends into pieces of at most about ``max_words`` words; a longer
    paragraph is a piece of its own (the model truncates it)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        words = len(paragraph.split())
        if current and size + words > max_words:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += words
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _without_sentences(text: str, sentences: set[str]) -> str:
    """A cleaned text without the paragraphs that contain one of ``sentences`` (lower case)."""
    kept = []
    for paragraph in text.split("\n\n"):
        lowered = paragraph.lower()  # once per paragraph, not once per sentence tested
        if not any(sentence in lowered for sentence in sentences):
            kept.append(paragraph)
    return "\n\n".join(kept)


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        logger.warning("pydoc_data is not installed: the corpus has docstrings only.")
        return {}
    return topics


def python_docs_corpus(
    max_docs: int | None = None, seed: int = 0, test_fraction: float = TEST_FRACTION
) -> list[str]:
    """Documents for stage 1: the pydoc topics and the standard-library docstrings of at least
    :data:`MIN_DOC_WORDS` words, whitespace cleaned, cut into pieces of about :data:`CHUNK_WORDS` words,
    without duplicates, in a fixed order. ``max_docs`` keeps a random (``seed``) subset, in that order.

    The held-out queries of :func:`python_docs_pairs` with the same ``seed`` and ``test_fraction`` are
    left out: a paragraph that holds one of them (a test docstring's summary line, or the same sentence in
    another docstring) is dropped, so stage 1 reads the documents the evaluation searches but never its
    queries, as in unsupervised domain adaptation on a real corpus. Without this, stage 1 would learn each
    test query next to its answer.
    """
    _, test = python_docs_pairs(seed=seed, test_fraction=test_fraction)
    held_out = {pair["query"].lower() for pair in test}
    texts = [_clean(text) for _, text in sorted(_topics().items())]
    texts += [_clean(doc) for _, doc in iter_docstrings()]
    texts = [_without_sentences(text, held_out) for text in texts]
    documents: dict[str, None] = {}  # an ordered set
    for text in texts:
        for piece in _chunks(text):
            if len(piece.split()) >= MIN_DOC_WORDS:
                documents.setdefault(piece)
    corpus = list(documents)
    if max_docs is not None:
        if max_docs < 1:
            raise UserInputError(f"max_docs={max_docs}: use a positive number, or None for all documents.")
        if max_docs < len(corpus):
            keep = set(random.Random(seed).sample(range(len(corpus)), max_docs))
            corpus = [doc for i, doc in enumerate(corpus) if i in keep]
    return corpus


# ------------------------------------------------------------------------------------------------ pairs


def _split_summary(doc: str) -> tuple[str, str] | None:
    """(summary, body) of a docstring following PEP 257: the first paragraph is the summary when it is one
    sentence-like line; None when the docstring has no such summary or no body."""
    parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    if len(parts) < 2:
        return None
    summary, body = (re.sub(r"\s+", " ", p).strip() for p in parts)
    # A summary that is a call signature ("copy(x) -> y"), a heading or several sentences is no query.
    if "->" in summary or summary.endswith(":") or summary.count(". ") > 1 or len(summary.split()) > 40:
        return None
    return summary, body


def _is_test(name: str, seed: int, fraction: float) -> bool:
    # md5 (not hash()) so that the split does not change with PYTHONHASHSEED.
    digest = hashlib.md5(f"{seed}:{name}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def python_docs_pairs(
    seed: int = 0, test_fraction: float = TEST_FRACTION
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) retrieval pairs from standard-library docstrings.

    Each pair is ``{"id", "name", "query", "title", "text", "passage"}``: ``query`` is the docstring's
    summary (at least :data:`MIN_QUERY_WORDS` words), ``title`` the object's qualified name, ``text`` the
    rest of the docstring (:data:`MIN_PASSAGE_WORDS` to :data:`MAX_PASSAGE_WORDS` words, longer ones are
    cut), and ``passage`` = title + text, which is how a BEIR evaluator reads the document. Summaries and
    bodies that occur twice (overridden methods documented alike) are kept once, so no query has two
    answers and no test query appears in training. The split puts about ``test_fraction`` of the objects in
    test, by a hash of the name salted with ``seed``.
    """
    if not 0 < test_fraction < 1:
        raise UserInputError(f"test_fraction={test_fraction}: use a fraction between 0 and 1.")
    seen_queries: set[str] = set()
    seen_texts: set[str] = set()
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for name, doc in iter_docstrings():
        split = _split_summary(doc)
        if split is None:
            continue
        query, text = split
        words = text.split()
        if len(query.split()) < MIN_QUERY_WORDS or len(words) < MIN_PASSAGE_WORDS:
            continue
        text = " ".join(words[:MAX_PASSAGE_WORDS])
        key = query.lower()
        # A body that repeats its summary word for word would make the pair a copy task.
        if key in seen_queries or text in seen_texts or key in text.lower():
            continue
        seen_queries.add(key)
        seen_texts.add(text)
        pair = {
            "id": name,
            "name": name,
            "query": query,
            "title": name,
            "text": text,
            "passage": f"{name} {text}",
        }
        (test if _is_test(name, seed, test_fraction) else train).append(pair)
    return train, test


def write_beir(
    folder: str | os.PathLike,
    pairs: Sequence[dict[str, str]],
    *,
    distractors: Sequence[dict[str, str]] = (),
    split: str = "test",
    overwrite: bool = False,
) -> Path:
    """Write ``pairs`` as a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Each pair gives a query (id ``q:<id>``) and its one relevant document (id ``d:<id>``); the documents of
    ``distractors`` (e.g. the training pairs) join the corpus unjudged, which makes the ranking harder and
    closer to a real search. The folder is written atomically and never silently replaced.
    """
    import json

    if not pairs:
        raise UserInputError("no pairs to write: the BEIR folder needs at least one query.")
    documents: dict[str, dict[str, str]] = {}
    for pair in [*pairs, *distractors]:
        documents.setdefault(f"d:{pair['id']}", {"title": pair["title"], "text": pair["text"]})
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with (tmp / "corpus.jsonl").open("w", encoding="utf-8") as handle:
            for doc_id, doc in documents.items():
                handle.write(json.dumps({"_id": doc_id, **doc}, ensure_ascii=False) + "\n")
        with (tmp / "queries.jsonl").open("w", encoding="utf-8") as handle:
            for pair in pairs:
                handle.write(
                    json.dumps({"_id": f"q:{pair['id']}", "text": pair["query"]}, ensure_ascii=False) + "\n"
                )
        (tmp / "qrels").mkdir()
        rows = ["query-id\tcorpus-id\tscore", *(f"q:{p['id']}\td:{p['id']}\t1" for p in pairs)]
        (tmp / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    logger.info("Wrote %s: %d queries, %d documents.", folder, len(pairs), len(documents))
    return folder

"""Shared fixtures: a tokenizer trained in the test session and tiny random encoders. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import socket

# Fail at once instead of retrying for a minute if anything reaches for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Tiny models gain nothing from a second thread, and OpenMP threads that spin against other busy
# processes can slow a step twentyfold: one thread keeps test times stable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs on the CPU, as CI does. On a machine with a GPU, Sentence-Transformers would place the
# tests' models there while their inputs stay on the CPU (seen on an H200: "Expected all tensors to be on
# the same device"). Set CUDA_VISIBLE_DEVICES yourself to run them elsewhere.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from pathlib import Path

import pytest
import torch

from retromae_st.models import Preset, build_model, train_wordpiece_tokenizer

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = Preset(layers=2, hidden=32, heads=2, intermediate=64, max_positions=128)

_WORDS = [
    "retrieval",
    "embedding",
    "encoder",
    "decoder",
    "masked",
    "autoencoder",
    "sentence",
    "vector",
    "index",
    "search",
    "query",
    "passage",
    "document",
    "corpus",
    "token",
    "vocabulary",
    "attention",
    "layer",
    "training",
    "learning",
    "model",
    "package",
    "debian",
    "python",
    "library",
    "function",
    "class",
    "module",
    "network",
    "server",
    "client",
    "database",
    "storage",
    "memory",
    "kernel",
    "driver",
]


def make_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over a small vocabulary, lengths 4-24 words."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(4, 25, (1,), generator=generator))
        ids = torch.randint(0, len(_WORDS), (length,), generator=generator).tolist()
        texts.append(" ".join(_WORDS[i] for i in ids))
    return texts


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="session")
def tokenizer(texts):
    # A small vocabulary so that some words split into ## pieces (whole-word masking has work to do).
    return train_wordpiece_tokenizer(texts, vocab_size=120, min_frequency=1)


@pytest.fixture
def tiny_model(tokenizer, tmp_path):
    """A fresh tiny BERT Sentence-Transformer (Transformer + Pooling('cls'))."""
    return build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a torchrun / accelerate subprocess: this checkout importable, and TMPDIR inside
    the test's folder, because torch's elastic agent leaves a ``torchelastic_*`` folder in the temp dir
    for every launch and pytest removes tmp_path trees but not /tmp."""
    tmp = tmp_path / "launcher-tmp"
    tmp.mkdir(exist_ok=True)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        **extra,
    }


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun / accelerate rendezvous in subprocess tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_toy_data(
    root: Path, documents: list[str], splits: dict[str, range], tokenizer, preset: Preset
) -> Path:
    """A text corpus, a BEIR folder (each query is three words of its document, one relevant document
    each, qrels per split) and a tiny saved model, under ``root``: what the end-to-end tests run on."""
    (root / "corpus.txt").write_text("\n".join(documents) + "\n")
    beir = root / "toy"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(documents))
    )
    (beir / "queries.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": " ".join(t.split()[1:4])}) + "\n"
            for i, t in enumerate(documents)
        )
    )
    for split, ids in splits.items():
        rows = ["query-id\tcorpus-id\tscore", *(f"q{i}\td{i}\t1" for i in ids)]
        (beir / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    build_model(preset, tokenizer, max_seq_length=32, save_dir=root / "init", seed=0).save(
        str(root / "model")
    )
    return root

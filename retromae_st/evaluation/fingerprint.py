"""Content fingerprints: what a cached embedding or a stored score was computed from.

A cache entry is keyed by the hash of everything that changes the vectors: every weight tensor, the
module configuration (pooling, normalisation layers, maximum length, prompts) and the tokenizer, and
the exact texts in order. A changed model or corpus therefore never reuses stale vectors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

DIGEST_SIZE = 16  # 128-bit blake2b: collisions are not a practical concern, names stay short.


def _new_hash() -> Any:
    # blake2b rather than sha256: several times faster on CPU, which matters when hashing a base model.
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def _config_of(model: SentenceTransformer) -> dict[str, Any]:
    """Everything besides the weights that changes what ``encode`` returns."""
    modules = []
    for module in model:
        get_config = getattr(module, "get_config_dict", None)
        config = get_config() if callable(get_config) else {}
        modules.append({"class": f"{type(module).__module__}.{type(module).__name__}", "config": config})
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Padding/truncation settings are set per encode call (max_seq_length is hashed on its own).
        state.pop("padding", None)
        state.pop("truncation", None)
        tokenizer_state = json.dumps(state, sort_keys=True)
    elif tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        tokenizer_state = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        tokenizer_state = repr(tokenizer)
    return {
        "modules": modules,
        "max_seq_length": model.max_seq_length,
        "prompts": getattr(model, "prompts", None),
        "default_prompt_name": getattr(model, "default_prompt_name", None),
        "similarity": getattr(model, "similarity_fn_name", None),
        "truncate_dim": getattr(model, "truncate_dim", None),
        "tokenizer": tokenizer_state,
    }


def model_fingerprint(model: SentenceTransformer) -> str:
    """A hex digest of a model's weights, module configuration and tokenizer.

    Two models give the same fingerprint only if they produce the same embeddings for every input.
    """
    digest = _new_hash()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        # Viewing as bytes works for every dtype (bfloat16 has no numpy equivalent).
        digest.update(flat.view(dtype=torch.uint8).numpy())
    digest.update(json.dumps(_config_of(model), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def texts_fingerprint(texts: Iterable[str]) -> str:
    """A hex digest of a sequence of texts; order and boundaries between texts count."""
    digest = _new_hash()
    count = 0
    for text in texts:
        data = text.encode("utf-8")
        # Length prefix so that ["ab", "c"] and ["a", "bc"] differ.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        count += 1
    digest.update(count.to_bytes(8, "little"))
    return digest.hexdigest()


def combine(*parts: object) -> str:
    """One digest of several fingerprints and settings."""
    return hashlib.blake2b(
        json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=DIGEST_SIZE
    ).hexdigest()

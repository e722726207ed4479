"""The WordPiece tokenizer trained for presets: the same texts give the same tokenizer.json, in one process
and across processes (two quickstarts with one seed must report the same numbers)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from retromae_st.models import SPECIAL_TOKENS, train_wordpiece_tokenizer

# Run in a child process: trains on _tie_rich_texts() and writes tokenizer.json to argv[1].
_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from test_tokenizer import _tie_rich_texts
from retromae_st.models import train_wordpiece_tokenizer
train_wordpiece_tokenizer(_tie_rich_texts(), vocab_size=300).backend_tokenizer.save(sys.argv[1])
"""


def _tie_rich_texts() -> list[str]:
    """Words built from a few syllables: many pairs share a count, which is where the library's trainer
    broke ties differently on every call."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "po", "di", "vu", "x1", "z9"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(300)]


def _json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


def test_three_calls_in_one_process_give_one_tokenizer():
    texts = _tie_rich_texts()
    first, *others = (_json(train_wordpiece_tokenizer(texts, vocab_size=300)) for _ in range(3))
    assert all(other == first for other in others)


def test_two_processes_write_the_same_tokenizer_json_bytes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = [tmp_path / f"run{i}.json" for i in range(2)]
    for output in outputs:
        here = str(Path(__file__).parent)
        subprocess.run([sys.executable, "-c", _CHILD, str(output), here], check=True, env=env, timeout=300)
    in_process = tmp_path / "here.json"
    train_wordpiece_tokenizer(_tie_rich_texts(), vocab_size=300).backend_tokenizer.save(str(in_process))
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == in_process.read_bytes()


def test_vocabulary_is_the_library_trainers_up_to_ties():
    """Same merges as tokenizers' WordPieceTrainer: only entries decided by a tie may differ."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = _tie_rich_texts()
    ours = json.loads(_json(train_wordpiece_tokenizer(texts, vocab_size=300)))["model"]["vocab"]
    library = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    library.normalizer = normalizers.BertNormalizer(lowercase=True)
    library.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    library.train_from_iterator(texts, trainer)
    theirs = library.get_vocab()
    assert len(ours) == len(theirs) == 300
    assert [ours[token] for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(set(ours) & set(theirs)) >= 0.95 * len(theirs)


def test_min_frequency_stops_the_merges_and_text_round_trips():
    tokenizer = train_wordpiece_tokenizer(["kalo kalo mire"], vocab_size=1000, min_frequency=2)
    vocab = tokenizer.get_vocab()
    assert "kalo" in vocab and "mire" not in vocab  # "mire" occurs once: below min_frequency
    ids = tokenizer("kalo mire")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "kalo mire"
    assert "[UNK]" not in tokenizer.convert_ids_to_tokens(ids)

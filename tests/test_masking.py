"""Masking statistics over many draws: ratios, whole words, specials, visibility rules, determinism."""

from __future__ import annotations

import pytest
import torch

from retromae_st.pretraining.masking import (
    BYTE_LEVEL_BPE,
    IGNORE_INDEX,
    SENTENCEPIECE,
    WORDPIECE,
    build_vocab_tables,
    decoder_labels,
    decoder_visibility,
    detect_convention,
    encoder_mask,
    sample_whole_words,
    word_ids,
)


@pytest.fixture(scope="module")
def batch(tokenizer, texts):
    encoded = tokenizer(texts[:64], padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.fixture(scope="module")
def tables(tokenizer):
    return build_vocab_tables(tokenizer)


def test_convention_detection():
    assert detect_convention({"[CLS]": 0, "the": 1, "##s": 2, "##ing": 3}) == WORDPIECE
    assert detect_convention({"<s>": 0, "\u2581the": 1, "\u2581cat": 2, "s": 3}) == SENTENCEPIECE
    assert detect_convention({"<s>": 0, "\u0120the": 1, "\u0120cat": 2, "s": 3}) == BYTE_LEVEL_BPE


def test_word_ids_follow_wordpiece_pieces(tokenizer, tables):
    encoded = tokenizer(["retrieval embeddings"], return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    words = word_ids(ids, mask, tables)[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert words[0] == -1 and words[-1] == -1  # [CLS], [SEP]
    for position in range(1, len(tokens) - 1):
        if tokens[position].startswith("##"):
            assert words[position] == words[position - 1]
        else:
            assert words[position] == words[position - 1] + 1 or position == 1
    assert max(words) + 1 == 2  # two words


def test_word_after_special_starts_a_word_for_byte_level():
    # RoBERTa: the first word has no "Ġ" but must not join <s>.
    class Tok:
        mask_token_id = 3
        pad_token_id = 1
        all_special_ids = [0, 1, 2, 3]

        def get_vocab(self):
            return {"<s>": 0, "<pad>": 1, "</s>": 2, "<mask>": 3, "hello": 4, "\u0120world": 5, "s": 6}

        def __len__(self):
            return 7

    tables = build_vocab_tables(Tok())
    ids = torch.tensor([[0, 4, 6, 5, 6, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    assert word_ids(ids, mask, tables).tolist() == [[-1, 0, 0, 1, 1, -1, -1]]


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_encoder_mask_ratio_whole_words_and_specials(batch, tables, ratio):
    ids, mask = batch
    words = word_ids(ids, mask, tables)
    real = words >= 0
    chosen_total, real_total = 0, 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        masked, labels = encoder_mask(ids, words, tables, ratio, generator)
        chosen = labels != IGNORE_INDEX
        # specials and padding are never chosen, and labels are the original ids
        assert not (chosen & ~real).any()
        assert torch.equal(labels[chosen], ids[chosen])
        # whole words: every piece of a chosen word is chosen
        for row in range(ids.shape[0]):
            chosen_words = set(words[row][chosen[row]].tolist())
            in_chosen_word = torch.tensor([w in chosen_words for w in words[row].tolist()])
            assert torch.equal(in_chosen_word & real[row], chosen[row])
        # unchosen tokens are untouched
        assert torch.equal(masked[~chosen], ids[~chosen])
        chosen_total += int(chosen.sum())
        real_total += int(real.sum())
    assert abs(chosen_total / real_total - ratio) < 0.03


def test_encoder_replacement_is_80_10_10(batch, tables):
    ids, mask = batch
    words = word_ids(ids, mask, tables)
    counts = torch.zeros(3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        masked, labels = encoder_mask(ids, words, tables, 0.3, generator)
        chosen = labels != IGNORE_INDEX
        is_mask = masked == tables.mask_token_id
        kept = masked == ids
        counts += torch.tensor(
            [(chosen & is_mask).sum(), (chosen & ~is_mask & ~kept).sum(), (chosen & kept).sum()],
            dtype=torch.float,
        )
        assert not tables.special[masked[chosen & ~is_mask]].any()  # random tokens are never specials
    shares = counts / counts.sum()
    # a random replacement can land on the original token, so "kept" is a little above 10%
    assert abs(shares[0] - 0.8) < 0.02
    assert abs(shares[1] - 0.1) < 0.02
    assert abs(shares[2] - 0.1) < 0.03


def test_ratio_zero_chooses_nothing(batch, tables):
    ids, mask = batch
    words = word_ids(ids, mask, tables)
    assert not sample_whole_words(words, 0.0).any()


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_decoder_visibility_rules_and_ratio(batch, tables, ratio):
    ids, mask = batch
    words = word_ids(ids, mask, tables)
    generator = torch.Generator().manual_seed(2)
    visible = decoder_visibility(words, mask, ratio, generator)  # [B, L, L]
    batch_size, length = ids.shape
    assert visible.shape == (batch_size, length, length)
    assert visible[:, :, 0].all()  # position 0 always visible
    diagonal = visible.diagonal(dim1=1, dim2=2)[:, 1:]
    assert not diagonal.any()  # nobody sees itself
    assert not visible[~mask.bool().unsqueeze(1).expand_as(visible)].any()  # padding never visible
    # specials (not words) other than the row's own position stay visible
    special_keys = (words < 0) & mask.bool()
    eye = torch.eye(length, dtype=torch.bool)
    assert visible[special_keys.unsqueeze(1).expand_as(visible) & ~eye].all()
    # about `ratio` of the word tokens are hidden from each real row (excluding the diagonal)
    word_keys = (words >= 0).unsqueeze(1).expand_as(visible) & ~eye & mask.bool().unsqueeze(2)
    hidden_share = (~visible[word_keys]).float().mean().item()
    assert abs(hidden_share - ratio) < 0.03
    # rows are sampled independently: two rows of one text agree on a word key only by chance
    longest = int(mask.sum(dim=1).argmax())
    keys = (words[longest] >= 0).nonzero().squeeze(1)
    rows = keys[:6]
    agreements = [
        (visible[longest, i, keys] == visible[longest, j, keys]).float().mean().item()
        for i in rows
        for j in rows
        if i < j
    ]
    expected = ratio**2 + (1 - ratio) ** 2  # chance agreement of two independent draws
    assert abs(sum(agreements) / len(agreements) - expected) < 0.2
    assert min(agreements) < 1.0


def test_decoder_hides_whole_words(tokenizer, tables):
    encoded = tokenizer(["retrieval embedding retrieval embedding"], return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    words = word_ids(ids, mask, tables)
    visible = decoder_visibility(words, mask, 0.5, torch.Generator().manual_seed(3))
    length = ids.shape[1]
    for row in range(length):
        for word in range(int(words.max()) + 1):
            positions = [p for p in range(length) if words[0, p] == word and p != row]
            states = {bool(visible[0, row, p]) for p in positions}
            assert len(states) <= 1  # all pieces of a word share one fate


def test_same_seed_same_masks(batch, tables):
    ids, mask = batch
    words = word_ids(ids, mask, tables)
    first = encoder_mask(ids, words, tables, 0.3, torch.Generator().manual_seed(7))
    second = encoder_mask(ids, words, tables, 0.3, torch.Generator().manual_seed(7))
    other = encoder_mask(ids, words, tables, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    v1 = decoder_visibility(words, mask, 0.5, torch.Generator().manual_seed(7))
    v2 = decoder_visibility(words, mask, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(v1, v2)


def test_decoder_labels_skip_first_and_last(batch):
    ids, mask = batch
    labels = decoder_labels(ids, mask)
    lengths = mask.sum(dim=1)
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        assert labels[row, 0] == IGNORE_INDEX and labels[row, n - 1] == IGNORE_INDEX
        assert torch.equal(labels[row, 1 : n - 1], ids[row, 1 : n - 1])
        assert (labels[row, n:] == IGNORE_INDEX).all()


def test_tokenizer_without_mask_token_is_refused(tokenizer):
    import copy

    no_mask = copy.deepcopy(tokenizer)
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        build_vocab_tables(no_mask)

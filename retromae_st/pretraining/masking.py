"""Whole-word masking for RetroMAE, done on the device with tensor operations (SPEC section 1).

Read top to bottom: a per-vocabulary table says which token ids continue the previous word and which
are special; from it, :func:`word_ids` numbers the words of a batch; :func:`encoder_mask` picks whole
words until about ``ratio`` of the real tokens are chosen and applies the 80/10/10 replacement;
:func:`decoder_visibility` draws, for every position the decoder predicts, its own set of visible key
positions. No step loops over examples in Python: every function is a handful of batched tensor ops,
fresh every step, so masking never starves the accelerator.

Shapes: B batch, L padded length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# Word-boundary conventions of the common subword tokenizers.
WORDPIECE = "wordpiece"  # continuation pieces start with "##"
SENTENCEPIECE = "sentencepiece"  # word heads start with "▁"
BYTE_LEVEL_BPE = "byte-level-bpe"  # word heads start with "Ġ"

_MARKERS = {WORDPIECE: "##", SENTENCEPIECE: "\u2581", BYTE_LEVEL_BPE: "\u0120"}


@dataclass
class VocabTables:
    """Per-vocabulary-id lookup tables, built once from the tokenizer.

    Attributes:
        continues_word: [V] bool, True where a token continues the word of the token before it.
        special: [V] bool, True for special tokens and padding (never masked, never a word).
        replacement_ids: [R] long, the ids the 10% "random token" replacement draws from (no specials).
        mask_token_id: the id that replaces 80% of the encoder's chosen tokens.
        convention: which of WORDPIECE, SENTENCEPIECE, BYTE_LEVEL_BPE the vocabulary follows.
    """

    continues_word: torch.Tensor
    special: torch.Tensor
    replacement_ids: torch.Tensor
    mask_token_id: int
    convention: str

    def to(self, device: torch.device | str) -> VocabTables:
        if self.special.device == torch.device(device):
            return self
        return VocabTables(
            self.continues_word.to(device),
            self.special.to(device),
            self.replacement_ids.to(device),
            self.mask_token_id,
            self.convention,
        )


def detect_convention(vocab: dict[str, int]) -> str:
    """The tokenizer family, from which marker most of the vocabulary carries."""
    counts = {name: sum(token.startswith(marker) for token in vocab) for name, marker in _MARKERS.items()}
    return max(counts, key=counts.get)


def build_vocab_tables(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> VocabTables:
    """Build the word-continuation and special-token tables of ``tokenizer``.

    Args:
        tokenizer: a Hugging Face tokenizer with a mask token.
        vocab_size: size of the tables; at least ``len(tokenizer)``. Pass the model's embedding size when
            it is larger (padded vocabularies), so every id the model can see has an entry.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no mask token; RetroMAE masking needs one. "
            "Add one with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the embeddings."
        )
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), vocab_size or 0, max(vocab.values()) + 1)
    convention = detect_convention(vocab)
    marker = _MARKERS[convention]

    continues_word = torch.zeros(size, dtype=torch.bool)
    for token, index in vocab.items():
        starts_with_marker = token.startswith(marker)
        continues_word[index] = starts_with_marker if convention == WORDPIECE else not starts_with_marker

    special = torch.zeros(size, dtype=torch.bool)
    special_ids = set(tokenizer.all_special_ids)
    if tokenizer.pad_token_id is not None:
        special_ids.add(tokenizer.pad_token_id)
    special[list(special_ids)] = True
    # Ids past the tokenizer's vocabulary (padded embedding tables) never occur in real text.
    special[len(tokenizer) :] = True
    continues_word &= ~special

    replacement_ids = torch.nonzero(~special).squeeze(1)
    return VocabTables(continues_word, special, replacement_ids, tokenizer.mask_token_id, convention)


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) floats. ``generator`` is passed only when given: ``torch.compile`` cannot trace
    ``generator=None`` as a keyword (it fails making the fake tensor), but traces the plain call."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=device, generator=generator)


def _randint(high: int, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None):
    """Uniform integers in [0, high); ``generator`` only when given, as :func:`_rand`."""
    if generator is None:
        return torch.randint(high, shape, device=device)
    return torch.randint(high, shape, device=device, generator=generator)


def word_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, tables: VocabTables) -> torch.Tensor:
    """Number the words of every row: [B, L] long, word index 0..W-1, -1 at specials and padding.

    A token starts a word unless the table says it continues one; a token right after a special token
    always starts a word (the first word of a RoBERTa text has no "Ġ", yet it is not a continuation of <s>).
    """
    not_word = tables.special[input_ids] | ~attention_mask.bool()  # [B, L]
    after_special = torch.ones_like(not_word)
    after_special[:, 1:] = not_word[:, :-1]
    starts_word = ~not_word & (~tables.continues_word[input_ids] | after_special)
    ids = starts_word.long().cumsum(dim=1) - 1
    return ids.masked_fill(not_word, -1)


def _word_lengths(words: torch.Tensor) -> torch.Tensor:
    """[B, L] number of tokens in word w of row b (zero for word indices that do not exist)."""
    lengths = torch.zeros_like(words)
    return lengths.scatter_add_(1, words.clamp(min=0), (words >= 0).long())


def sample_whole_words(
    words: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose whole words in random order until about ``ratio`` of each row's word tokens are chosen.

    Returns [B, L] bool, True at the tokens of chosen words. A word is taken while the running token count,
    measured at the word's middle, stays under the target, so the expected ratio is ``ratio`` even when
    words have several pieces, and every row with words gets at least one when ``ratio > 0``.
    """
    lengths = _word_lengths(words)  # [B, W=L]
    exists = lengths > 0
    target = ratio * exists.long().mul(lengths).sum(dim=1, keepdim=True)  # [B, 1] tokens to choose
    keys = _rand(words.shape, words.device, generator).masked_fill(~exists, 2.0)
    order = keys.argsort(dim=1)  # random word order, missing words last
    sorted_lengths = lengths.gather(1, order)
    middle = sorted_lengths.cumsum(dim=1) - sorted_lengths / 2
    first = torch.zeros_like(exists)
    first[:, 0] = True  # at least one word per row
    chosen_sorted = (middle < target) | (first & (target > 0))
    chosen_sorted &= sorted_lengths > 0
    chosen_words = torch.zeros_like(exists).scatter(1, order, chosen_sorted)
    return chosen_words.gather(1, words.clamp(min=0)) & (words >= 0)


def encoder_mask(
    input_ids: torch.Tensor,
    words: torch.Tensor,
    tables: VocabTables,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's masked input and labels (BERT's 80% [MASK] / 10% random token / 10% kept).

    Returns:
        masked_ids: [B, L] the encoder input.
        labels: [B, L] the original id at chosen tokens, IGNORE_INDEX elsewhere.
    """
    chosen = sample_whole_words(words, ratio, generator)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    draw = _rand(input_ids.shape, input_ids.device, generator)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    pick = _randint(len(tables.replacement_ids), input_ids.shape, input_ids.device, generator)
    masked_ids = input_ids.masked_fill(to_mask, tables.mask_token_id)
    masked_ids = torch.where(to_random, tables.replacement_ids[pick], masked_ids)
    return masked_ids, labels


def decoder_visibility(
    words: torch.Tensor, attention_mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Enhanced decoding's attention mask: [B, L, L] bool, True where query row i may see key j.

    Every row draws its own set of words to hide (each word hidden with probability ``ratio``, fresh per
    row, which is the paper's per-position sampling). Special tokens stay visible, position i never sees
    itself, position 0 (the sentence embedding's slot) is always visible, padding never is.
    """
    batch, length = words.shape
    # [B, L(query), W] one independent draw per (row, word); words index the last dim via gather.
    hidden_word = _rand((batch, length, length), words.device, generator) < ratio
    key_words = words.clamp(min=0).unsqueeze(1).expand(batch, length, length)  # [B, L, L]
    hidden = hidden_word.gather(2, key_words) & (words >= 0).unsqueeze(1)  # only words can be hidden
    visible = ~hidden & attention_mask.bool().unsqueeze(1)  # never attend to padding
    visible &= ~torch.eye(length, dtype=torch.bool, device=words.device)  # never see yourself
    visible[:, :, 0] = True  # the sentence embedding is always there
    return visible


def decoder_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the decoder rebuilds: every real token except the first and the last ([CLS]...[SEP])."""
    labels = input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    last = attention_mask.long().sum(dim=1) - 1  # [B] index of the last real token
    labels.scatter_(1, last.clamp(min=0).unsqueeze(1), IGNORE_INDEX)
    return labels


def basic_decoder_input(
    input_ids: torch.Tensor,
    words: torch.Tensor,
    tables: VocabTables,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basic decoding's input: ``ratio`` of the words replaced by [MASK]; labels at those tokens."""
    chosen = sample_whole_words(words, ratio, generator)
    return input_ids.masked_fill(chosen, tables.mask_token_id), input_ids.masked_fill(~chosen, IGNORE_INDEX)


def labelled_positions(states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states and labels of the labelled positions only: [B, L, D], [B, L] -> [n, D], [n]."""
    where = labels != IGNORE_INDEX
    return states[where], labels[where]

"""Where a model comes from: presets built from scratch, a WordPiece tokenizer trained on the corpus,
or an existing encoder (local folder or hub name).

Every function returns a plain ``SentenceTransformer`` made of stock modules (``Transformer`` +
``Pooling``), so what RetroMAE pretrains is exactly what ``SentenceTransformer(path)`` loads. A preset pools
by CLS (:data:`PRESET_POOLING`); an existing Sentence-Transformers model keeps its own pooling unless asked
otherwise.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import pickle
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from sentence_transformers.util import ORIGINAL_TRANSFORMER_MODELS, is_sentence_transformer_model
from transformers import AutoConfig, BertConfig, BertModel, BertTokenizerFast, PreTrainedTokenizerBase

from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# What a preset (or a plain transformers checkpoint) gets when no pooling / length is asked for: RetroMAE's
# decoder reads the [CLS] vector. An existing Sentence-Transformers model keeps its own instead.
PRESET_POOLING = "cls"
PRESET_MAX_SEQ_LENGTH = 128
# A preset's attention value and output projections start at std gain / sqrt(hidden) instead of BERT's 0.02
# (see scale_attention_init). None keeps BERT's initialisation everywhere.
PRESET_ATTENTION_INIT_GAIN: float | None = 1.0
# Stage 1's peak learning rate when a recipe or the CLI says ``auto``, unless a preset sets its own: an
# existing encoder with its masked-LM head is continued gently (the rate of the RetroMAE paper's BERT-base
# runs, which continued BERT with its head).
PRETRAINED_LEARNING_RATE = 1e-4
# ... and one saved without that head (an embedding model such as all-MiniLM-L6-v2) at half of it: its fresh
# head and decoder pull it further from what it already does well. Measured continuing all-MiniLM-L6-v2 on
# debian-pkgs for 300 steps (dev split, 3 seeds; benchmarks/README.md, "The stage-1 rate for an existing
# model"): after the same stage 2, 1e-4 ended 1.19 nDCG@10 points below stage 2 alone, 5e-5 0.43 (within
# 2 std of the difference).
HEADLESS_LEARNING_RATE = 5e-5


@dataclass(frozen=True)
class Preset:
    """The shape of a from-scratch BERT encoder."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    # Stage 1's peak learning rate under ``auto``. retromae-tiny from scratch needs about 1e-3: at 1e-4 its
    # decoder learns to ignore h before the encoder writes anything into [CLS]. retromae-small's h_gain rose
    # fastest at 5e-4; at 1e-3 it never left the unigram plateau (benchmarks/README.md, "Stage-1 learning rate").
    learning_rate: float = PRETRAINED_LEARNING_RATE
    max_positions: int = 512

    def bert_config(self, tokenizer: PreTrainedTokenizerBase) -> BertConfig:
        """The BERT configuration of this shape for ``tokenizer``'s vocabulary."""
        return BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            # No dropout on attention weights (as ModernBERT and most recent encoders; hidden dropout
            # stays 0.1): with it on, CPU attention falls back from the fused SDPA kernel to the unfused
            # path that stores every [B, H, L, L] weight matrix, ~2x the attention's time and memory.
            attention_probs_dropout_prob=0.0,
        )


PRESETS: dict[str, Preset] = {
    # CPU minutes: tests and the offline quickstart.
    "retromae-tiny": Preset(layers=2, hidden=128, heads=2, intermediate=512, learning_rate=1e-3),
    # The "small" model of the reference measurements (SPEC section 9).
    "retromae-small": Preset(layers=4, hidden=256, heads=4, intermediate=1024, learning_rate=5e-4),
    # BERT-base shape; the paper's rate (not measured here from scratch).
    "retromae-base": Preset(layers=12, hidden=768, heads=12, intermediate=3072),
}


def stage1_learning_rate(
    learning_rate: float | str, model: str | None, loaded: SentenceTransformer | None = None
) -> float:
    """Stage 1's peak learning rate: ``learning_rate`` itself, or for ``"auto"`` the preset's own rate when
    ``model`` names a preset (:data:`PRESETS`), and for an existing model :data:`PRETRAINED_LEARNING_RATE`
    (1e-4), or :data:`HEADLESS_LEARNING_RATE` (5e-5) when ``loaded``, the model as loaded, has no masked-LM
    head for RetroMAE's shared head to start from (an embedding model). Without ``loaded`` an existing model
    gets 1e-4 (what the option checks need before the model is loaded)."""
    if learning_rate != "auto":
        return float(learning_rate)
    if model in PRESETS:
        return PRESETS[model].learning_rate
    if loaded is not None:
        from retromae_st.pretraining.loss import has_pretrained_head

        try:
            headed = has_pretrained_head(loaded)
        except ValueError:  # an encoder RetroMAE cannot use: the loss says so, in its own words, when built
            return PRETRAINED_LEARNING_RATE
        return PRETRAINED_LEARNING_RATE if headed else HEADLESS_LEARNING_RATE
    return PRETRAINED_LEARNING_RATE


def resolve_stage1_learning_rate(
    learning_rate: float | str, model: str | None, loaded: SentenceTransformer, option: str
) -> float:
    """:func:`stage1_learning_rate` for the loaded model, logged with its reason when ``auto`` chose it
    (``option`` names the setting in the log line: ``--lr`` or ``pretrain.learning_rate``)."""
    rate = stage1_learning_rate(learning_rate, model, loaded=loaded)
    if learning_rate == "auto":
        logger.info("Stage 1 learning rate: %g (%s auto: %s)", rate, option, describe_auto_rate(model, rate))
    return rate


def describe_auto_rate(model: str | None, rate: float) -> str:
    """Why ``auto`` chose ``rate`` (what :func:`stage1_learning_rate` returned), for the log line stating it."""
    if model in PRESETS:
        return f"the {model} preset's rate"
    if rate == HEADLESS_LEARNING_RATE:
        return "an existing model without a masked-LM head"
    return "an existing model"


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Train a BERT-style WordPiece tokenizer on ``texts`` with the Hugging Face ``tokenizers`` library.

    A vocabulary trained on the target corpus (a few thousand entries) keeps the vocabulary-wide work of
    the two MLM heads small and lets a small model learn on a CPU within minutes.

    The vocabulary is the one ``tokenizers``' ``WordPieceTrainer`` learns (the same frequency-ordered
    merges), but computed here with every tie broken by a fixed order, so the same texts always give the
    same ``tokenizer.json``: the library's trainer walks Rust hash maps whose order is random per call (no
    thread or environment setting fixes it), and its tie-breaks then differ from run to run.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab_size < len(SPECIAL_TOKENS) + 10:
        raise UserInputError(
            f"vocab_size={vocab_size} is too small: use at least {len(SPECIAL_TOKENS) + 10}."
        )
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for text in texts:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        word_counts.update(word for word, _ in pieces)
    vocab = _wordpiece_vocab(word_counts, vocab_size, min_frequency)
    tokenizer = Tokenizer(
        models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX)
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserInputError("the tokenizer learned no vocabulary: the corpus has no usable text.")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
    )


WORDPIECE_PREFIX = "##"


def _wordpiece_vocab(word_counts: Counter[str], vocab_size: int, min_frequency: int) -> dict[str, int]:
    """The WordPiece vocabulary of ``tokenizers``' trainer, deterministically: the special tokens, every
    character (sorted), every word-inner character as ``##c`` (sorted), then merges of the most frequent
    adjacent pair until ``vocab_size`` entries or no pair occurs ``min_frequency`` times.

    Ties in frequency go to the pair of smaller ids (the library's rule too); as the ids here come from
    sorted lists rather than hash-map order, the result depends on the word counts alone.
    """
    words = sorted(word_counts)
    chars = sorted({char for word in words for char in word})
    inner = sorted({char for word in words for char in word[1:]})
    id_to_token = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(WORDPIECE_PREFIX + c for c in inner)]))
    token_to_id = {token: i for i, token in enumerate(id_to_token)}
    pieces = [
        [token_to_id[word[0]], *(token_to_id[WORDPIECE_PREFIX + c] for c in word[1:])] for word in words
    ]
    counts = [word_counts[word] for word in words]
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (piece, count) in enumerate(zip(pieces, counts)):
        for pair in zip(piece, piece[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    # A max-heap by count, then min by pair; entries go stale as counts fall and are re-queued lazily.
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    while len(id_to_token) < vocab_size and heap:
        negative, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if -negative != current:
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break
        token = id_to_token[a] + id_to_token[b].removeprefix(WORDPIECE_PREFIX)
        if token not in token_to_id:  # two merges can spell the same piece: it keeps its first id
            token_to_id[token] = len(id_to_token)
            id_to_token.append(token)
        new_id = token_to_id[token]
        grown: set[tuple[int, int]] = set()
        for i in sorted(where.pop((a, b))):
            old, count = pieces[i], counts[i]
            merged: list[int] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(old[j])
                    j += 1
            if len(merged) == len(old):  # stale: an earlier merge took this word's occurrences
                continue
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= count
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += count
                where[pair].add(i)
                grown.add(pair)
            pieces[i] = merged
        for pair in sorted(grown):
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
    return token_to_id


def build_model(
    preset: str | Preset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int | None = None,
    pooling: str | None = None,
    save_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    attention_init_gain: float | None | str = "default",
) -> SentenceTransformer:
    """A randomly initialised BERT encoder of a preset shape, as ``Transformer`` + ``Pooling``.

    Args:
        preset: a name from :data:`PRESETS` (``retromae-tiny``, ``retromae-small``, ``retromae-base``)
            or a :class:`Preset`.
        tokenizer: the tokenizer; its vocabulary size fixes the embedding table.
        max_seq_length: the longest input the model reads; at most the preset's positions. None:
            :data:`PRESET_MAX_SEQ_LENGTH` (128).
        pooling: ``"cls"`` for RetroMAE (the decoder reads the [CLS] vector; the default, None, means
            this); ``"mean"`` for a from-scratch model fine-tuned without RetroMAE.
        save_dir: where the initial weights are written (Sentence-Transformers builds its
            ``Transformer`` module from a folder); None: a temporary folder, removed once the model is loaded.
        seed: seeds the weight initialisation.
        attention_init_gain: the attention value and output projections start at std
            ``gain / sqrt(hidden)`` (:func:`scale_attention_init`), so that [CLS] depends on the text from
            the first step; ``"default"`` is :data:`PRESET_ATTENTION_INIT_GAIN`, None keeps BERT's 0.02.
    """
    if attention_init_gain == "default":
        attention_init_gain = PRESET_ATTENTION_INIT_GAIN
    if attention_init_gain is not None and (
        isinstance(attention_init_gain, bool)
        or not isinstance(attention_init_gain, (int, float))
        or not 0 < attention_init_gain <= 10
    ):
        raise UserInputError(
            f"attention_init_gain={attention_init_gain!r} must be a number in (0, 10], or null for BERT's init."
        )
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserInputError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)}.")
        shape = PRESETS[preset]
    else:
        shape = preset
    max_seq_length = PRESET_MAX_SEQ_LENGTH if max_seq_length is None else max_seq_length
    pooling = PRESET_POOLING if pooling is None else pooling
    if max_seq_length > shape.max_positions:
        raise UserInputError(
            f"max_seq_length={max_seq_length} exceeds the model's {shape.max_positions} positions: "
            f"use max_seq_length <= {shape.max_positions}."
        )
    if tokenizer.mask_token_id is None:
        raise UserInputError("the tokenizer has no mask token; RetroMAE needs one (e.g. '[MASK]').")
    config = shape.bert_config(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    bert = BertModel(config)
    if attention_init_gain is not None:
        scale_attention_init(bert, float(attention_init_gain))
    if save_dir is not None:
        return _save_and_assemble(
            bert, tokenizer, Path(save_dir), max_seq_length=max_seq_length, pooling=pooling
        )
    # Once loaded, the model no longer needs its folder: remove it rather than leave one per call in /tmp
    # (where a loaded file cannot be removed, as on Windows while it is mapped, leave it rather than fail).
    with tempfile.TemporaryDirectory(prefix="retromae-init-", ignore_cleanup_errors=True) as folder:
        return _save_and_assemble(
            bert, tokenizer, Path(folder), max_seq_length=max_seq_length, pooling=pooling
        )


def _save_and_assemble(
    bert: BertModel, tokenizer: PreTrainedTokenizerBase, folder: Path, *, max_seq_length: int, pooling: str
) -> SentenceTransformer:
    """Write ``bert`` and ``tokenizer`` to ``folder`` and load them back as ``Transformer`` + ``Pooling``."""
    folder.mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return _assemble(str(folder), max_seq_length=max_seq_length, pooling=pooling)


def scale_attention_init(bert: BertModel, gain: float) -> None:
    """Re-initialise every self-attention's value and output projection at std ``gain / sqrt(hidden)``.

    Why: at BERT's initialisation (std 0.02) the attention adds ~0.5% of the residual stream's norm, so a
    from-scratch model's [CLS] output is its own embedding, the same vector for every text (its spread
    across texts is 0.7% of its norm in a 2x128 model). Neither MNRL nor RetroMAE's decoder can then pull
    the text into [CLS]: MNRL with CLS pooling stays at ln(batch size), and the decoder learns to do
    without h. At the start attention is uniform, so a value/output path of gain ~1 makes each layer add a
    random projection of the mean of the text's tokens: [CLS] starts as a mean-pooled bag of words (spread
    13% at gain 1, 22% at gain 2, mean pooling 17%) and the training signal reaches it from step one.
    Measured in ``benchmarks/results/cls_init.md``. Queries, keys and everything else keep BERT's init.
    """
    std = gain / bert.config.hidden_size**0.5
    with torch.no_grad():
        for layer in bert.encoder.layer:
            for linear in (layer.attention.self.value, layer.attention.output.dense):
                linear.weight.normal_(mean=0.0, std=std)
                linear.bias.zero_()


def hub_name(name_or_path: str) -> str:
    """The name ``SentenceTransformer(name_or_path)`` loads: a short hub name (no ``/``) that is not one of
    the original transformers checkpoints (``bert-base-uncased``, ...) gains the ``sentence-transformers/``
    prefix, so ``all-MiniLM-L6-v2`` is ``sentence-transformers/all-MiniLM-L6-v2``. Folders stay as they are.
    """
    if os.path.isdir(name_or_path) or "/" in name_or_path or "\\" in name_or_path:
        return name_or_path
    organization = SentenceTransformer.default_huggingface_organization
    if organization is None or name_or_path.lower() in ORIGINAL_TRANSFORMER_MODELS:
        return name_or_path
    return f"{organization}/{name_or_path}"


def pooling_mode(model: SentenceTransformer) -> str | None:
    """How ``model`` pools token vectors into one (``"cls"``, ``"mean"``, ...); None without a Pooling module."""
    module = next((module for module in model if isinstance(module, Pooling)), None)
    if module is None:
        return None
    mode = module.pooling_mode
    return mode if isinstance(mode, str) else "+".join(mode)


def model_source(name_or_path: str, *, allow_pickle: bool = False) -> str:
    """What :func:`load_encoder` loads for ``name_or_path``: the folder itself, after the safe-loading checks
    (a model folder, not pickle-only unless ``allow_pickle``), or the hub name (:func:`hub_name`).

    Raises:
        UserInputError: a file, a folder that is not a model, pickle-only weights, or a path that does not
            exist and cannot be a hub name.
    """
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{name_or_path} is a file; pass the model's folder.")
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise UserInputError(
                f"{name_or_path} is not a Sentence-Transformers or transformers model: it has neither "
                "modules.json nor config.json."
            )
        if not allow_pickle and not any(path.rglob("*.safetensors")) and any(path.rglob("*.bin")):
            raise UserInputError(
                f"{name_or_path} holds only pickle (.bin) weights, which can run code when loaded: convert them to "
                "safetensors, or pass --allow-pickle if you trust the folder."
            )
        return name_or_path
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):
        # A hub name is "org/name" at most; anything longer was meant as a folder.
        raise UserInputError(f"{name_or_path} does not exist: pass an existing model folder or a hub name.")
    return hub_name(name_or_path)


def check_model_available(
    name_or_path: str, *, allow_pickle: bool = False, max_seq_length: int | None = None, what: str = "model"
) -> None:
    """Check, without loading weights, that :func:`load_encoder` can find ``name_or_path``: a local folder
    passes :func:`model_source` (and ``max_seq_length`` fits its ``config.json``); a hub name must be in
    the local cache when offline (``HF_HUB_OFFLINE``), or known to the hub otherwise (one short request;
    a hub that cannot be reached is only logged, the loader reports it later).

    Raises:
        UserInputError: naming ``what`` (e.g. ``model.name_or_path``), the model and what to do.
    """
    try:
        source = model_source(name_or_path, allow_pickle=allow_pickle)
    except UserInputError as error:
        raise UserInputError(f"{what}: {error}") from None
    if Path(source).is_dir():
        config_file = Path(source) / "config.json"
        if max_seq_length is not None and config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise UserInputError(
                    f"{what}: {config_file} is not valid JSON; repair or replace it."
                ) from None
            positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
            if isinstance(positions, int) and max_seq_length > positions:
                raise UserInputError(
                    f"{what}: max_seq_length={max_seq_length} exceeds the {positions} positions of "
                    f"{name_or_path}: use max_seq_length <= {positions}."
                )
        return
    import huggingface_hub

    if _offline():
        cached = any(
            isinstance(huggingface_hub.try_to_load_from_cache(source, name), str)
            for name in ("modules.json", "config.json")
        )
        if not cached:
            raise UserInputError(
                f"{what}: {source!r} is neither a local folder nor in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE is set: download it first or pass a local folder."
            )
        return
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(source, timeout=10)
    except GatedRepoError:
        return  # it exists; the loader reports access problems itself
    except RepositoryNotFoundError:
        raise UserInputError(
            f"{what}: {name_or_path!r} is no local folder and the hub has no model {source!r}: check the name "
            "or the path."
        ) from None
    except Exception as error:  # network failures come as httpx, requests or OS errors depending on versions
        logger.warning("could not ask the hub about %s (%s); the loader will try again", source, error)


def load_encoder(
    name_or_path: str,
    *,
    max_seq_length: int | None = None,
    pooling: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Load an existing encoder as a Sentence-Transformers model.

    A Sentence-Transformers model (a folder or hub repository with ``modules.json``) loads exactly as
    ``SentenceTransformer(name_or_path)`` loads it: its own modules, pooling and maximum length, short hub
    names resolved the same way (:func:`hub_name`). A plain transformers encoder (``config.json`` and no
    ``modules.json``, e.g. ``bert-base-uncased``) becomes ``Transformer`` + ``Pooling(pooling)``, CLS by
    default. An explicit ``pooling`` or ``max_seq_length`` is honoured for both: a Sentence-Transformers
    model's Pooling module is replaced when it pools otherwise. Loading is safe by default: weights only
    from safetensors (``allow_pickle`` lifts that) and no code from the model (``trust_remote_code`` lifts
    that).
    """
    path = Path(name_or_path)
    kwargs = {"use_safetensors": not allow_pickle, **(model_kwargs or {})}
    source = model_source(name_or_path, allow_pickle=allow_pickle)
    try:
        if path.exists():
            is_st = (path / "modules.json").exists()
        else:
            # The same probe SentenceTransformer itself makes (modules.json in the repository or the cache).
            is_st = is_sentence_transformer_model(source, local_files_only=_offline())
        if not is_st:
            return _assemble(
                source,
                max_seq_length=max_seq_length,
                pooling=PRESET_POOLING if pooling is None else pooling,
                trust_remote_code=trust_remote_code,
                model_kwargs=kwargs,
            )
        model = SentenceTransformer(
            source, trust_remote_code=trust_remote_code, model_kwargs=kwargs, local_files_only=_offline()
        )
    except OSError as error:
        if path.exists():
            raise
        hint = " (HF_HUB_OFFLINE is set: download it first or pass a local folder)" if _offline() else ""
        # Name the hub repository looked up: a short name is not the folder the user may have meant.
        looked_up = f" (no such folder; looked up on the hub as {source!r})" if source != name_or_path else ""
        raise UserInputError(f"cannot load model {name_or_path!r}{looked_up}{hint}: {error}") from error
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        # --allow-pickle reads .bin weights with torch's weights-only unpickler: a corrupt file (RuntimeError
        # from the zip reader, EOFError) or one that would run code (UnpicklingError) stops here, unexecuted.
        if not allow_pickle or not (
            isinstance(error, (pickle.UnpicklingError, EOFError)) or "zip" in str(error)
        ):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"{name_or_path}: its pickle (.bin) weights cannot be loaded safely ({type(error).__name__}: "
            f"{first[:200]}); the file is corrupt or holds more than tensors (code that would run when loaded). "
            "Use safetensors weights from a trusted source."
        ) from error
    if max_seq_length is not None:
        config = getattr(getattr(model[0], "auto_model", None), "config", None)
        _check_positions(config, max_seq_length, name_or_path)
        model.max_seq_length = max_seq_length
    if pooling is not None:
        set_pooling(model, pooling, name_or_path)
    return model


def set_pooling(model: SentenceTransformer, pooling: str, name: str = "the model") -> None:
    """Make ``model`` pool by ``pooling``, replacing its Pooling module (in place) when it pools otherwise."""
    for key, module in model._modules.items():
        if not isinstance(module, Pooling):
            continue
        own = pooling_mode(model)
        if own == pooling:
            return
        logger.info(
            "%s pools by %s; replacing its Pooling module by %s pooling, as asked", name, own, pooling
        )
        replacement = Pooling(
            module.embedding_dimension, pooling_mode=pooling, include_prompt=module.include_prompt
        )
        model._modules[key] = replacement.to(next(model.parameters()).device)
        return
    raise UserInputError(
        f"{name} has no Pooling module, so pooling={pooling!r} cannot be applied: leave pooling unset."
    )


def _assemble(
    name_or_path: str,
    *,
    max_seq_length: int | None,
    pooling: str,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    if trust_remote_code:
        model_kwargs = {**(model_kwargs or {}), "trust_remote_code": True}
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if max_seq_length is not None:
        _check_positions(config, max_seq_length, name_or_path)
    transformer = Transformer(
        name_or_path,
        max_seq_length=max_seq_length,
        model_kwargs=model_kwargs,
        config_kwargs={"trust_remote_code": trust_remote_code},
        processor_kwargs={"trust_remote_code": trust_remote_code},
    )
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pooling_module])


def _check_positions(config: Any, max_seq_length: int, name_or_path: str) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise UserInputError(
            f"max_seq_length={max_seq_length} exceeds the {positions} positions of {name_or_path}: "
            f"use max_seq_length <= {positions}."
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}

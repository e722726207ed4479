"""RetroMAELoss: RetroMAE pretraining as a Sentence-Transformers loss (SPEC sections 1-6)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from torch import nn

from retromae_st.errors import NonFiniteLossError, UserInputError
from retromae_st.pretraining.decoder import RetroMAEDecoder
from retromae_st.pretraining.diagnostics import (
    EMBEDDING_COSINE,
    H_GAIN,
    derangement,
    mean_pairwise_cosine,
)
from retromae_st.pretraining.encoders import (
    EncoderAdapter,
    adapt_encoder,
    checkpoint_tensors,
    looks_untrained,
)
from retromae_st.pretraining.heads import (
    ChunkedMaxPooledLogits,
    MLMHead,
    bag_of_words_loss,
    default_chunk_rows,
    join_rows,
    pretrained_head_names,
    pretrained_head_state,
)
from retromae_st.pretraining.masking import (
    VocabTables,
    basic_decoder_input,
    build_vocab_tables,
    decoder_labels,
    decoder_visibility,
    encoder_mask,
    labelled_positions,
    word_ids,
)
from retromae_st.pretraining.packing import (
    attention_backend,
    pack_inputs,
    pack_rows,
    packable,
    packed_call,
    packing_pays,
)
from retromae_st.pretraining.unpadding import plan_length_groups, select_rows

logger = logging.getLogger(__name__)

LOSS_WEIGHTS_NAME = "retromae_loss.safetensors"

__all__ = ["LOSS_WEIGHTS_NAME", "NonFiniteLossError", "RETROMAE_CITATION", "RetroMAELoss"]

RETROMAE_CITATION = """
@inproceedings{xiao-etal-2022-retromae,
    title = "{R}etro{MAE}: Pre-Training Retrieval-oriented Language Models Via Masked Auto-Encoder",
    author = "Xiao, Shitao and Liu, Zheng and Shao, Yingxia and Cao, Zhao",
    booktitle = "Proceedings of the 2022 Conference on Empirical Methods in Natural Language Processing",
    year = "2022",
    publisher = "Association for Computational Linguistics",
    pages = "538--548",
    url = "https://arxiv.org/abs/2205.12035",
}
"""


def attention_kernels(device: torch.device | None) -> contextlib.AbstractContextManager:
    """The SDPA kernels a step may use: on CUDA, every kernel but cuDNN's attention.

    Why: PyTorch prefers cuDNN's attention on Hopper GPUs, and cuDNN builds an execution plan for every
    new shape. A step's shapes change with every batch (the length groups, the packed buckets and the
    decoder's [B, L, L] mask follow the rows' lengths), so each step paid for new plans: on an H200, a
    packed base step on mixed-length rows took 982 ms with cuDNN and 110 ms with flash / memory-efficient
    attention (``benchmarks/results/gpu_throughput.md``). Elsewhere: no change.
    """
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _ArrivesLast(torch.autograd.Function):
    """Identity on the tied [V, D] table for the vocabulary head; see :func:`sparse_lookup_gradients`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


@contextlib.contextmanager
def sparse_lookup_gradients(table: nn.Module, enabled: bool) -> Iterator[torch.Tensor]:
    """While on, lookups in ``table`` (an ``nn.Embedding``) give sparse gradients: their [n, D] rows
    instead of a dense [V, D] tensor each. Yields the table's weight as the tied head must use it.

    Why: the word-embedding table gets three gradients a step: from the encoder's input, from the
    decoder's content stream and from the tied head's d/dW. Dense, each lookup's is a fresh [V, D] buffer
    (94 MB at BERT-base) that the CPU zero-fills and page-faults, and autograd adds them up. Sparse, their
    rows can be added into the head's dense d/dW in place, so ``.grad`` is dense for the optimizer as
    before, but only in one order: autograd sums a tensor's gradients as they arrive and forms a dense sum
    with a sparse addend out of place (a fresh [V, D] copy each time, torch 2.13), while a dense gradient
    arriving after sparse ones takes them in place. Its engine runs the most recently created nodes first,
    so the head's d/dW (made last in forward) would arrive first. The yielded weight is the table behind
    an identity node made here, before any lookup: it runs after them, so the head's d/dW arrives last
    (``benchmarks/README.md``: the word-embedding table's gradient buffers). Only the order of a sum changes.
    """
    if not enabled or not isinstance(table, nn.Embedding) or table.sparse or table.max_norm is not None:
        yield table.weight
        return
    table.sparse = True
    try:
        yield _ArrivesLast.apply(table.weight)
    finally:
        table.sparse = False


class RetroMAELoss(nn.Module):
    DEFAULT_LENGTH_GROUPS = 4
    AUTO_HEAD_WARMUP_STEPS = 50
    AUTO_HEAD_WARMUP_SHARE = 0.4  # of max_steps, at most
    # "auto" head_lr_factor for a fresh head on a pretrained encoder (measured: benchmarks/README.md,
    # continuing all-MiniLM-L6-v2, the stage-1 model's dev nDCG@10 fell 0.050 at 1x, 0.031 at 10x, and
    # 0.020 at 10x with a 20-step warm-up).
    AUTO_HEAD_LR_FACTOR = 10.0
    # "auto" warm-up ends once both losses are below this share of ln(V), the loss of uniform guessing.
    AUTO_HEAD_WARMUP_END = 0.5

    def __init__(
        self,
        model: SentenceTransformer,
        encoder_mask_ratio: float = 0.3,
        decoder_mask_ratio: float = 0.5,
        decoding: Literal["enhanced", "basic"] = "enhanced",
        decoder_layers: int = 1,
        decoder_heads: int | None = None,
        bow_weight: float = 0.0,
        query_stream: Literal["layernorm", "plain"] = "layernorm",
        chunk_rows: int | None = None,
        max_length_groups: int = DEFAULT_LENGTH_GROUPS,
        check_finite: bool = True,
        head_warmup_steps: int | Literal["auto"] = "auto",
        head_lr_factor: float | Literal["auto"] = "auto",
        decoder_mask_start: float | None = None,
        decoder_mask_steps: int = 0,
        mean_mix_start: float = 0.0,
        mean_mix_steps: int = 0,
        compile: bool = False,
        packed: bool | Literal["auto"] = "auto",
    ) -> None:
        r"""RetroMAE: the sentence embedding must carry the whole text, because a shallow decoder has to
        rebuild the text from that one vector plus a heavily masked view of it.

        Each step, for a batch of texts: the encoder reads a whole-word-masked copy (``encoder_mask_ratio``,
        BERT's 80/10/10 replacement) and is trained with MLM at the masked tokens; its [CLS] vector h then
        drives the decoder, which rebuilds every token of the text. With enhanced decoding each position
        predicts its token from h and its own random subset of the other tokens (``decoder_mask_ratio`` of
        the words hidden, itself always hidden). The loss returns each component separately so the trainer
        logs them. Masking happens here, on the device, from the token ids the collator produced.

        The loss owns the decoder and the MLM head's transform (the vocab projection is tied to the
        encoder's input embeddings). The trainer only checkpoints, clips and synchronises the *model's*
        parameters, so train with :class:`retromae_st.pretraining.training.RetroMAETrainingCallback` (added for you by
        :class:`retromae_st.pretraining.trainer.RetroMAETrainer` and :func:`retromae_st.pretraining.training.pretrain`),
        which handles the loss's weights too. The model itself
        stays a stock ``Transformer`` + ``Pooling('cls')`` Sentence-Transformer.

        The sentence embedding h that the decoder reads is the model's own ``sentence_embedding``: the output
        of its *last* module, exactly the vector ``encode`` returns and retrieval compares. After ``Pooling``
        that includes ``Normalize`` (h is then unit length) and ``Dense`` (which must keep the hidden size),
        so the decoder trains the retrieval vector itself, not an intermediate one. A model that pools by
        mean (an existing embedding model such as all-MiniLM-L6-v2) keeps its pooling: the decoder reads the
        mean-pooled vector and stage 2 fine-tunes that same vector.

        The shared MLM head starts from the starting checkpoint's own masked-LM head when its safetensors
        file has one (BERT ``cls.predictions``, RoBERTa/XLM-R ``lm_head``, DistilBERT ``vocab_*``, ModernBERT
        ``head`` + ``decoder``, ELECTRA's generator); otherwise it is initialised as BERT's, and on a
        pretrained encoder the fresh head and decoder first train alone (``head_warmup_steps``) so that
        their first, random gradients do not reach the encoder.

        Diagnostics: on steps where :meth:`request_diagnostics` was called (the training callback does it
        on logging steps), the loss also measures ``h_gain`` and ``embedding_cosine`` without gradients
        (:mod:`retromae_st.pretraining.diagnostics`) into :attr:`last_diagnostics`; the callback logs them.

        Args:
            model: the SentenceTransformer to pretrain: a ``Transformer`` module (BERT, RoBERTa/XLM-R,
                DistilBERT, ModernBERT, ELECTRA, ...) followed by ``Pooling('cls')``.
            encoder_mask_ratio: share of real tokens masked for the encoder, 0 < r < 1 (paper 0.15-0.30).
            decoder_mask_ratio: share of words each decoder position cannot see, 0 < r < 1 (paper 0.5-0.7).
            decoding: ``"enhanced"`` (two-stream, per-position masks; the paper's best) or ``"basic"``
                (self-attention over a ``decoder_mask_ratio``-masked copy; loss on the masked tokens).
            decoder_layers: transformer layers in the decoder (>= 1; the paper uses 1).
            decoder_heads: attention heads in the decoder; must divide the hidden size. Default: the encoder's.
            bow_weight: weight of DupMAE's bag-of-words objective (RetroMAE v2); 0 turns it off, the
                reference uses 0.1. Its logged value is already weighted.
            query_stream: ``"layernorm"`` (h + position embedding through the embedding layer norm, as
                FlagEmbedding) or ``"plain"`` (h + position embedding, as staoxiao/RetroMAE).
            chunk_rows: rows per chunk of the vocabulary-wide cross-entropy; default keeps one chunk's
                logits near 16 MiB on the CPU and 256 MiB on CUDA.
            max_length_groups: run each batch as at most this many sub-batches of rows of similar
                length, each padded only to its own longest row (:mod:`retromae_st.pretraining.unpadding`). The loss
                and its gradients are those of the whole batch (every term is per row); only the compute
                spent on padding goes. 1 runs the batch as it comes.
            check_finite: raise :class:`NonFiniteLossError` naming the component when a loss is NaN/inf.
            head_warmup_steps: train the MLM head and decoder with the encoder frozen (no gradient into it)
                for the first N optimizer steps. ``"auto"`` (default): when the head is fresh and the encoder
                pretrained (not at its initial weights), up to :attr:`AUTO_HEAD_WARMUP_STEPS` steps and 40% of
                the run's steps, ending at the first step where both the encoder MLM and the decoder losses
                are below ln(V) / 2 (far better than uniform guessing); 0 otherwise. 0 turns it off.
            head_lr_factor: the loss's own weights (decoder, head transform and bias; not the vocabulary
                projection, tied to the encoder's word embeddings) train at this multiple of the learning
                rate (:func:`retromae_st.pretraining.training.pretrain` sets the trainer's
                ``learning_rate_mapping``). ``"auto"`` (default): :attr:`AUTO_HEAD_LR_FACTOR` (10) when the
                head is fresh and the encoder pretrained, so the new weights catch up with the pretrained
                ones before their gradients reach it; 1 otherwise (from scratch, or a checkpoint's head).
            decoder_mask_start: a decoder-mask curriculum: the decoder mask ratio at step 0, in (0, 1],
                annealed linearly to ``decoder_mask_ratio`` over ``decoder_mask_steps`` steps by
                :class:`retromae_st.pretraining.curriculum.MaskRatioCurriculum` (which
                :func:`retromae_st.pretraining.training.pretrain` adds when this is set). None: no curriculum.
            decoder_mask_steps: the length of that ramp in optimizer steps.
            mean_mix_start: a sentence-embedding curriculum for from-scratch encoders: at step 0 the decoder
                reads ``(1 - a) * h + a * mean(token states)`` with ``a = mean_mix_start`` in [0, 1], and ``a``
                falls linearly to 0 over ``mean_mix_steps`` steps (then h alone, as the paper). A random
                encoder's [CLS] barely differs between texts, so the decoder learns to ignore it; the mean of
                the token states differs from the start, so the decoder learns to read its input, and the
                encoder has to put the text into h as the mean fades (measured: benchmarks/results/
                cls_schedule.md; it helps stage 1, not yet stage 2 at CPU budgets). 0 (default): off.
            mean_mix_steps: the length of that ramp in optimizer steps.
            compile: run the encoder call and the decoder through ``torch.compile`` (default backend;
                shapes become dynamic after the first new one). The masking, the length groups, the
                selection of labelled positions and the chunked vocabulary cross-entropy stay eager: they
                are cheap, data-dependent, and keep the same random draws as an eager run. The first steps
                pay the compile time. A model the trainer already compiled (``torch_compile=True``) is not
                compiled again. Off by default.
            packed: run the encoder on the batch's real tokens only: one stream of all rows' tokens, with
                per-row attention (:mod:`retromae_st.pretraining.packing`), so that its compute follows the
                real tokens, not B x the longest row; the decoder and heads still run as length groups.
                Same loss and gradients as the padded call. ``"auto"`` (default): pack where it pays, on
                the encoders that can run packed (BERT, RoBERTa / XLM-R / CamemBERT, DistilBERT, ELECTRA,
                ModernBERT) on CUDA, and on CPU from hidden size 256 up (below it the per-row attention
                calls cost more than the padding saves: measured on 2 CPU cores, hidden 128 ran 4% slower
                packed, 256 5-10% faster, 768 22% faster); length groups otherwise, without a warning.
                ``True``: pack every batch that has padding wherever the encoder can, and warn where it
                cannot (another architecture, ``compile=True``, activation checkpointing). ``False``: length
                groups.

        References:
            - RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked Auto-Encoder,
              Xiao et al., EMNLP 2022, https://arxiv.org/abs/2205.12035
            - RetroMAE v2 / DupMAE: https://arxiv.org/abs/2211.08769
            - Reference code: https://github.com/staoxiao/RetroMAE and FlagOpen/FlagEmbedding

        Requirements:
            1. A tokenizer with a mask token that pads on the right; texts tokenised with special tokens
               ([CLS] ... [SEP]).
            2. A sentence embedding of the hidden size; CLS pooling follows the paper, any pooling works
               (the decoder reads the model's sentence embedding; stage 2 fine-tunes the same vector).
            3. Unlabelled text; fine-tune afterwards (e.g. ``MultipleNegativesRankingLoss``): the pretrained
               encoder alone is not yet a good similarity model.

        Inputs:
            +---------------------------------------------+--------+
            | Texts                                       | Labels |
            +=============================================+========+
            | (text) single column, or pre-tokenised      | none   |
            | ``input_ids`` from :mod:`retromae_st.data.tokenize` |        |
            +---------------------------------------------+--------+

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
                from retromae_st import RetroMAELoss, RetroMAETrainingCallback, build_model, train_wordpiece_tokenizer

                texts = ["the first document", "another unlabeled text", ...]
                tokenizer = train_wordpiece_tokenizer(texts, vocab_size=8000)
                model = build_model("retromae-small", tokenizer, max_seq_length=128)
                loss = RetroMAELoss(model, encoder_mask_ratio=0.3, decoder_mask_ratio=0.5)
                trainer = SentenceTransformerTrainer(
                    model=model,
                    train_dataset=Dataset.from_dict({"text": texts}),
                    loss=loss,
                    callbacks=[RetroMAETrainingCallback(loss)],
                )
                trainer.train()
                model.save_pretrained("retromae-small-pretrained")  # a plain SentenceTransformer
        """
        super().__init__()
        check_loss_options(
            encoder_mask_ratio=encoder_mask_ratio,
            decoder_mask_ratio=decoder_mask_ratio,
            decoding=decoding,
            decoder_layers=decoder_layers,
            decoder_heads=decoder_heads,
            bow_weight=bow_weight,
            query_stream=query_stream,
            chunk_rows=chunk_rows,
            max_length_groups=max_length_groups,
            head_warmup_steps=head_warmup_steps,
            head_lr_factor=head_lr_factor,
            decoder_mask_start=decoder_mask_start,
            decoder_mask_steps=decoder_mask_steps,
            mean_mix_start=mean_mix_start,
            mean_mix_steps=mean_mix_steps,
            compile=compile,
            packed=packed,
        )
        _check_padding_side(model.tokenizer)

        self.model = model
        self.encoder_mask_ratio = float(encoder_mask_ratio)
        self.decoder_mask_ratio = float(decoder_mask_ratio)
        self.decoding = decoding
        self.bow_weight = float(bow_weight)
        self.query_stream_form = query_stream
        self.max_length_groups = max_length_groups
        self.check_finite = check_finite
        self.compile = bool(compile)
        self.packed = packed
        # torch.compile'd callables, kept in a plain dict so that they are not registered as submodules
        # (their parameters would be listed twice): name -> (the callable compiled, its compiled form).
        self._compiled: dict[str, tuple[Any, Any]] = {}
        self.current_step: int | None = None  # set by the training callback, for error messages
        self.callback_attached = False
        # Diagnostics: requested per step by the callback (logging steps), read back by it in on_log.
        self.diagnostics_due = False
        self.last_diagnostics: dict[str, float] | None = None
        self._frozen_now = False  # whether the running forward is a head warm-up step

        transformer = _transformer_module(model)
        adapter = adapt_encoder(transformer.auto_model)
        config = transformer.auto_model.config
        heads = decoder_heads if decoder_heads is not None else getattr(config, "num_attention_heads", None)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or adapter.hidden_size % heads:
            raise ValueError(
                f"decoder_heads={decoder_heads!r} must be a positive integer dividing the hidden size "
                f"{adapter.hidden_size}."
            )
        self.decoder_heads = heads
        self.decoder_layers = decoder_layers
        # The user's value, or the CPU default until the first batch says which device the loss runs on.
        self.chunk_rows = chunk_rows or default_chunk_rows(adapter.vocab_size)
        self._chunk_rows_given = chunk_rows is not None
        _describe_sentence_embedding(model, adapter.hidden_size)
        # Why this loss cannot pack its encoder calls (None: it can), said once here.
        self.packing_refused = _packing_refusal(packed, self.compile, transformer.auto_model)

        tables = build_vocab_tables(model.tokenizer, adapter.vocab_size)
        self.convention = tables.convention
        self.mask_token_id = tables.mask_token_id
        # Non-persistent buffers: they follow the loss to its device but are not training state.
        self.register_buffer("continues_word", tables.continues_word, persistent=False)
        self.register_buffer("special_ids", tables.special, persistent=False)
        self.register_buffer("replacement_ids", tables.replacement_ids, persistent=False)

        self.head = MLMHead(
            adapter.hidden_size,
            adapter.vocab_size,
            adapter.hidden_act,
            adapter.layer_norm_eps,
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
        )
        self.head_source = self._load_pretrained_head(transformer)
        self.head_warmup_steps = head_warmup_steps
        self.decoder_mask_start = None if decoder_mask_start is None else float(decoder_mask_start)
        self.decoder_mask_steps = decoder_mask_steps
        self.mean_mix_start = float(mean_mix_start)
        self.mean_mix_steps = mean_mix_steps
        self.mean_mix = self.mean_mix_start  # this step's weight; set per step by MaskRatioCurriculum
        self.head_warmup_limit = self._head_warmup_limit(head_warmup_steps, transformer.auto_model)
        self.head_lr_factor_option = head_lr_factor
        self.head_lr_factor = self._head_lr_factor(head_lr_factor, transformer.auto_model)
        # The optimizer step at which the warm-up ended early ("auto"); kept in checkpoints for resume.
        self.head_warmup_ended: int | None = None
        self._training_forwards = 0  # step count when no callback sets current_step
        own_positions = None
        if adapter.position_embeddings is None:
            own_positions = adapter.max_positions or model.max_seq_length or 512
        self.decoder = RetroMAEDecoder(
            hidden_size=adapter.hidden_size,
            heads=heads,
            intermediate_size=getattr(config, "intermediate_size", 4 * adapter.hidden_size),
            layers=decoder_layers,
            activation=adapter.hidden_act,
            dropout=adapter.hidden_dropout,
            eps=adapter.layer_norm_eps,
            own_positions=own_positions,
            attention_dropout=adapter.attention_dropout,  # a BertLayer with the encoder's config, as the paper
        )

    # -- the step -------------------------------------------------------------------------------------

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None = None
    ):
        features = list(sentence_features)
        device = features[0]["input_ids"].device if features and "input_ids" in features[0] else None
        # Sparse lookup gradients: on the CPU (fresh buffers cost page faults there) when training, and not
        # under torch.compile (its graphs do not trace sparse gradients). The tied head always adds a dense
        # d/dW to the same table, which keeps the sum dense.
        sparse = (
            device is not None and device.type == "cpu" and self.training and torch.is_grad_enabled()
        ) and not self.compile
        with (
            attention_kernels(device),
            sparse_lookup_gradients(self.encoder().word_embeddings, sparse) as head_weight,
        ):
            return self._forward(features, head_weight)

    def _forward(
        self, features: list[dict[str, torch.Tensor]], head_weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The step's losses; ``head_weight`` is the word-embedding table [V, D] as the tied head uses it."""
        if len(features) != 1:
            raise ValueError(
                f"RetroMAELoss expects a dataset with one text column, got {len(features)} columns."
            )
        features = features[0]
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]  # [B, L]
        if self.training and torch.is_grad_enabled() and not self.callback_attached:
            logger.warning_once(
                "RetroMAELoss is training without RetroMAETrainingCallback: the decoder's weights will not be "
                "checkpointed, clipped or synchronised across processes. Train with retromae_st.RetroMAETrainer "
                "(it adds the callback), pass callbacks=[RetroMAETrainingCallback(loss)] to the trainer, or use "
                "retromae_st.pretrain()."
            )
        # An attribute read (the tokenizer may change after init); the model may be inside a DDP wrapper.
        _check_padding_side(getattr(_unwrap(self.model), "tokenizer", None))
        training_step = self.training and torch.is_grad_enabled()
        if training_step:
            self._training_forwards += 1
        frozen = training_step and self.encoder_frozen()
        # Frozen: no graph through the encoder at all (cheaper, and DDP then expects no gradients from it).
        encoder_grad = contextlib.nullcontext() if not frozen else torch.no_grad()
        self._frozen_now = frozen
        diagnose = self.diagnostics_due and input_ids.shape[0] >= 2
        seen: list[tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = []  # (group, features, h)
        tables = self.vocab_tables()
        words = word_ids(input_ids, attention_mask, tables)  # [B, L]

        # Every random draw is made here, on the whole batch, so splitting it below changes nothing.
        encoder_ids, encoder_labels = encoder_mask(input_ids, words, tables, self.encoder_mask_ratio)
        if self.decoding == "enhanced":
            decoder_ids = input_ids
            visible = decoder_visibility(words, attention_mask, self.decoder_mask_ratio)  # [B, L, L]
            targets = decoder_labels(input_ids, attention_mask)  # [B, L]
        else:
            decoder_ids, targets = basic_decoder_input(input_ids, words, tables, self.decoder_mask_ratio)
            visible = None

        adapter = self.encoder()
        batch, width = input_ids.shape
        # Packed: one encoder call on the real tokens, unpacked to [B, L, D]; None: one call per group.
        packed_output = self._encode_packed(features, encoder_ids, adapter, encoder_grad)
        # The decoder's content stream in one embedding call for the whole batch ([B, L, D]; each group
        # slices its rows): one [V, D] gradient for the embedding table per step, not one per group.
        content = self._content_stream(adapter, decoder_ids, features.get("token_type_ids"))
        encoder_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (states [n, D], labels [n])
        decoder_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        bow_sum = None
        for group in plan_length_groups(attention_mask, self.max_length_groups, adapter.hidden_size):
            rows, length = group.rows, group.length  # [b] rows, each padded to `length` (l) only
            part = select_rows(features, group, batch, width)

            # Encoder: masked input -> token states [b, l, D] and the sentence embedding h [b, D].
            if packed_output is not None:
                token_states = packed_output["token_embeddings"][rows, :length]
                sentence_embedding = packed_output["sentence_embedding"][rows]
            else:
                with encoder_grad:
                    output = self._maybe_compiled("encoder", self.model)(
                        {**part, "input_ids": encoder_ids[rows, :length]}
                    )
                token_states, sentence_embedding = output["token_embeddings"], output["sentence_embedding"]
            if self.mean_mix > 0:  # the curriculum's blend: what the decoder (and the diagnostics) read
                mask = part["attention_mask"].unsqueeze(-1).to(token_states.dtype)  # [b, l, 1]
                mean = (token_states * mask).sum(1) / mask.sum(1).clamp(min=1)  # [b, D]
                sentence_embedding = (1 - self.mean_mix) * sentence_embedding + self.mean_mix * mean
            if diagnose:
                seen.append((group, part, sentence_embedding))
            encoder_parts.append(labelled_positions(token_states, encoder_labels[rows, :length]))

            # Decoder: h and the unmasked text (enhanced) or a masked copy (basic) -> states [b, l, D].
            if visible is not None:
                group_visible = visible[rows, :length, :length]  # [b, l, l]
                decoder_states = self._enhanced(
                    adapter, content[rows, :length], sentence_embedding, group_visible
                )
            else:
                decoder_states = self._basic(
                    content[rows, :length], sentence_embedding, part["attention_mask"]
                )
            decoder_parts.append(labelled_positions(decoder_states, targets[rows, :length]))

            if self.bow_weight > 0:
                group_bow = self._bow_loss(
                    token_states, part["input_ids"], part["attention_mask"], tables, head_weight
                )
                group_bow = group_bow * group.size  # a mean over the group's rows -> their sum
                bow_sum = group_bow if bow_sum is None else bow_sum + group_bow

        # The shared head over every group's labelled positions, both losses: [N, D] -> a scalar each.
        losses = self._mlm_losses({"encoder_mlm": encoder_parts, "decoder": decoder_parts}, head_weight)
        if bow_sum is not None:
            losses["bow"] = self.bow_weight * bow_sum / batch
        if self.check_finite:
            self._check_finite(losses)
        if frozen and self.head_warmup_steps == "auto":
            self._maybe_end_head_warmup(losses)
        if diagnose:
            self.diagnostics_due = False
            self.last_diagnostics = self._diagnostics(
                adapter, seen, content, visible, targets, losses["decoder"]
            )
        return losses

    def _encode_packed(
        self,
        features: dict[str, torch.Tensor],
        encoder_ids: torch.Tensor,
        adapter: EncoderAdapter,
        encoder_grad: Any,
    ) -> dict[str, torch.Tensor] | None:
        """The model's output for the whole batch from one packed encoder call (token_embeddings [B, L, D],
        zeros at padding; sentence_embedding [B, D]); None when this step runs as length groups."""
        attention_mask = features["attention_mask"]  # [B, L]
        if not self.packed or self.packing_refused is not None or bool(attention_mask.bool().all()):
            return None  # off, not possible, or nothing to gain: no padding
        if self.packed == "auto" and not packing_pays(adapter.hidden_size, attention_mask.device):
            return None
        if not bool(attention_mask.bool().any(dim=1).all()):
            return None  # an empty row has no token to stand for it in the stream
        transformer = _transformer_module(_unwrap(self.model))
        if packable(transformer.auto_model) is not None:  # changed since init (activation checkpointing)
            self.packing_refused = _packing_refusal(self.packed, self.compile, transformer.auto_model)
            return None
        rows = pack_rows(attention_mask, hidden_size=adapter.hidden_size)
        inputs = pack_inputs(features, encoder_ids, rows, adapter.position_offset)  # [1, T] each
        padded = {**features, "input_ids": encoder_ids}  # what the modules after the encoder see
        backend = attention_backend(transformer.auto_model, encoder_ids.device)
        with encoder_grad, packed_call(transformer, rows, padded, inputs, backend):
            return self.model(inputs)

    # -- diagnostics and the head warm-up ---------------------------------------------------------------

    def request_diagnostics(self) -> None:
        """Measure ``h_gain`` and ``embedding_cosine`` in the next forward (into :attr:`last_diagnostics`)."""
        self.diagnostics_due = True

    @torch.no_grad()
    def _diagnostics(
        self,
        adapter: EncoderAdapter,
        seen: list[tuple[Any, dict[str, torch.Tensor], torch.Tensor]],
        content: torch.Tensor,
        visible: torch.Tensor | None,
        targets: torch.Tensor,
        decoder_loss: torch.Tensor,
    ) -> dict[str, float]:
        """The decoder loss again, each row reading another row's h (same masks, same targets), minus the
        true one; and the mean pairwise cosine of h. ``content``: the step's content stream [B, L, D];
        ``visible``: the enhanced decoder's visibility [B, L, L] (None in basic decoding)."""
        first = seen[0][2]
        batch = targets.shape[0]
        h = torch.empty(batch, first.shape[-1], dtype=first.dtype, device=first.device)  # [B, D]
        for group, _, sentence_embedding in seen:
            h[group.rows] = sentence_embedding.detach()
        swapped = h[derangement(batch, h.device)]  # row i reads row i+1's h
        parts = []
        # The decoder's dropout draws from the RNG: fork it, so that measuring changes nothing in training
        # (the same run logged every 5 or every 50 steps draws the same masks).
        devices = [h.device.index or 0] if h.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for group, part, _ in seen:
                rows, length = group.rows, group.length
                if visible is not None:
                    group_visible = visible[rows, :length, :length]
                    states = self._enhanced(adapter, content[rows, :length], swapped[rows], group_visible)
                else:
                    states = self._basic(content[rows, :length], swapped[rows], part["attention_mask"])
                parts.append(labelled_positions(states, targets[rows, :length]))
        shuffled = self._mlm_loss(parts, adapter.word_embeddings.weight)
        return {
            H_GAIN: round(float(shuffled - decoder_loss.detach()), 4),  # 4 digits, as the trainer's own logs
            EMBEDDING_COSINE: round(float(mean_pairwise_cosine(h)), 4),
        }

    def _head_warmup_limit(self, option: int | str, encoder: nn.Module) -> int:
        """How many first steps may keep the encoder frozen (``"auto"``: see the class docstring)."""
        if option != "auto":
            return int(option)
        if self.head_source is not None:
            return 0
        if looks_untrained(encoder):
            # A from-scratch encoder has nothing a fresh head could spoil: train everything from step 1.
            return 0
        logger.info(
            "RetroMAE: the MLM head is fresh and the encoder pretrained, so the head and decoder train alone "
            "(encoder frozen) for up to %d steps (40%% of the run at most), until both losses fall below "
            "ln(V) / 2 = %.2f "
            "(head_warmup_steps='auto'; set a number, or 0 to turn it off).",
            self.AUTO_HEAD_WARMUP_STEPS,
            math.log(self.head.bias.numel()) / 2,
        )
        return self.AUTO_HEAD_WARMUP_STEPS

    def _head_lr_factor(self, option: float | str, encoder: nn.Module) -> float:
        """The learning-rate multiple of the loss's own weights (``"auto"``: see the class docstring)."""
        if option != "auto":
            return float(option)
        if self.head_source is not None or looks_untrained(encoder):
            return 1.0
        return self.AUTO_HEAD_LR_FACTOR

    def fit_head_warmup(self, max_steps: int) -> None:
        """``"auto"``: keep the warm-up within :attr:`AUTO_HEAD_WARMUP_SHARE` of a run of ``max_steps`` steps
        (the training callback calls this), so that a short run still trains its encoder."""
        if self.head_warmup_steps == "auto" and max_steps > 0 and self.head_warmup_limit > 0:
            self.head_warmup_limit = min(
                self.AUTO_HEAD_WARMUP_STEPS, max(1, math.ceil(self.AUTO_HEAD_WARMUP_SHARE * max_steps))
            )

    def encoder_frozen(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (1-based; default: the current one) is in the head warm-up."""
        if step is None:
            step = self.current_step if self.current_step is not None else self._training_forwards
        if self.head_warmup_ended is not None and step > self.head_warmup_ended:
            return False
        return 1 <= step <= self.head_warmup_limit

    def _maybe_end_head_warmup(self, losses: dict[str, torch.Tensor]) -> None:
        """``"auto"``: end the warm-up once the head predicts far better than uniform guessing on both
        objectives (below ln(V) / 2: merely beating ln(V) is reached within a few steps, by a head whose
        gradients still hurt a pretrained encoder, as measured)."""
        threshold = self.AUTO_HEAD_WARMUP_END * math.log(self.head.bias.numel())
        encoder_mlm, decoder = float(losses["encoder_mlm"].detach()), float(losses["decoder"].detach())
        if encoder_mlm < threshold and decoder < threshold:
            step = self.current_step if self.current_step is not None else self._training_forwards
            self.head_warmup_ended = step
            logger.info(
                "RetroMAE: head warm-up done at step %d (encoder MLM %.2f, decoder %.2f < ln(V) / 2 = %.2f); "
                "the encoder trains from the next step.",
                step,
                encoder_mlm,
                decoder,
                threshold,
            )

    def _load_pretrained_head(self, transformer: Transformer) -> str | None:
        """Start the shared MLM head from the checkpoint's own; returns where it came from, or None."""
        found, tensors, where = _checkpoint_head(transformer, self.head.state_dict())
        if found is None:
            if tensors:
                reason = f"the head in {where} does not fit this model's vocabulary or hidden size"
            else:
                reason = f"{where} holds no masked-LM head" if Path(where).exists() else where
            logger.info("RetroMAE: the shared MLM head starts fresh (BERT initialisation): %s.", reason)
            return None
        state, layout = found
        with torch.no_grad():
            for name, tensor in self.head.state_dict().items():
                tensor.copy_(state[name])
        logger.info("RetroMAE: the shared MLM head starts from the %s-style head in %s.", layout, where)
        return where

    def _chunk_rows_for(self, device: torch.device) -> int:
        """``chunk_rows`` as given, else the default for ``device`` (larger on CUDA: see ``heads``)."""
        if self._chunk_rows_given:
            return self.chunk_rows
        return default_chunk_rows(self.head.bias.numel(), device.type)

    def _mlm_loss(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        """The shared head's mean cross-entropy over the labelled positions of every group."""
        return self._mlm_losses({"mlm": parts}, embedding_weight)["mlm"]

    def _mlm_losses(
        self, parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], embedding_weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The shared head's mean cross-entropy per named loss, each over its own parts' labelled positions.

        On the CPU in one vocabulary-wide call (one [V, D] gradient buffer a step instead of one per loss
        and their sum, ~0.1 s a step at BERT-base: ``benchmarks/README.md``); on a GPU one call per loss,
        where fresh buffers are cheap and the joint call would synchronise the device in backward."""
        merged = [join_rows(group) for group in parts.values()]  # one (states [N, D], labels [N]) per loss
        device = merged[0][0].device
        values = self.head.losses(
            merged, embedding_weight, self._chunk_rows_for(device), joint=device.type == "cpu"
        )
        return dict(zip(parts, values))

    def _enhanced(
        self,
        adapter: EncoderAdapter,
        content: torch.Tensor,
        sentence_embedding: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """Two-stream decoding: the query stream (h + position) attends to the content stream [B, L, D]
        under the per-position visibility [B, L, L]; returns the query stream's states [B, L, D]."""
        length = content.shape[1]
        content = self._with_h(content, sentence_embedding)  # [B, L, D]
        if self.query_stream_form == "layernorm":
            query = adapter.query_stream(sentence_embedding, length, self.decoder.position_embeddings)
        else:
            query = adapter.plain_query_stream(sentence_embedding, length, self.decoder.position_embeddings)
        return self._maybe_compiled("enhanced", self.decoder.enhanced)(query, content, visible)

    def _basic(
        self, content: torch.Tensor, sentence_embedding: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Basic decoding: self-attention over h and the masked copy's content stream [B, L, D]; states
        [B, L, D]."""
        hidden = self._with_h(content, sentence_embedding)
        return self._maybe_compiled("basic", self.decoder.basic)(hidden, attention_mask)

    def _content_stream(
        self, adapter: EncoderAdapter, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The encoder's embedding module on the decoder's ids (the text, or its masked copy in basic
        decoding): [B, L] -> [B, L, D]."""
        with torch.no_grad() if self._frozen_now else contextlib.nullcontext():
            return adapter.content_stream(input_ids, token_type_ids)

    def _with_h(self, content: torch.Tensor, sentence_embedding: torch.Tensor) -> torch.Tensor:
        """The content stream [B, L, D] with h in position 0 (and, for rotary encoders, the decoder's own
        positions added)."""
        if self.decoder.position_embeddings is not None:
            content = content + self.decoder.position_embeddings.weight[: content.shape[1]]
        return torch.cat([sentence_embedding.unsqueeze(1).to(content.dtype), content[:, 1:]], dim=1)

    def _bow_loss(
        self,
        token_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tables: VocabTables,
        head_weight: torch.Tensor,
    ) -> torch.Tensor:
        """DupMAE: max-pool the encoder's MLM logits over positions 1..L-1 and match the text's bag of words."""
        valid = attention_mask.bool().clone()
        valid[:, 0] = False
        batch = token_states.shape[0]
        chunk_positions = max(1, self._chunk_rows_for(token_states.device) // max(batch, 1))
        pooled = ChunkedMaxPooledLogits.apply(
            self.head.transform(token_states),
            head_weight,
            self.head.bias,
            valid,
            chunk_positions,
        )  # [B, V]
        word_tokens = attention_mask.bool() & ~tables.special[input_ids]
        return bag_of_words_loss(pooled, input_ids, word_tokens)

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            if not torch.isfinite(value.detach()).all():
                where = f"at step {self.current_step}" if self.current_step is not None else "during training"
                raise NonFiniteLossError(
                    f"the RetroMAE loss component {name!r} became {value.item()} {where}; training stopped "
                    "before applying it, so the last checkpoint is intact. Usual causes: a learning rate that "
                    "is too high (lower it or add warmup), fp16 overflow (use bf16 or fp32), or corrupt input."
                )

    # -- helpers ----------------------------------------------------------------------------------------

    def _maybe_compiled(self, name: str, function: Any) -> Any:
        """``function`` itself, or (``compile=True``) its ``torch.compile`` form, built once per callable
        (a model the trainer replaced or wrapped is compiled anew; one it compiled is used as it is)."""
        if not self.compile or hasattr(function, "_orig_mod"):
            return function
        cached = self._compiled.get(name)
        if cached is None or cached[0] != function:  # bound methods compare by function and instance
            cached = self._compiled[name] = (function, torch.compile(function))
        return cached[1]

    def encoder(self) -> EncoderAdapter:
        """The encoder's embedding pieces, found through any DDP / compile wrapper around the model."""
        return adapt_encoder(_transformer_module(_unwrap(self.model)).auto_model)

    def pooling_mode(self) -> str | None:
        """How the model pools the sentence embedding the decoder reads ("cls", "mean", ...; None: no Pooling)."""
        pooling = next((m for m in _unwrap(self.model) if isinstance(m, Pooling)), None)
        if pooling is None:
            return None
        mode = pooling.pooling_mode
        return mode if isinstance(mode, str) else "+".join(mode)

    def vocab_tables(self) -> VocabTables:
        return VocabTables(
            self.continues_word, self.special_ids, self.replacement_ids, self.mask_token_id, self.convention
        )

    def own_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the loss owns (decoder, head transform and bias), not the model's."""
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("model.")]

    def own_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.own_named_parameters()]

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.state_dict().items() if not name.startswith("model.")}

    def save_own_weights(self, folder: str | os.PathLike) -> Path:
        """Write the loss's own weights to ``folder/retromae_loss.safetensors`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOSS_WEIGHTS_NAME
        tmp = folder / f".{LOSS_WEIGHTS_NAME}.tmp-{os.getpid()}"
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.own_state_dict().items()}
        metadata = {"config": json.dumps(self.get_config_dict())}
        if self.head_warmup_ended is not None:  # so that a resumed run does not freeze the encoder again
            metadata["head_warmup_ended"] = str(self.head_warmup_ended)
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_own_weights(self, folder_or_file: str | os.PathLike) -> None:
        """Restore weights written by :meth:`save_own_weights` (strict: names and shapes must match)."""
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / LOSS_WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint has no RetroMAE decoder weights, so pretraining cannot resume "
                "exactly. Start a fresh run, or resume from a checkpoint written with RetroMAETrainingCallback."
            )
        state = load_file(str(path), device=str(self.head.bias.device))
        expected = self.own_state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError(
                f"{path} does not match this RetroMAELoss (different decoder layers, heads or vocabulary); "
                "resume with the options the checkpoint was written with."
            )
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])
        with safe_open(str(path), framework="pt") as reader:
            ended = (reader.metadata() or {}).get("head_warmup_ended")
        self.head_warmup_ended = int(ended) if ended is not None else None

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "encoder_mask_ratio": self.encoder_mask_ratio,
            "decoder_mask_ratio": self.decoder_mask_ratio,
            "decoding": self.decoding,
            "decoder_layers": self.decoder_layers,
            "decoder_heads": self.decoder_heads,
            "bow_weight": self.bow_weight,
            "query_stream": self.query_stream_form,
            "max_length_groups": self.max_length_groups,
            "head_warmup_steps": self.head_warmup_steps,
            "head_lr_factor": self.head_lr_factor_option,
            "decoder_mask_start": self.decoder_mask_start,
            "decoder_mask_steps": self.decoder_mask_steps,
            "mean_mix_start": self.mean_mix_start,
            "mean_mix_steps": self.mean_mix_steps,
            "compile": self.compile,
            "packed": self.packed,
        }

    @property
    def citation(self) -> str:
        return RETROMAE_CITATION


def check_loss_options(
    *,
    encoder_mask_ratio: float = 0.3,
    decoder_mask_ratio: float = 0.5,
    decoding: str = "enhanced",
    decoder_layers: int = 1,
    decoder_heads: int | None = None,
    bow_weight: float = 0.0,
    query_stream: str = "layernorm",
    chunk_rows: int | None = None,
    max_length_groups: int = RetroMAELoss.DEFAULT_LENGTH_GROUPS,
    check_finite: bool = True,
    head_warmup_steps: int | str = "auto",
    head_lr_factor: float | str = "auto",
    decoder_mask_start: float | None = None,
    decoder_mask_steps: int = 0,
    mean_mix_start: float = 0.0,
    mean_mix_steps: int = 0,
    compile: bool = False,
    packed: bool | str = "auto",
    hidden_size: int | None = None,
) -> None:
    """Check :class:`RetroMAELoss`'s options without a model, so callers can refuse bad ones before
    reading and tokenising a corpus (the loss runs the same checks). ``hidden_size``, when known, also
    checks that ``decoder_heads`` divides it.

    Raises:
        UserInputError: naming the option, its value and what it must be.
    """
    _check_ratio("encoder_mask_ratio", encoder_mask_ratio)
    _check_ratio("decoder_mask_ratio", decoder_mask_ratio)
    if decoding not in ("enhanced", "basic"):
        raise UserInputError(f"decoding={decoding!r} is not one of 'enhanced', 'basic'.")
    if query_stream not in ("layernorm", "plain"):
        raise UserInputError(f"query_stream={query_stream!r} is not one of 'layernorm', 'plain'.")
    if not _positive_int(decoder_layers):
        raise UserInputError(f"decoder_layers={decoder_layers!r} must be an integer >= 1.")
    if decoder_heads is not None and (
        not _positive_int(decoder_heads) or (hidden_size is not None and hidden_size % decoder_heads)
    ):
        size = f" {hidden_size}" if hidden_size is not None else ""
        raise UserInputError(
            f"decoder_heads={decoder_heads!r} must be a positive integer dividing the hidden size{size}."
        )
    if (
        isinstance(bow_weight, bool)
        or not isinstance(bow_weight, (int, float))
        or not math.isfinite(bow_weight)
        or bow_weight < 0
    ):
        raise UserInputError(f"bow_weight={bow_weight!r} must be a finite number >= 0 (0 turns DupMAE off).")
    if chunk_rows is not None and not _positive_int(chunk_rows):
        raise UserInputError(f"chunk_rows={chunk_rows!r} must be an integer >= 1.")
    if not _positive_int(max_length_groups):
        raise UserInputError(
            f"max_length_groups={max_length_groups!r} must be an integer >= 1 (1: no split)."
        )
    if head_warmup_steps != "auto" and (
        isinstance(head_warmup_steps, bool) or not isinstance(head_warmup_steps, int) or head_warmup_steps < 0
    ):
        raise UserInputError(
            f"head_warmup_steps={head_warmup_steps!r} must be 'auto' or an integer >= 0 (0: no warm-up)."
        )
    if head_lr_factor != "auto" and (
        isinstance(head_lr_factor, bool)
        or not isinstance(head_lr_factor, (int, float))
        or not math.isfinite(head_lr_factor)
        or head_lr_factor <= 0
    ):
        raise UserInputError(
            f"head_lr_factor={head_lr_factor!r} must be 'auto' or a number > 0 (1: the same learning rate)."
        )
    if decoder_mask_start is not None and (
        isinstance(decoder_mask_start, bool)
        or not isinstance(decoder_mask_start, (int, float))
        or not 0.0 < decoder_mask_start <= 1.0
    ):
        raise UserInputError(
            f"decoder_mask_start={decoder_mask_start!r} must be a number in (0, 1] (1: the decoder sees only h)."
        )
    if (
        isinstance(decoder_mask_steps, bool)
        or not isinstance(decoder_mask_steps, int)
        or decoder_mask_steps < 0
    ):
        raise UserInputError(f"decoder_mask_steps={decoder_mask_steps!r} must be an integer >= 0.")
    if (
        isinstance(mean_mix_start, bool)
        or not isinstance(mean_mix_start, (int, float))
        or not 0.0 <= mean_mix_start <= 1.0
    ):
        raise UserInputError(f"mean_mix_start={mean_mix_start!r} must be a number in [0, 1] (0: off).")
    if isinstance(mean_mix_steps, bool) or not isinstance(mean_mix_steps, int) or mean_mix_steps < 0:
        raise UserInputError(f"mean_mix_steps={mean_mix_steps!r} must be an integer >= 0.")
    if not isinstance(compile, bool):
        raise UserInputError(f"compile={compile!r} must be true or false.")
    if not isinstance(packed, bool) and packed != "auto":
        raise UserInputError(f"packed={packed!r} must be true, false or 'auto'.")


def _packing_refusal(packed: bool | str, compiled: bool, encoder: nn.Module) -> str | None:
    """Why the encoder calls cannot run packed (None: they can, or packing is off); warns for packed=True."""
    if packed is False:
        return None
    reason = "compile=True compiles the padded encoder call" if compiled else packable(encoder)
    if reason is not None:
        log = logger.warning if packed is True else logger.info
        log("RetroMAE: packed=%r, but the encoder runs as length groups: %s.", packed, reason)
    return reason


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise UserInputError(f"{name}={value!r} must be a number strictly between 0 and 1.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The SentenceTransformer inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_pretrained_head(model: SentenceTransformer) -> bool:
    """Whether :class:`RetroMAELoss` on ``model`` would start its shared MLM head from the checkpoint's own
    masked-LM head (``--lr auto`` continues such a model at the paper's rate, one without at half of it).

    Reads only the head's tensors from the checkpoint's safetensors files, as the loss does.
    """
    transformer = _transformer_module(model)
    adapter = adapt_encoder(transformer.auto_model)
    with torch.device("meta"):  # only the shapes are compared: no vocabulary-sized weights allocated
        expected = MLMHead(adapter.hidden_size, adapter.vocab_size).state_dict()
    return _checkpoint_head(transformer, expected)[0] is not None


def _checkpoint_head(
    transformer: Transformer, expected: dict[str, torch.Tensor]
) -> tuple[tuple[dict[str, torch.Tensor], str] | None, dict[str, torch.Tensor], str]:
    """(the head state and layout found in the encoder's checkpoint or None, the head tensors read, where)."""
    source = getattr(transformer.auto_model, "name_or_path", None)
    tensors, where = checkpoint_tensors(source, pretrained_head_names())
    return (pretrained_head_state(tensors, expected) if tensors else None), tensors, where


def _transformer_module(model: nn.Module) -> Transformer:
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if not isinstance(first, Transformer):
        raise ValueError(
            f"RetroMAELoss needs a SentenceTransformer whose first module is a Transformer, got "
            f"{type(first).__name__ if first is not None else type(model).__name__}."
        )
    return first


def _check_padding_side(tokenizer: Any) -> None:
    """The masking and the decoder's targets find the first and last real token by position: right padding."""
    side = getattr(tokenizer, "padding_side", "right")
    if side != "right":
        raise UserInputError(
            f"RetroMAELoss needs right padding, but the tokenizer pads on the {side} "
            f'(tokenizer.padding_side={side!r}): set model.tokenizer.padding_side = "right" before '
            "building the loss."
        )


def _describe_sentence_embedding(model: SentenceTransformer, hidden_size: int) -> None:
    """Say (INFO) which vector the decoder reads as h; refuse one the decoder cannot take (another size)."""
    modules = list(model)
    pooling_at = next((i for i, module in enumerate(modules) if isinstance(module, Pooling)), None)
    dimension = model.get_embedding_dimension()
    if dimension is not None and dimension != hidden_size:
        raise UserInputError(
            f"RetroMAE's decoder reads the sentence embedding in place of a token embedding, so it must have "
            f"the hidden size {hidden_size}; this model's is {dimension} (a Dense module after Pooling?). "
            "Pretrain the model without the modules that change the size, and add them for stage 2."
        )
    if pooling_at is None:
        return
    mode = modules[pooling_at].pooling_mode
    mode = mode if isinstance(mode, str) else "+".join(mode)
    after = [type(module).__name__ for module in modules[pooling_at + 1 :]]
    if mode != "cls" or after:
        logger.info(
            "RetroMAE: the decoder reads this model's sentence embedding as h: %s pooling%s, the vector that "
            "encode() returns and stage 2 fine-tunes (the paper reads the [CLS] vector; its pooling is kept).",
            mode,
            f" then {', '.join(after)}" if after else "",
        )

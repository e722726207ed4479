"""RetroMAELoss: RetroMAE pretraining as a Sentence-Transformers loss (SPEC sections 1-6)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from torch import nn

from retromae_st.errors import NonFiniteLossError
from retromae_st.pretraining.decoder import RetroMAEDecoder
from retromae_st.pretraining.encoders import EncoderAdapter, adapt_encoder
from retromae_st.pretraining.heads import (
    ChunkedMaxPooledLogits,
    MLMHead,
    bag_of_words_loss,
    default_chunk_rows,
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


class RetroMAELoss(nn.Module):
    DEFAULT_LENGTH_GROUPS = 4

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
        :func:`retromae_st.pretraining.training.pretrain`), which handles the loss's weights too. The model itself
        stays a stock ``Transformer`` + ``Pooling('cls')`` Sentence-Transformer.

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
                logits near 128 MiB.
            max_length_groups: run each batch as at most this many sub-batches of rows of similar
                length, each padded only to its own longest row (:mod:`retromae_st.pretraining.unpadding`). The loss
                and its gradients are those of the whole batch (every term is per row); only the compute
                spent on padding goes. 1 runs the batch as it comes.
            check_finite: raise :class:`NonFiniteLossError` naming the component when a loss is NaN/inf.

        References:
            - RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked Auto-Encoder,
              Xiao et al., EMNLP 2022, https://arxiv.org/abs/2205.12035
            - RetroMAE v2 / DupMAE: https://arxiv.org/abs/2211.08769
            - Reference code: https://github.com/staoxiao/RetroMAE and FlagOpen/FlagEmbedding

        Requirements:
            1. A tokenizer with a mask token; texts tokenised with special tokens ([CLS] ... [SEP]).
            2. CLS pooling (the decoder reads position 0); stage 2 fine-tunes the same vector.
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
        _check_ratio("encoder_mask_ratio", encoder_mask_ratio)
        _check_ratio("decoder_mask_ratio", decoder_mask_ratio)
        if decoding not in ("enhanced", "basic"):
            raise ValueError(f"decoding={decoding!r} is not one of 'enhanced', 'basic'.")
        if query_stream not in ("layernorm", "plain"):
            raise ValueError(f"query_stream={query_stream!r} is not one of 'layernorm', 'plain'.")
        if isinstance(decoder_layers, bool) or not isinstance(decoder_layers, int) or decoder_layers < 1:
            raise ValueError(f"decoder_layers={decoder_layers!r} must be an integer >= 1.")
        if not isinstance(bow_weight, (int, float)) or not math.isfinite(bow_weight) or bow_weight < 0:
            raise ValueError(f"bow_weight={bow_weight!r} must be a finite number >= 0 (0 turns DupMAE off).")
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows={chunk_rows!r} must be an integer >= 1.")
        if (
            isinstance(max_length_groups, bool)
            or not isinstance(max_length_groups, int)
            or max_length_groups < 1
        ):
            raise ValueError(
                f"max_length_groups={max_length_groups!r} must be an integer >= 1 (1: no split)."
            )

        self.model = model
        self.encoder_mask_ratio = float(encoder_mask_ratio)
        self.decoder_mask_ratio = float(decoder_mask_ratio)
        self.decoding = decoding
        self.bow_weight = float(bow_weight)
        self.query_stream_form = query_stream
        self.max_length_groups = max_length_groups
        self.check_finite = check_finite
        self.current_step: int | None = None  # set by the training callback, for error messages
        self.callback_attached = False

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
        self.chunk_rows = chunk_rows or default_chunk_rows(adapter.vocab_size)
        _warn_if_not_cls(model)

        tables = build_vocab_tables(model.tokenizer, adapter.vocab_size)
        self.convention = tables.convention
        self.mask_token_id = tables.mask_token_id
        # Non-persistent buffers: they follow the loss to its device but are not training state.
        self.register_buffer("continues_word", tables.continues_word, persistent=False)
        self.register_buffer("special_ids", tables.special, persistent=False)
        self.register_buffer("replacement_ids", tables.replacement_ids, persistent=False)

        self.head = MLMHead(
            adapter.hidden_size, adapter.vocab_size, adapter.hidden_act, adapter.layer_norm_eps
        )
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
        if len(features) != 1:
            raise ValueError(
                f"RetroMAELoss expects a dataset with one text column, got {len(features)} columns."
            )
        features = features[0]
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]  # [B, L]
        if self.training and torch.is_grad_enabled() and not self.callback_attached:
            logger.warning_once(
                "RetroMAELoss is training without RetroMAETrainingCallback: the decoder's weights will not be "
                "checkpointed, clipped or synchronised across processes. Pass "
                "callbacks=[RetroMAETrainingCallback(loss)] to the trainer, or use retromae_st.pretrain()."
            )
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
        encoder_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (states [n, D], labels [n])
        decoder_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        bow_sum = None
        for group in plan_length_groups(attention_mask, self.max_length_groups, adapter.hidden_size):
            rows, length = group.rows, group.length  # [b] rows, each padded to `length` (l) only
            part = select_rows(features, group, batch, width)

            # Encoder: masked input -> token states [b, l, D] and the sentence embedding h [b, D].
            output = self.model({**part, "input_ids": encoder_ids[rows, :length]})
            token_states, sentence_embedding = output["token_embeddings"], output["sentence_embedding"]
            encoder_parts.append(labelled_positions(token_states, encoder_labels[rows, :length]))

            # Decoder: h and the unmasked text (enhanced) or a masked copy (basic) -> states [b, l, D].
            if visible is not None:
                group_visible = visible[rows, :length, :length]  # [b, l, l]
                decoder_states = self._enhanced(adapter, part, sentence_embedding, group_visible)
            else:
                decoder_states = self._basic(adapter, part, sentence_embedding, decoder_ids[rows, :length])
            decoder_parts.append(labelled_positions(decoder_states, targets[rows, :length]))

            if self.bow_weight > 0:
                group_bow = self._bow_loss(token_states, part["input_ids"], part["attention_mask"], tables)
                group_bow = group_bow * group.size  # a mean over the group's rows -> their sum
                bow_sum = group_bow if bow_sum is None else bow_sum + group_bow

        # One vocabulary-wide pass per head over every group's labelled positions: [N, D] -> scalar.
        embedding_weight = adapter.word_embeddings.weight  # [V, D], tied vocab projection
        losses = {
            "encoder_mlm": self._mlm_loss(encoder_parts, embedding_weight),
            "decoder": self._mlm_loss(decoder_parts, embedding_weight),
        }
        if bow_sum is not None:
            losses["bow"] = self.bow_weight * bow_sum / batch
        if self.check_finite:
            self._check_finite(losses)
        return losses

    def _mlm_loss(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        """The shared head's mean cross-entropy over the labelled positions of every group."""
        states = parts[0][0] if len(parts) == 1 else torch.cat([states for states, _ in parts])  # [N, D]
        labels = parts[0][1] if len(parts) == 1 else torch.cat([labels for _, labels in parts])  # [N]
        return self.head.loss(states, labels, embedding_weight, self.chunk_rows)

    def _enhanced(
        self,
        adapter: EncoderAdapter,
        features: dict[str, torch.Tensor],
        sentence_embedding: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """Two-stream decoding: the query stream (h + position) attends to the content stream under the
        per-position visibility [B, L, L]; returns the query stream's states [B, L, D]."""
        input_ids = features["input_ids"]
        length = input_ids.shape[1]
        content = self._embed(
            adapter, input_ids, features.get("token_type_ids"), sentence_embedding
        )  # [B, L, D]
        if self.query_stream_form == "layernorm":
            query = adapter.query_stream(sentence_embedding, length, self.decoder.position_embeddings)
        else:
            query = adapter.plain_query_stream(sentence_embedding, length, self.decoder.position_embeddings)
        return self.decoder.enhanced(query, content, visible)

    def _basic(
        self,
        adapter: EncoderAdapter,
        features: dict[str, torch.Tensor],
        sentence_embedding: torch.Tensor,
        masked_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Basic decoding: self-attention over h and a masked copy of the text; states [B, L, D]."""
        hidden = self._embed(adapter, masked_ids, features.get("token_type_ids"), sentence_embedding)
        return self.decoder.basic(hidden, features["attention_mask"])

    def _embed(
        self,
        adapter: EncoderAdapter,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        sentence_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """The content stream: the encoder's embedding module on ``input_ids``, h in position 0."""
        content = adapter.content_stream(input_ids, token_type_ids)  # [B, L, D]
        if self.decoder.position_embeddings is not None:  # rotary encoders: add the decoder's positions
            content = content + self.decoder.position_embeddings.weight[: input_ids.shape[1]]
        return torch.cat([sentence_embedding.unsqueeze(1).to(content.dtype), content[:, 1:]], dim=1)

    def _bow_loss(
        self,
        token_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tables: VocabTables,
    ) -> torch.Tensor:
        """DupMAE: max-pool the encoder's MLM logits over positions 1..L-1 and match the text's bag of words."""
        valid = attention_mask.bool().clone()
        valid[:, 0] = False
        batch = token_states.shape[0]
        chunk_positions = max(1, (self.chunk_rows * 1) // max(batch, 1))
        pooled = ChunkedMaxPooledLogits.apply(
            self.head.transform(token_states),
            self.encoder().word_embeddings.weight,
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

    def encoder(self) -> EncoderAdapter:
        """The encoder's embedding pieces, found through any DDP / compile wrapper around the model."""
        return adapt_encoder(_transformer_module(_unwrap(self.model)).auto_model)

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
        save_file(state, str(tmp), metadata={"config": json.dumps(self.get_config_dict())})
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
        }

    @property
    def citation(self) -> str:
        return RETROMAE_CITATION


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a number strictly between 0 and 1.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The SentenceTransformer inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _transformer_module(model: nn.Module) -> Transformer:
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if not isinstance(first, Transformer):
        raise ValueError(
            f"RetroMAELoss needs a SentenceTransformer whose first module is a Transformer, got "
            f"{type(first).__name__ if first is not None else type(model).__name__}."
        )
    return first


def _warn_if_not_cls(model: SentenceTransformer) -> None:
    pooling = next((module for module in model if isinstance(module, Pooling)), None)
    if pooling is not None and pooling.pooling_mode != "cls":
        logger.warning(
            "RetroMAE trains the [CLS] vector, but this model pools with %r: the decoder will read that "
            "pooled vector instead. Build the model with pooling='cls' to follow the paper.",
            pooling.pooling_mode,
        )

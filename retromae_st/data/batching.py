"""Batching tokenised windows for the Sentence-Transformers trainer: ``data_collator=PaddingCollator(tokenizer)``
with ``args.batch_sampler=LengthGroupedBatchSampler``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import PreTrainedTokenizerBase

from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


@dataclass
class PaddingCollator:
    """Pads tokenised windows into a batch for the Sentence-Transformers trainer (``data_collator=``).

    Takes rows with ``"input_ids"`` (other keys are ignored) and returns
    ``{f"{column}_input_ids", f"{column}_attention_mask"}`` (and ``f"{column}_token_type_ids"``, all
    zero, when the tokenizer uses them) as LongTensors padded to the longest row, on the tokenizer's
    padding side. The trainer turns these keys into one features dict for the loss.
    """

    tokenizer: PreTrainedTokenizerBase
    column: str = "text"
    pad_to_multiple_of: int | None = None
    # Read by the trainer to build its batch sampler; windows have no labels.
    valid_label_columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise UserInputError(
                f"{type(self.tokenizer).__name__} has no padding token: set tokenizer.pad_token."
            )
        self.token_type_ids = "token_type_ids" in self.tokenizer.model_input_names

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [row["input_ids"] for row in rows]
        lengths = torch.tensor([len(ids) for ids in sequences])
        width = int(lengths.max()) if len(sequences) else 0
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        positions = torch.arange(width).unsqueeze(0)
        if self.tokenizer.padding_side == "left":
            mask = positions >= (width - lengths).unsqueeze(1)
        else:
            mask = positions < lengths.unsqueeze(1)
        if sequences and isinstance(sequences[0], torch.Tensor):
            flat = torch.cat(sequences).long()
        else:
            # np.fromiter over a chain runs in C: ~10x faster than building a Python list of the tokens.
            total = int(lengths.sum())
            flat = torch.from_numpy(
                np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=total)
            )
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        # Boolean-mask assignment fills the rows in order: one vectorised op for the whole batch.
        input_ids[mask] = flat
        batch = {f"{self.column}_input_ids": input_ids, f"{self.column}_attention_mask": mask.long()}
        if self.token_type_ids:
            batch[f"{self.column}_token_type_ids"] = torch.zeros_like(input_ids)
        return batch


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of windows of similar length, so that little of each batch is padding.

    Each epoch: shuffle all indices, cut them into mega-batches of ``mega_batch_factor * batch_size``,
    sort each mega-batch by length, cut it into batches, and shuffle the order of the batches; the batch
    holding the longest window goes first, so that a batch too large for memory fails at the first step.
    The order depends only on ``seed`` and the epoch (the trainer calls ``set_epoch``).

    Pass the class as ``SentenceTransformerTrainingArguments(batch_sampler=LengthGroupedBatchSampler)``.
    Lengths come from the ``"length"`` column (made by :func:`tokenize_corpus`), else from ``"input_ids"``.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        if mega_batch_factor < 1:
            raise UserInputError(f"mega_batch_factor={mega_batch_factor}: use 1 or more.")
        self.mega_batch_factor = mega_batch_factor
        self.lengths = _lengths(dataset)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator if self.generator is not None else torch.Generator()
        generator.manual_seed((self.seed or 0) + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        mega = self.batch_size * self.mega_batch_factor
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            group = order[start : start + mega]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # mega-batches are whole multiples of batch_size, so only the last can be short
        if not batches:
            return
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(shuffled)), key=lambda i: self.lengths[shuffled[i]].max())
        shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        for batch in shuffled:
            yield batch.tolist()


def _lengths(dataset: datasets.Dataset) -> np.ndarray:
    if "length" in dataset.column_names:
        return np.asarray(dataset.with_format("arrow")["length"].to_numpy(), dtype=np.int64)
    if "input_ids" in dataset.column_names:
        return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy().astype(np.int64)
    raise UserInputError(
        f"LengthGroupedBatchSampler needs a 'length' or 'input_ids' column; the dataset has {dataset.column_names}."
    )

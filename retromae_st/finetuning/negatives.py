"""Hard-negative mining for stage 2 (``sentence_transformers.util.mine_hard_negatives`` with our defaults)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from datasets import Dataset
from sentence_transformers import SentenceTransformer

from retromae_st.errors import UserInputError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Hard negatives
# --------------------------------------------------------------------------------------------------


def mine_negatives(
    pairs: Dataset,
    model: SentenceTransformer,
    num_negatives: int = 1,
    *,
    corpus: Sequence[str] | None = None,
    range_min: int = 0,
    range_max: int | None = 50,
    relative_margin: float | None = 0.05,
    max_score: float | None = None,
    sampling_strategy: Literal["top", "random"] = "top",
    batch_size: int = 64,
    use_faiss: bool = True,
    verbose: bool = True,
) -> Dataset:
    """Add ``negative_1`` ... ``negative_n`` columns of hard negatives mined with ``model``.

    A thin wrapper around ``sentence_transformers.util.mine_hard_negatives`` (FAISS search) whose defaults
    follow NV-Retriever's best setting, *TopK-PercPos*: take the top-ranked candidates, but only those whose
    similarity to the query is at least 5 % below the positive's (``relative_margin=0.05``). The margin is
    what keeps unlabeled positives (near-duplicates of the positive, common in real corpora) out of the
    negatives; raise ``range_min`` to skip the very top as well when the labels are known to be sparse.
    Candidates are the positives of the other pairs plus ``corpus``. Rows for which not enough negatives
    pass the filters are dropped by the library (it reports how many).
    """
    from sentence_transformers.util import mine_hard_negatives

    if num_negatives < 1:
        raise UserInputError(f"num_negatives={num_negatives}: mine at least one negative.")
    missing = {"anchor", "positive"} - set(pairs.column_names)
    if missing:
        raise UserInputError(
            f"the pairs lack the columns {sorted(missing)}: pass the output of load_pairs()."
        )
    candidates = len(set(pairs["positive"]) | set(corpus or ()))
    if range_max is not None:
        range_max = min(range_max, candidates - 1)
    if range_max is not None and num_negatives > range_max - range_min:
        raise UserInputError(
            f"cannot mine {num_negatives} negatives from ranks {range_min}..{range_max} of {candidates} candidates: "
            "lower num_negatives or range_min, or add documents with corpus=."
        )
    mined = mine_hard_negatives(
        pairs.select_columns(["anchor", "positive"]),
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        corpus=list(corpus) if corpus is not None else None,
        range_min=range_min,
        range_max=range_max,
        relative_margin=relative_margin,
        max_score=max_score,
        num_negatives=num_negatives,
        sampling_strategy=sampling_strategy,
        output_format="n-tuple",
        batch_size=batch_size,
        use_faiss=use_faiss,
        verbose=verbose,
    )
    if len(mined) == 0:
        raise UserInputError(
            "no pair kept enough negatives: lower relative_margin or num_negatives, or raise range_max."
        )
    renames = {c: f"negative_{c.rsplit('_', 1)[-1]}" for c in mined.column_names if c.startswith("negative")}
    if num_negatives == 1 and "negative" in mined.column_names:
        renames = {"negative": "negative_1"}
    mined = mined.rename_columns({k: v for k, v in renames.items() if k != v})
    mined.info.dataset_name = pairs.info.dataset_name
    return mined

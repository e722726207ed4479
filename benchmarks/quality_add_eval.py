"""Evaluate the saved stage-2 models of an earlier ``quality.py`` run on more sets (e.g. the zero-shot ones).

A ``quality.py`` run keeps its models in ``--work-dir`` (``seed<N>/<arm>-<regime>/final``). When a run was
made without some evaluation set and later runs of the same table have it, this script scores that run's
saved models on the missing sets with the same :func:`quality.evaluate` and writes a copy of its result
JSON with the scores added, so the runs join with ``--include``. It first re-scores the set the run already
has and stops if any score differs: the saved model must be the one the record was made from.

Example (seed 0 of ``results/quality_long``, run before the zero-shot sets were added)::

    python benchmarks/quality_add_eval.py --result /tmp/q5a/quality_long_retromae-mean-s0.json \\
        --work-dir /tmp/quality-bench-zobazdpt --output /tmp/q6/quality_long_retromae-mean-s0.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DATA, describe, eval_set, evaluate, summarise  # noqa: E402

from retromae_st.io import atomic_write_json  # noqa: E402
from retromae_st.models import load_encoder  # noqa: E402

logger = logging.getLogger("benchmarks.quality_add_eval")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", required=True, help="the earlier run's result JSON")
    parser.add_argument("--work-dir", required=True, help="that run's --work-dir (its saved models)")
    parser.add_argument("--output", required=True, help="where the JSON with the added scores goes")
    parser.add_argument(
        "--zero-shot",
        default=f"{DATA / 'cisi'},{DATA / 'cranfield'}",
        help="comma list of BEIR folders to add",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    report = json.loads(Path(args.result).read_text())
    config = report["config"]
    in_domain = eval_set(Path(config["data"]), config["eval_split"], config["test_docs"])
    added = [eval_set(Path(p), "test", None) for p in args.zero_shot.split(",") if p]
    for record in report["records"]:
        if record["regime"] not in ("full", "scarce"):
            continue
        folder = (
            Path(args.work_dir) / f"seed{record['seed']}" / f"{record['arm']}-{record['regime']}" / "final"
        )
        model = load_encoder(str(folder), max_seq_length=config["max_len"], pooling=record["pooling"])
        again = evaluate(model, in_domain)
        recorded = record["scores"][in_domain["name"]]
        if any(not math.isclose(again[m], recorded[m], abs_tol=1e-6) for m in recorded):
            raise SystemExit(
                f"{folder}: scores {again} differ from the recorded {recorded}; not this run's model"
            )
        for data in added:
            record["scores"][data["name"]] = evaluate(model, data)
        logger.info("seed %d %s %s: %s", record["seed"], record["arm"], record["regime"], record["scores"])
    report["eval_sets"] += describe(added)
    report["summary"] = summarise(report["records"])
    config["zero_shot"] = args.zero_shot
    config["zero_shot_added_by"] = "benchmarks/quality_add_eval.py (the run's saved stage-2 models)"
    atomic_write_json(Path(args.output), report)


if __name__ == "__main__":
    main()

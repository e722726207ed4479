"""The evaluate() entry point on a tiny BEIR folder: report contents, MTEB agreement, bad inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TINY, make_texts

from retromae_st.data.beir import load_beir
from retromae_st.errors import UserInputError
from retromae_st.evaluation import evaluate, evaluate_beir, load_log_history
from retromae_st.evaluation.mteb_tasks import resolve_task
from retromae_st.models import build_model

STAGE1_LOG = [
    {
        "loss": 9.1,
        "encoder_mlm": 4.0,
        "decoder": 4.5,
        "bow": 0.6,
        "step": 10,
        "epoch": 0.1,
        "learning_rate": 1e-4,
    },
    {
        "loss": 7.2,
        "encoder_mlm": 3.1,
        "decoder": 3.6,
        "bow": 0.5,
        "step": 20,
        "epoch": 0.2,
        "learning_rate": 1e-4,
    },
]
STAGE2_STATE = {
    "log_history": [
        {"loss": 2.0, "step": 5},
        {"eval_dev_cosine_ndcg@10": 0.31, "eval_loss": 1.9, "eval_runtime": 0.4, "step": 5},
        {"loss": 1.5, "step": 10},
        {"eval_dev_cosine_ndcg@10": 0.42, "eval_loss": 1.4, "eval_runtime": 0.4, "step": 10},
    ]
}


def write_beir(
    folder: Path, *, docs: int = 30, queries: int = 8, extra_qrels: str = "", corpus: str | None = None
) -> Path:
    """A small BEIR folder: each query is a shortened copy of its relevant document (plus one graded extra)."""
    texts = make_texts(docs, seed=5)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"_id": f"d{i}", "title": f"t{i}", "text": t}) for i, t in enumerate(texts)]
    (folder / "corpus.jsonl").write_text(corpus if corpus is not None else "\n".join(lines) + "\n")
    (folder / "queries.jsonl").write_text(
        "\n".join(
            json.dumps({"_id": f"q{i}", "text": " ".join(texts[i].split()[:4])}) for i in range(queries)
        )
        + "\n"
    )
    qrels = ["query-id\tcorpus-id\tscore"]
    qrels += [f"q{i}\td{i}\t2\nq{i}\td{(i + 11) % docs}\t1" for i in range(queries)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n" + extra_qrels)
    return folder


@pytest.fixture
def beir(tmp_path) -> Path:
    return write_beir(tmp_path / "tiny")


@pytest.fixture
def mean_model(tokenizer, tmp_path):
    """A random tiny encoder with mean pooling: its similarities differ by ~1e-3, far above float noise.

    (A random CLS-pooled encoder maps every text to nearly the same vector, so its ranking would be
    decided by rounding and two correct evaluators could disagree.)
    """
    return build_model(
        TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init-m", seed=0, pooling="mean"
    )


@pytest.fixture
def baseline_folder(tokenizer, tmp_path) -> Path:
    """A different model saved as a Sentence-Transformers folder (as a user-named baseline would be)."""
    model = build_model(
        TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init-b", seed=1, pooling="mean"
    )
    model.save(str(tmp_path / "baseline"))
    return tmp_path / "baseline"


def test_report_holds_every_model_and_task_and_mteb_agrees(mean_model, baseline_folder, beir, tmp_path):
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "trainer_state.json").write_text(json.dumps(STAGE2_STATE))
    out = tmp_path / "report"
    report = evaluate(
        {"stage1": mean_model, "baseline": str(baseline_folder)},
        beir_folders=[beir],
        mteb_tasks=[str(beir)],  # the same folder as a custom MTEB AbsTaskRetrieval task
        output_dir=out,
        batch_size=8,
        training_logs={"stage 1": STAGE1_LOG, "stage 2": tmp_path / "stage2"},
        command="retromae-st evaluate --model ... --beir tiny",
        config={"seed": 0},
    )
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=str))
    assert [m["label"] for m in on_disk["models"]] == ["stage1", "baseline"]
    assert len({m["fingerprint"] for m in on_disk["models"]}) == 2
    cells = {(r["model"], r["task"]): r["metrics"] for r in on_disk["results"]}
    assert set(cells) == {(m, t) for m in ("stage1", "baseline") for t in ("tiny", "mteb:tiny")}
    for model in ("stage1", "baseline"):
        ours, theirs = cells[(model, "tiny")], cells[(model, "mteb:tiny")]
        for metric in ("ndcg@10", "recall@10", "map@100"):
            # mteb rounds to 5 decimals.
            assert ours[metric] == pytest.approx(theirs[metric], abs=1e-5), (model, metric)
    assert cells[("stage1", "tiny")]["ndcg@10"] != cells[("baseline", "tiny")]["ndcg@10"]

    markdown = (out / "report.md").read_text()
    for needle in (
        "stage1",
        "baseline",
        "### tiny",
        "### mteb:tiny",
        "nDCG@10",
        "recall_at_k.png",
        "training_curves.png",
    ):
        assert needle in markdown
    assert "retromae-st evaluate --model ... --beir tiny" in markdown and '"seed": 0' in markdown
    for png in ("recall_at_k.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["training"]["stage 1"]["final"]["decoder"] == 3.6
    assert on_disk["training"]["stage 2"]["final"]["eval_dev_cosine_ndcg@10"] == 0.42
    assert "eval_runtime" not in on_disk["training"]["stage 2"]["final"]

    with pytest.raises(UserInputError, match="already exists"):
        evaluate([mean_model], beir_folders=[beir], output_dir=out)


def test_approximate_index_reports_recall_against_exact_and_qps(mean_model, beir, tmp_path):
    report = evaluate(
        [mean_model], beir_folders=[beir], output_dir=tmp_path / "out", index="hnsw", cache_dir=tmp_path / "c"
    )
    [approx] = report["approximate"]
    assert approx["factory"] == "HNSW32" and 0.0 <= approx["recall@10_vs_exact"] <= 1.0
    assert approx["qps"] > 0 and approx["exact_qps"] > 0
    # A 30-document HNSW graph is searched exhaustively in practice: it agrees with exact search.
    assert approx["recall@10_vs_exact"] == 1.0 and approx["ndcg@10"] == pytest.approx(approx["exact_ndcg@10"])
    assert "## Approximate search" in (tmp_path / "out" / "report.md").read_text()
    assert any((tmp_path / "c" / "embeddings").iterdir())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra_qrels": "q1\tnope\t1\n"}, "document id 'nope'"),
        ({"extra_qrels": "q99\td1\t1\n"}, "query id 'q99'"),
        ({"corpus": '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n'}, "duplicate document id 'a'"),
        ({"corpus": ""}, "corpus.jsonl is empty"),
    ],
)
def test_bad_beir_folders_name_the_file_and_id(tiny_model, tmp_path, change, message):
    folder = write_beir(tmp_path / "bad", **change)
    with pytest.raises(UserInputError, match=message) as error:
        evaluate([tiny_model], beir_folders=[folder], output_dir=tmp_path / "out")
    assert str(folder) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_before_any_work(tiny_model, beir, tmp_path):
    with pytest.raises(UserInputError, match="split 'dev' does not exist"):
        evaluate([tiny_model], beir_folders=[beir], split="dev", output_dir=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="neither modules.json nor config.json"):
        evaluate([str(tmp_path / "empty")], beir_folders=[beir], output_dir=tmp_path / "o")
    with pytest.raises(UserInputError, match="nothing to evaluate"):
        evaluate([tiny_model], output_dir=tmp_path / "o")
    with pytest.raises(UserInputError, match="distinct labels"):
        evaluate(  # a/m and b/m would be labelled apart (a/m, b/m); the same model twice cannot be
            [str(tmp_path / "a" / "m"), str(tmp_path / "a" / "m")],
            beir_folders=[beir],
            output_dir=tmp_path / "o",
        )
    with pytest.raises(UserInputError, match="neither a folder nor an MTEB task"):
        evaluate([tiny_model], mteb_tasks=["NoSuchTask123"], output_dir=tmp_path / "o")
    with pytest.raises(UserInputError, match="log_history"):
        evaluate(
            [tiny_model], beir_folders=[beir], training_logs={"x": {"steps": []}}, output_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_comparisons_report_signed_differences_per_task(tiny_model, beir, tmp_path):
    from retromae_st.evaluation.report import Comparison, compare_results, comparison_line, render_markdown

    with pytest.raises(UserInputError, match="not among the models"):
        evaluate(
            {"a": tiny_model}, beir_folders=[beir], output_dir=tmp_path / "o", comparisons=[("t", "a", "b")]
        )
    assert not (tmp_path / "o").exists()
    results = [
        {"model": "with", "task": "x", "metrics": {"ndcg@10": 0.30, "recall@10": 0.5}},
        {"model": "without", "task": "x", "metrics": {"ndcg@10": 0.42, "recall@10": 0.5}},
        {"model": "with", "task": "mteb", "metrics": {"main_score": 0.2}},
        {"model": "without", "task": "mteb", "metrics": {"main_score": 0.1}},
        {"model": "with", "task": "only-one", "metrics": {"ndcg@10": 0.1}},  # no reference row: no entry
    ]
    results = [{**row, "evaluator": "a test"} for row in results]
    entries = compare_results(results, [Comparison("stage 1 vs none", "with", "without")])
    assert [e["task"] for e in entries] == ["x", "mteb"]
    assert entries[0]["differences"] == pytest.approx({"ndcg@10": -0.12, "recall@10": 0.0})
    assert (
        comparison_line(entries[0]) == "stage 1 vs none: -0.1200 nDCG@10 on x (with 0.3000 vs without 0.4200)"
    )
    assert comparison_line(entries[1]).startswith("stage 1 vs none: +0.1000 main score on mteb")
    report = {"created": "now", "versions": {}, "split": "test", "index": {"name": "flat"}, "models": []}
    markdown = render_markdown({**report, "results": results, "comparisons": entries})
    assert "## Comparisons" in markdown and "| with vs without | x | -0.1200 | ±0.0000 | – |" in markdown


def test_hub_task_offline_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    # An empty cache: the task data cannot be there, whatever this machine downloaded before.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    begin = time.perf_counter()
    with pytest.raises(UserInputError, match="HF_HUB_OFFLINE") as error:
        resolve_task("SciFact")
    assert "SciFact" in str(error.value)
    assert time.perf_counter() - begin < 15


def test_log_history_from_checkpoint_folders(tmp_path):
    for step in (500, 1000):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"log_history": [{"loss": 1.0 / step, "step": step}]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    assert load_log_history(tmp_path) == [{"loss": 0.001, "step": 1000}]  # the latest, not the lexically last
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(UserInputError, match="no trainer_state.json"):
        load_log_history(tmp_path / "nothing-here")


def test_cisi_exact_and_hnsw_agree(mean_model, shared_data):
    data = load_beir(shared_data / "cisi", "test")
    result = evaluate_beir(mean_model, data, index="hnsw", batch_size=64)
    assert result.approximate["recall@10_vs_exact"] > 0.9
    assert (
        0.0
        <= result.metrics["recall@10"]
        <= result.metrics["recall@100"]
        <= result.metrics["recall@1000"]
        <= 1.0
    )

"""Stage 2 fine-tuning: pair loading, dev evaluator, hard negatives, MNRL training, best checkpoint, resume."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_texts
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from retromae_st.data.beir import load_beir
from retromae_st.errors import UserInputError
from retromae_st.finetuning.model_card import TRAINING_LOG
from retromae_st.finetuning.negatives import mine_negatives
from retromae_st.finetuning.pairs import dev_evaluator, load_pairs
from retromae_st.finetuning.train import finetune, primary_metric_key
from retromae_st.models import build_model

BATCH = 16


def _easy_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Passages and queries made of 4 words drawn from their passage: learnable by a mean-pooled bag of words."""
    passages = list(dict.fromkeys(make_texts(n, seed=seed)))
    rng = random.Random(seed)
    queries = [" ".join(rng.sample(p.split(), 4)) for p in passages]
    return queries, passages


@pytest.fixture
def easy_pairs() -> Dataset:
    queries, passages = _easy_pairs(320, seed=1)
    return Dataset.from_dict({"anchor": queries, "positive": passages})


@pytest.fixture
def mean_model(tokenizer, tmp_path) -> SentenceTransformer:
    # Mean pooling from random init, with BERT's init (as the mean-pooled recipes): the mining test's margins
    # were set on this model.
    return build_model(
        TINY, tokenizer, max_seq_length=64, pooling="mean", save_dir=tmp_path / "init", seed=0,
        attention_init_gain=None,
    )  # fmt: skip


def _write_beir(
    folder: Path, queries: list[str], passages: list[str], split: str, extra_docs: int = 0
) -> Path:
    folder.mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": p} for i, p in enumerate(passages)]
    docs += [{"_id": f"x{i}", "title": "", "text": t} for i, t in enumerate(make_texts(extra_docs, seed=99))]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(queries))
    )
    (folder / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(len(queries))]
    rows.append("q0\td1\t0")  # a judged non-relevant document: not a training pair
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _log(output: Path) -> dict:
    return json.loads((output / "final" / TRAINING_LOG).read_text())


# ------------------------------------------------------------------------------------------------ load_pairs


def test_load_pairs_from_beir_folder(tmp_path):
    folder = _write_beir(
        tmp_path / "beir", ["alpha query", "beta query"], ["first doc", "second doc"], "train"
    )
    pairs = load_pairs(folder, split="train")
    assert pairs.column_names == ["anchor", "positive"]
    assert pairs["anchor"] == ["alpha query", "beta query"]  # the relevance-0 judgement is no pair
    assert pairs["positive"] == ["title 0 first doc", "title 1 second doc"]  # title + text
    with pytest.raises(UserInputError, match="split 'dev' does not exist"):
        load_pairs(folder, split="dev")


def test_load_pairs_from_jsonl_and_csv(tmp_path):
    rows = [{"question": f"q {i}", "passage": f"p {i}", "negative": f"n {i}", "id": i} for i in range(5)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(jsonl)
    assert pairs.column_names == ["anchor", "positive", "negative_1"]
    assert pairs[2] == {"anchor": "q 2", "positive": "p 2", "negative_1": "n 2"}

    csv = tmp_path / "pairs.csv"
    csv.write_text('text,doc\n"a, with comma",x\nb,"y ""quoted"""\n')
    pairs = load_pairs(csv, query_column="text", positive_column="doc")
    assert pairs["anchor"] == ["a, with comma", "b"]
    assert pairs["positive"] == ["x", 'y "quoted"']

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('query\tpositive\n"quoted" query\tdoc\n')
    assert load_pairs(tsv)[0] == {"anchor": '"quoted" query', "positive": "doc"}


def test_load_pairs_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "q", "body": "b"}) + "\n")
    with pytest.raises(UserInputError) as error:
        load_pairs(path)
    assert "pairs.jsonl" in str(error.value) and "['query', 'body']" in str(error.value)
    with pytest.raises(UserInputError, match="no column 'passage'"):
        load_pairs(path, positive_column="passage")


def test_load_pairs_max_pairs_and_empty_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"anchor": f"q{i}", "positive": f"p{i}"} for i in range(20)] + [{"anchor": " ", "positive": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_pairs(path)) == 20  # the empty query is dropped
    few = load_pairs(path, max_pairs=5, seed=3)
    assert len(few) == 5 and len(set(few["anchor"])) == 5
    assert few["anchor"] == load_pairs(path, max_pairs=5, seed=3)["anchor"]  # deterministic per seed
    assert set(few["anchor"]) <= {f"q{i}" for i in range(20)}
    with pytest.raises(UserInputError, match="max_pairs"):
        load_pairs(path, max_pairs=0)


def test_load_pairs_unknown_sources_fail_fast(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    start = time.monotonic()
    with pytest.raises(UserInputError, match="OFFLINE"):
        load_pairs("no-such-user/no-such-dataset")
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------------------ evaluator


def test_dev_evaluator_keeps_judged_docs_in_a_corpus_subset(tmp_path):
    queries, passages = _easy_pairs(30, seed=2)
    folder = _write_beir(tmp_path / "beir", queries, passages, "dev", extra_docs=100)
    evaluator = dev_evaluator(folder, max_corpus=50, max_queries=10)
    assert len(evaluator.queries) == 10 and len(evaluator.corpus) == 50
    judged = {d for q in evaluator.queries_ids for d in evaluator.relevant_docs[q]}
    assert judged <= set(evaluator.corpus_ids)
    full = dev_evaluator(folder)
    assert len(full.corpus) == len(load_beir(folder, "dev").corpus)


# ------------------------------------------------------------------------------------------------ training


def test_mnrl_loss_falls_and_final_model_loads(mean_model, easy_pairs, tmp_path):
    output = tmp_path / "run"
    finetune(
        mean_model,
        easy_pairs,
        output,
        batch_size=BATCH,
        learning_rate=1e-3,
        max_steps=40,
        save_steps=20,
        logging_steps=5,
        warmup_ratio=0.0,
        train_dataset_name="easy synthetic pairs",
    )
    losses = [entry["loss"] for entry in _log(output)["log_history"] if "loss" in entry]
    chance = math.log(BATCH)
    assert losses[0] > 0.8 * chance
    assert losses[-1] < 0.6 * chance and losses[-1] < losses[0] - 0.5
    loaded = SentenceTransformer(str(output / "final"))
    assert torch.allclose(
        loaded.encode(["a query"], convert_to_tensor=True),
        mean_model.encode(["a query"], convert_to_tensor=True),
    )
    card = (output / "final" / "README.md").read_text()
    assert "MultipleNegativesRankingLoss" in card and "easy synthetic pairs" in card
    with pytest.raises(UserInputError, match="already exists"):
        finetune(mean_model, easy_pairs, output, max_steps=1, batch_size=BATCH, resume=False)


class _Scramble(TrainerCallback):
    """Wrecks the weights at one step, so that the last evaluation is the worst."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 5)


def test_best_checkpoint_is_kept_and_card_has_metrics(mean_model, easy_pairs, tmp_path):
    queries, passages = _easy_pairs(60, seed=5)
    evaluator = dev_evaluator(_write_beir(tmp_path / "beir", queries, passages, "dev"), name="dev")
    metric = primary_metric_key(evaluator, mean_model)
    assert metric == "eval_dev_cosine_ndcg@10"
    output = tmp_path / "run"
    model = finetune(
        mean_model,
        easy_pairs,
        output,
        evaluator=evaluator,
        batch_size=BATCH,
        learning_rate=1e-3,
        max_steps=30,
        save_steps=15,
        save_total_limit=1,
        warmup_ratio=0.0,
        callbacks=[_Scramble(step=30)],
        stage1_info={"corpus": "synthetic texts", "mask ratio (encoder)": 0.3},
    )
    log = _log(output)
    scores = {entry["step"]: entry[metric] for entry in log["log_history"] if metric in entry}
    assert set(scores) == {15, 30} and scores[15] > scores[30]
    assert log["best_model_checkpoint"] == "checkpoint-15"
    assert log["best_metric"] == pytest.approx(scores[15])
    # Both the returned model and the saved one are the step-15 weights, not the wrecked last ones.
    for candidate in (model, SentenceTransformer(str(output / "final"))):
        assert evaluator(candidate)["dev_cosine_ndcg@10"] == pytest.approx(scores[15], abs=1e-6)
    card = (output / "final" / "README.md").read_text()
    assert "dev_cosine_ndcg@10" in card and "Stage 1: RetroMAE pretraining" in card
    assert "synthetic texts" in card and "RetroMAE" in card


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt


class _StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_interrupted_run_resumes_from_last_checkpoint(mean_model, easy_pairs, tmp_path):
    output = tmp_path / "run"
    options = dict(batch_size=BATCH, learning_rate=1e-3, max_steps=8, save_steps=2, logging_steps=1)
    with pytest.raises(KeyboardInterrupt):
        finetune(mean_model, easy_pairs, output, callbacks=[_Crash()], **options)
    assert not (output / "final").exists()
    assert (output / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(UserInputError, match="holds checkpoints"):
        finetune(mean_model, easy_pairs, output, resume=False, **options)

    recorder = _StepRecorder()
    finetune(mean_model, easy_pairs, output, callbacks=[recorder], **options)
    assert recorder.steps == [5, 6, 7, 8]  # continues after checkpoint-4, redoes nothing before it
    log = _log(output)
    assert log["global_step"] == 8
    logged_steps = [entry["step"] for entry in log["log_history"] if "loss" in entry]
    assert logged_steps == list(range(1, 9))  # history of both runs, each step once (step 5 lost, redone)


def test_mine_negatives_then_cached_mnrl(mean_model, easy_pairs, tmp_path):
    pairs = easy_pairs.select(range(64))
    mined = mine_negatives(pairs, mean_model, num_negatives=2, range_max=20, verbose=False)
    assert mined.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert 0 < len(mined) <= len(pairs)
    positive_of = dict(zip(pairs["anchor"], pairs["positive"]))
    for row in mined:
        assert (
            row["negative_1"] != positive_of[row["anchor"]]
            and row["negative_2"] != positive_of[row["anchor"]]
        )
        assert row["negative_1"] in set(pairs["positive"])

    output = tmp_path / "cached"
    finetune(
        mean_model,
        mined,
        output,
        loss="cached_mnrl",
        mini_batch_size=4,
        batch_size=8,
        max_steps=3,
        save_steps=3,
    )
    log = _log(output)
    assert log["global_step"] == 3 and all(
        math.isfinite(e["loss"]) for e in log["log_history"] if "loss" in e
    )
    assert "CachedMultipleNegativesRankingLoss" in (output / "final" / "README.md").read_text()


def test_bad_options_are_user_errors(mean_model, easy_pairs, tmp_path):
    with pytest.raises(UserInputError, match="unknown loss"):
        finetune(mean_model, easy_pairs, tmp_path / "a", loss="triplet", max_steps=1)
    with pytest.raises(UserInputError, match="expected anchor, positive"):
        finetune(mean_model, easy_pairs.rename_column("anchor", "query"), tmp_path / "b", max_steps=1)
    with pytest.raises(UserInputError, match="multiple of eval_steps"):
        finetune(mean_model, easy_pairs, tmp_path / "c", evaluator=object(), save_steps=10, eval_steps=4)

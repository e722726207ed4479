"""Stage 1's learning rate defaults to ``auto``: 1e-3 / 5e-4 for retromae-tiny / -small from scratch, else 1e-4,
or 5e-5 for an existing model without a masked-LM head (an embedding model).

At 1e-4 a from-scratch retromae-tiny's decoder learns to ignore h before the encoder writes the text into
[CLS], so the old fixed default was a setting under which its stage 1 did not train the embedding.
retromae-small at 1e-3 stayed on the unigram plateau for 600 steps; its h_gain rose fastest at 5e-4
(benchmarks/README.md).
"""

from __future__ import annotations

import logging

import pytest
from conftest import make_texts
from pydantic import ValidationError

from retromae_st import cli, recipes
from retromae_st.models import (
    HEADLESS_LEARNING_RATE,
    PRESETS,
    PRETRAINED_LEARNING_RATE,
    build_model,
    stage1_learning_rate,
    train_wordpiece_tokenizer,
)
from retromae_st.pretraining import training
from retromae_st.pretraining.diagnostics import stalled_message
from retromae_st.pretraining.training import read_training_log


def test_auto_picks_the_presets_rate_and_the_gentle_one_for_existing_models():
    assert stage1_learning_rate("auto", "retromae-tiny") == 1e-3
    assert stage1_learning_rate("auto", "retromae-small") == 5e-4
    assert stage1_learning_rate("auto", "retromae-base") == PRETRAINED_LEARNING_RATE == 1e-4
    assert stage1_learning_rate("auto", "bert-base-uncased") == 1e-4
    assert stage1_learning_rate("auto", None) == 1e-4
    assert stage1_learning_rate(3e-4, "retromae-tiny") == 3e-4  # an explicit rate is kept
    assert {name: preset.learning_rate for name, preset in PRESETS.items()} == {
        "retromae-tiny": 1e-3,
        "retromae-small": 5e-4,
        "retromae-base": 1e-4,
    }


def test_cli_and_recipe_default_to_auto_and_take_a_number():
    parser = cli.build_parser()
    common = ["pretrain", "--model", "retromae-tiny", "--corpus", "c.txt", "--output", "o"]
    assert parser.parse_args(common).lr == "auto"
    assert parser.parse_args([*common, "--lr", "5e-4"]).lr == 5e-4
    for bad in ("0", "-1e-3", "fast", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, "--lr", bad])
    # stage 2 keeps its fixed default
    assert parser.parse_args(["finetune", "--model", "m", "--train", "t", "--output", "o"]).lr == 2e-5

    assert recipes.PretrainSection(corpus="c.txt").learning_rate == "auto"
    assert recipes.PretrainSection(corpus="c.txt", learning_rate=5e-4).learning_rate == 5e-4
    for bad in (0, -1e-3, "fast", float("inf")):
        with pytest.raises(ValidationError, match="learning_rate"):
            recipes.PretrainSection(corpus="c.txt", learning_rate=bad)


def test_cli_pretrain_of_a_preset_trains_at_1e_3_by_default(tmp_path, caplog):
    (tmp_path / "c.txt").write_text("\n".join(make_texts(40, seed=4)) + "\n")
    argv = ["pretrain", "--model", "retromae-tiny", "--corpus", str(tmp_path / "c.txt"), "--output",
            str(tmp_path / "pt"), "--vocab-size", "150", "--max-seq-length", "32", "--max-steps", "4",
            "--batch-size", "8", "--logging-steps", "1"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert "Stage 1 learning rate: 0.001 (--lr auto: the retromae-tiny preset's rate)" in caplog.text
    # The trainer's schedule peaks at that rate (after one warm-up step of the 4).
    rates = [
        entry["learning_rate"] for entry in read_training_log(tmp_path / "pt") if "learning_rate" in entry
    ]
    assert max(rates) == pytest.approx(1e-3)


def _existing_model_without_head(tmp_path, texts) -> str:
    """A model folder as an embedding model is saved: encoder weights, no masked-LM head."""
    folder = tmp_path / "embedding-model"
    build_model(
        "retromae-tiny", train_wordpiece_tokenizer(texts, vocab_size=150), max_seq_length=32, save_dir=folder
    )
    return str(folder)


def test_cli_pretrain_of_an_existing_model_without_a_head_trains_at_5e_5_by_default(tmp_path, caplog):
    texts = make_texts(40, seed=4)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    model = _existing_model_without_head(tmp_path, texts)
    argv = ["pretrain", "--model", model, "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "pt"),
            "--max-steps", "4", "--batch-size", "8", "--logging-steps", "1"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert (
        "Stage 1 learning rate: 5e-05 (--lr auto: an existing model without a masked-LM head)" in caplog.text
    )
    rates = [
        entry["learning_rate"] for entry in read_training_log(tmp_path / "pt") if "learning_rate" in entry
    ]
    assert max(rates) == pytest.approx(HEADLESS_LEARNING_RATE)


@pytest.mark.parametrize(
    ("preset", "expected", "why"),
    [
        ("retromae-tiny", 1e-3, "the retromae-tiny preset's rate"),
        ("retromae-small", 5e-4, "the retromae-small preset's rate"),
        (None, 5e-5, "an existing model without a masked-LM head"),
    ],
)
def test_a_recipe_without_a_rate_passes_the_auto_rate_to_stage_1(
    tmp_path, monkeypatch, preset, expected, why
):
    seen: dict[str, float] = {}

    class Stop(Exception):
        pass

    def fake_pretrain(model, windows, output_dir, **kwargs):
        seen["learning_rate"] = kwargs["learning_rate"]
        raise Stop

    monkeypatch.setattr(training, "pretrain", fake_pretrain)
    texts = make_texts(40, seed=5)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    if preset is None:
        model = f"model:\n  name_or_path: {_existing_model_without_head(tmp_path, texts)}\n"
    else:
        model = f"model:\n  preset: {preset}\n  vocab_size: 150\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: lr\noutput_dir: run\n{model}"
        f"pretrain:\n  corpus: {tmp_path / 'c.txt'}\n  max_steps: 2\n"
        "finetune:\n  enabled: false\nevaluation:\n  enabled: false\n"
    )
    with pytest.raises(Stop):
        cli.main(["run", str(recipe), "--output-root", str(tmp_path)])
    assert seen["learning_rate"] == expected
    assert (
        f"Stage 1 learning rate: {expected:g} (pretrain.learning_rate auto: {why})"
        in (tmp_path / "run" / "run.log").read_text()
    )


def test_every_text_that_quotes_the_auto_rates_names_the_presets_rates():
    # The CLI help, the recipe field and the h_gain warning repeat the rates as text (cli and recipes do
    # not import models, which pulls in torch), so a new rate in PRESETS must show up in all three.
    pretrain = next(
        action.choices["pretrain"] for action in cli.build_parser()._actions if action.dest == "command"
    )
    lr_help = next(action.help for action in pretrain._actions if action.dest == "lr")
    field = recipes.PretrainSection.model_fields["learning_rate"].description

    def as_written(rate: float) -> str:  # 0.001 -> "1e-3", as the texts write it
        return f"{rate:.0e}".replace("e-0", "e-")

    warning = stalled_message(0.0, None, 500, 1000, pooling="cls")
    from_scratch = {
        name: p.learning_rate for name, p in PRESETS.items() if p.learning_rate != PRETRAINED_LEARNING_RATE
    }
    assert from_scratch  # the presets with their own rate
    for text in (lr_help, field, warning):
        for name, rate in from_scratch.items():
            assert as_written(rate) in text and name.removeprefix("retromae") in text, (name, text)
    for text in (lr_help, field):
        assert as_written(PRETRAINED_LEARNING_RATE) in text
        assert as_written(HEADLESS_LEARNING_RATE) in text and "masked-LM head" in text

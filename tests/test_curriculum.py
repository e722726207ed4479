"""The mask-ratio curriculum: the ratios it sets at given steps, and that it runs inside pretrain()."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, make_texts
from datasets import Dataset

from retromae_st.data.tokenize import tokenize_corpus
from retromae_st.errors import UserInputError
from retromae_st.models import build_model
from retromae_st.pretraining.curriculum import LinearRamp, MaskRatioCurriculum
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.training import pretrain
from retromae_st.recipes import RetroMAEOptions


def test_linear_ramp_values():
    ramp = LinearRamp(start=1.0, end=0.5, steps=100)
    assert ramp.at(0) == 1.0
    assert ramp.at(50) == pytest.approx(0.75)
    assert ramp.at(99) == pytest.approx(0.505)
    assert ramp.at(100) == 0.5 and ramp.at(10_000) == 0.5
    assert LinearRamp(start=0.9, end=0.5, steps=0).at(0) == 0.5  # no ramp: the target at once


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.9"])
def test_linear_ramp_rejects_bad_ratios(bad):
    with pytest.raises(ValueError):
        LinearRamp(start=bad, end=0.5, steps=10)


def test_curriculum_sets_the_ratio_per_step(tiny_model):
    loss = RetroMAELoss(tiny_model, encoder_mask_ratio=0.3, decoder_mask_ratio=0.5)
    curriculum = MaskRatioCurriculum(
        loss, decoder_start=1.0, decoder_steps=10, encoder_start=0.1, encoder_steps=4
    )
    for step, decoder, encoder in [
        (0, 1.0, 0.1),
        (2, 0.9, 0.2),
        (5, 0.75, 0.3),
        (10, 0.5, 0.3),
        (50, 0.5, 0.3),
    ]:
        curriculum.apply(step)
        assert loss.decoder_mask_ratio == pytest.approx(decoder)
        assert loss.encoder_mask_ratio == pytest.approx(encoder)
    curriculum.apply(math.inf)
    assert (loss.decoder_mask_ratio, loss.encoder_mask_ratio) == (0.5, 0.3)
    with pytest.raises(ValueError):
        MaskRatioCurriculum(loss, encoder_start=1.0, encoder_steps=4)


def test_curriculum_runs_in_pretrain(tokenizer, tmp_path):
    windows, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(48, seed=5)}), tokenizer, max_seq_length=64
    )
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    torch.manual_seed(0)
    loss = RetroMAELoss(model, decoder_mask_ratio=0.5)
    seen: list[float] = []
    loss.register_forward_pre_hook(lambda module, args: seen.append(module.decoder_mask_ratio))
    curriculum = MaskRatioCurriculum(loss, decoder_start=1.0, decoder_steps=4)
    pretrain(
        model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=6, save_steps=100,
        learning_rate=1e-3, callbacks=[curriculum],
    )  # fmt: skip
    assert seen == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    assert loss.decoder_mask_ratio == 0.5
    assert (tmp_path / "run" / "final" / "modules.json").is_file()


def test_loss_option_adds_the_curriculum_in_pretrain(tokenizer, tmp_path):
    windows, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(48, seed=5)}), tokenizer, max_seq_length=64
    )
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    torch.manual_seed(0)
    loss = RetroMAELoss(model, decoder_mask_ratio=0.5, decoder_mask_start=0.9, decoder_mask_steps=2)
    seen: list[float] = []
    loss.register_forward_pre_hook(lambda module, args: seen.append(module.decoder_mask_ratio))
    assert loss.get_config_dict()["decoder_mask_start"] == 0.9
    pretrain(
        model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=3, save_steps=100,
        learning_rate=1e-3,
    )  # fmt: skip
    assert seen == pytest.approx([0.9, 0.7, 0.5])


@pytest.mark.parametrize(
    "options",
    [
        {"decoder_mask_start": 0.0},
        {"decoder_mask_start": 1.2},
        {"decoder_mask_steps": -1},
        {"mean_mix_start": 1.5},
        {"mean_mix_steps": -2},
    ],
)
def test_bad_curriculum_options_are_refused(tiny_model, options):
    with pytest.raises(UserInputError):
        RetroMAELoss(tiny_model, **options)


def test_recipe_accepts_the_curriculum_keys():
    options = RetroMAEOptions(
        decoder_mask_start=1.0, decoder_mask_steps=150, mean_mix_start=1.0, mean_mix_steps=150
    )
    assert options.model_dump()["decoder_mask_start"] == 1.0
    assert options.model_dump()["mean_mix_start"] == 1.0
    with pytest.raises(ValueError):
        RetroMAEOptions(decoder_mask_start=1.5)


def test_mean_mix_blends_the_decoder_input(tiny_model, tokenizer):
    loss = RetroMAELoss(tiny_model, mean_mix_start=1.0, mean_mix_steps=10)
    features = dict(tokenizer(make_texts(4, seed=3), padding=True, return_tensors="pt"))
    out = {}
    for mix in (0.0, 1.0):
        loss.mean_mix = mix
        torch.manual_seed(0)
        out[mix] = {k: float(v.detach()) for k, v in loss([features]).items()}
    assert out[0.0]["encoder_mlm"] == pytest.approx(out[1.0]["encoder_mlm"])  # same masks, same encoder
    assert out[0.0]["decoder"] != pytest.approx(out[1.0]["decoder"])  # the decoder read another vector
    assert MaskRatioCurriculum.from_loss(RetroMAELoss(tiny_model)) is None


def test_mean_mix_falls_to_zero_in_pretrain(tokenizer, tmp_path):
    windows, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(48, seed=5)}), tokenizer, max_seq_length=64
    )
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    torch.manual_seed(0)
    loss = RetroMAELoss(model, mean_mix_start=1.0, mean_mix_steps=2)
    seen: list[float] = []
    loss.register_forward_pre_hook(lambda module, args: seen.append(module.mean_mix))
    pretrain(
        model, windows, tmp_path / "run", loss=loss, batch_size=8, max_steps=4, save_steps=100,
        learning_rate=1e-3,
    )  # fmt: skip
    assert seen == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert loss.mean_mix == 0.0

"""A from-scratch preset's [CLS] carries the text from the first step (issue #11 item 3).

At BERT's initialisation (std 0.02) the attention adds ~0.5% of the residual's norm, so [CLS] is the same
vector for every text and MNRL with CLS pooling cannot move it. Presets start the attention's value and
output projections at std gain / sqrt(hidden) instead (``models.scale_attention_init``).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_texts
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from retromae_st import recipes
from retromae_st.errors import UserInputError
from retromae_st.models import PRESET_ATTENTION_INIT_GAIN, Preset, build_model, load_encoder

SMALL = Preset(layers=2, hidden=64, heads=2, intermediate=128, max_positions=128)


def cls_spread(model, texts: list[str]) -> float:
    """Mean distance of the [CLS] vectors from their mean, relative to their mean norm."""
    model.eval()
    with torch.no_grad():
        cls = model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    return float((cls - cls.mean(0)).norm(dim=1).mean() / cls.norm(dim=1).mean())


def test_recipe_default_is_the_models_default():
    assert recipes.PRESET_ATTENTION_INIT_GAIN == PRESET_ATTENTION_INIT_GAIN


def test_only_the_value_and_output_projections_are_rescaled(tokenizer, tmp_path):
    bert_init = build_model(SMALL, tokenizer, save_dir=tmp_path / "a", seed=0, attention_init_gain=None)
    scaled = build_model(SMALL, tokenizer, save_dir=tmp_path / "b", seed=0, attention_init_gain=2.0)
    before = dict(bert_init[0].auto_model.named_parameters())
    after = dict(scaled[0].auto_model.named_parameters())
    rescaled = [name for name in after if not torch.equal(before[name], after[name])]
    assert rescaled and all(
        ".attention.self.value." in name or ".attention.output.dense." in name for name in rescaled
    ), rescaled
    for layer in scaled[0].auto_model.encoder.layer:
        for linear in (layer.attention.self.value, layer.attention.output.dense):
            assert linear.weight.std().item() == pytest.approx(2.0 / math.sqrt(SMALL.hidden), rel=0.05)
            assert not linear.bias.any()
    # What is saved is what ``SentenceTransformer(path)`` loads: a stock BERT with these weights.
    reloaded = load_encoder(str(tmp_path / "b"), pooling="cls")
    assert torch.equal(
        reloaded[0].auto_model.encoder.layer[0].attention.self.value.weight,
        scaled[0].auto_model.encoder.layer[0].attention.self.value.weight,
    )


def test_cls_depends_on_the_text_at_init(tokenizer, tmp_path):
    texts = make_texts(32, seed=3)
    bert_init = build_model(SMALL, tokenizer, save_dir=tmp_path / "a", seed=0, attention_init_gain=None)
    default = build_model(SMALL, tokenizer, save_dir=tmp_path / "b", seed=0)
    mean = build_model(SMALL, tokenizer, save_dir=tmp_path / "c", seed=0, pooling="mean")
    spread_bert, spread_default = cls_spread(bert_init, texts), cls_spread(default, texts)
    assert spread_bert < 0.03  # BERT's init: [CLS] is nearly the same vector for every text
    assert spread_default > 5 * spread_bert
    assert spread_default > 0.5 * cls_spread(mean, texts)  # about as text-dependent as mean pooling


def mnrl_losses(model, pairs: list[tuple[str, str]], steps: int, batch: int = 16) -> list[float]:
    torch.manual_seed(0)
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    history = []
    for step in range(steps):
        rows = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        features = [model.tokenize([r[k] for r in rows]) for k in (0, 1)]
        value = loss(features, None)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append(value.item())
    return history


def test_cls_learns_under_mnrl_from_scratch(tokenizer, tmp_path):
    """With BERT's init the CLS-pooled MNRL loss stays near ln(batch); with the presets' init it falls."""
    texts = make_texts(160, seed=4)
    pairs = [(" ".join(t.split()[1:4]), t) for t in texts]
    final = {}
    for name, gain in (("bert", None), ("default", "default")):
        model = build_model(SMALL, tokenizer, save_dir=tmp_path / name, seed=0, attention_init_gain=gain)
        history = mnrl_losses(model, pairs, steps=40)
        final[name] = sum(history[-5:]) / 5
    assert final["default"] < 0.5 * math.log(16), final
    assert final["default"] < final["bert"] - 0.5, final


@pytest.mark.parametrize("gain", [0, -1.0, 11, True, "large"])
def test_bad_gains_are_refused(tokenizer, gain):
    with pytest.raises(UserInputError, match="attention_init_gain"):
        build_model(SMALL, tokenizer, attention_init_gain=gain)


def test_recipe_key_applies_to_presets_only(tmp_path):
    base = "name: r\noutput_dir: out\npretrain: {corpus: c.txt, max_steps: 2}\nfinetune: {enabled: false}\n"
    path = tmp_path / "r.yaml"
    path.write_text(base + "model: {preset: retromae-tiny, attention_init_gain: null}\n")
    assert recipes.load_recipe(path).model.attention_init_gain is None
    path.write_text(base + "model: {preset: retromae-tiny}\n")
    assert recipes.load_recipe(path).model.attention_init_gain == PRESET_ATTENTION_INIT_GAIN
    path.write_text(base + "model: {name_or_path: some/model, attention_init_gain: 1.0}\n")
    with pytest.raises(UserInputError, match="attention_init_gain"):
        recipes.load_recipe(path)


def test_pretrain_flag_parses_and_applies_to_presets_only(tmp_path, capsys):
    from retromae_st.cli import build_parser, main

    parse = build_parser().parse_args
    common = ["pretrain", "--corpus", "c.txt", "--output", str(tmp_path / "o")]
    assert parse([*common, "--model", "retromae-tiny"]).attention_init_gain == "default"
    assert (
        parse([*common, "--model", "retromae-tiny", "--attention-init-gain", "bert"]).attention_init_gain
        is None
    )
    assert (
        parse([*common, "--model", "retromae-tiny", "--attention-init-gain", "2"]).attention_init_gain == 2.0
    )
    with pytest.raises(SystemExit):
        parse([*common, "--model", "retromae-tiny", "--attention-init-gain", "0"])
    capsys.readouterr()
    folder = tmp_path / "existing"
    folder.mkdir()
    assert main([*common, "--model", str(folder), "--attention-init-gain", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention-init-gain" in err[0] and "preset" in err[0]

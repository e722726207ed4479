"""Continuing from pretrained checkpoints: the MLM head, the warm-up, padding and which vector h is."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers as tf
from conftest import TINY
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from test_loss import REPETITIVE, _byte_level_tokenizer, features_of
from transformers import TrainerCallback

from retromae_st.cli import build_parser
from retromae_st.errors import UserInputError
from retromae_st.models import (
    HEADLESS_LEARNING_RATE,
    PRETRAINED_LEARNING_RATE,
    build_model,
    load_encoder,
    stage1_learning_rate,
)
from retromae_st.pretraining.loss import RetroMAELoss, has_pretrained_head
from retromae_st.pretraining.training import pretrain
from retromae_st.recipes import RetroMAEOptions

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _masked_lm(arch: str, tokenizer, texts) -> tuple[torch.nn.Module, object, tuple]:
    """A tiny ``*ForMaskedLM`` with randomised head weights, its tokenizer, and (dense, norm, bias) of its head."""
    if arch == "roberta":
        tokenizer = _byte_level_tokenizer(texts, None)
        config = tf.RobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=66,
            pad_token_id=tokenizer.pad_token_id,
            **SMALL,
        )
        model = tf.RobertaForMaskedLM(config)
        head = (model.lm_head.dense, model.lm_head.layer_norm, model.lm_head.bias)
    elif arch == "bert":
        model = tf.BertForMaskedLM(
            tf.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **SMALL)
        )
        predictions = model.cls.predictions
        head = (predictions.transform.dense, predictions.transform.LayerNorm, predictions.bias)
    elif arch == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=len(tokenizer),
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
        )
        model = tf.DistilBertForMaskedLM(config)
        head = (model.vocab_transform, model.vocab_layer_norm, model.vocab_projector.bias)
    elif arch == "modernbert":
        config = tf.ModernBertConfig(
            vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            global_attn_every_n_layers=1, **SMALL,
        )  # fmt: skip
        model = tf.ModernBertForMaskedLM(config)
        head = (model.head.dense, model.head.norm, model.decoder.bias)
    else:  # ELECTRA's generator
        config = tf.ElectraConfig(
            vocab_size=len(tokenizer), embedding_size=32, max_position_embeddings=64, **SMALL
        )
        model = tf.ElectraForMaskedLM(config)
        head = (
            model.generator_predictions.dense,
            model.generator_predictions.LayerNorm,
            model.generator_lm_head.bias,
        )
    with torch.no_grad():  # away from any initial value, so that a copy is told from a fresh head
        for parameter in [*head[0].parameters(), *head[1].parameters(), head[2]]:
            parameter.normal_(0.0, 0.5)
    return model, tokenizer, head


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "modernbert", "electra"])
def test_head_starts_from_the_checkpoints_masked_lm_head(arch, tokenizer, texts, tmp_path):
    mlm, tok, (dense, norm, bias) = _masked_lm(arch, tokenizer, texts)
    mlm.save_pretrained(tmp_path / arch)  # safetensors
    tok.save_pretrained(tmp_path / arch)
    model = load_encoder(str(tmp_path / arch), max_seq_length=32)  # the base model: the head is dropped
    loss = RetroMAELoss(model)

    assert loss.head_source is not None and loss.head_warmup_limit == 0  # a real head needs no warm-up
    assert torch.equal(loss.head.dense.weight, dense.weight)
    assert torch.equal(loss.head.bias, bias)
    assert torch.equal(loss.head.layer_norm.weight, norm.weight)
    if dense.bias is not None:
        assert torch.equal(loss.head.dense.bias, dense.bias)
    # End to end: our head on the encoder's states gives the checkpoint's own MLM logits.
    features = features_of(model, REPETITIVE[:2])
    inputs = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}
    mlm.eval()
    with torch.no_grad():
        states = model[0].auto_model(**inputs).last_hidden_state
        ours = loss.head.transform(states) @ loss.encoder().word_embeddings.weight.t() + loss.head.bias
        theirs = mlm(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_fresh_head_is_initialised_as_bert(tiny_model):
    loss = RetroMAELoss(tiny_model)
    assert loss.head_source is None
    weight = loss.head.dense.weight
    assert abs(weight.mean().item()) < 0.005 and 0.016 < weight.std().item() < 0.024  # normal(0, 0.02)
    assert not loss.head.dense.bias.any() and not loss.head.bias.any()
    assert torch.equal(loss.head.layer_norm.weight, torch.ones_like(loss.head.layer_norm.weight))
    assert not loss.head.layer_norm.bias.any()


def _pretrained_looking(tokenizer, folder) -> SentenceTransformer:
    """A tiny BERT whose weights are no longer the initial ones (as any trained encoder's), without an MLM head."""
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=folder, seed=0)
    with torch.no_grad():
        for module in model[0].auto_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.01 * torch.randn_like(module.weight))
    return model


def test_auto_warmup_only_for_a_pretrained_encoder_without_head(tokenizer, tiny_model, tmp_path):
    assert RetroMAELoss(tiny_model).head_warmup_limit == 0  # from scratch: nothing to protect
    pretrained = _pretrained_looking(tokenizer, tmp_path / "pretrained")
    assert RetroMAELoss(pretrained).head_warmup_limit == RetroMAELoss.AUTO_HEAD_WARMUP_STEPS
    assert RetroMAELoss(pretrained, head_warmup_steps=0).head_warmup_limit == 0
    short = RetroMAELoss(pretrained)
    short.fit_head_warmup(30)  # the callback does this with max_steps: a short run still trains its encoder
    assert short.head_warmup_limit == 12  # 40% of 30 steps
    fixed = RetroMAELoss(pretrained, head_warmup_steps=20)
    fixed.fit_head_warmup(30)  # an explicit count is kept
    assert fixed.head_warmup_limit == 20
    with pytest.raises(UserInputError, match="head_warmup_steps"):
        RetroMAELoss(pretrained, head_warmup_steps=-1)


def test_encoder_is_frozen_during_the_head_warmup(tokenizer, windows_for_warmup, tmp_path):
    model = _pretrained_looking(tokenizer, tmp_path / "init")
    torch.manual_seed(0)
    loss = RetroMAELoss(model, head_warmup_steps=3)
    encoder_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    decoder_before = {name: p.detach().clone() for name, p in loss.own_named_parameters()}
    pretrain(model, windows_for_warmup, tmp_path / "run", loss=loss, batch_size=8, max_steps=3,
             learning_rate=1e-3, warmup_ratio=0.0, save_steps=10)  # fmt: skip
    assert all(torch.equal(p, encoder_before[name]) for name, p in model.named_parameters())
    changed = [name for name, p in loss.own_named_parameters() if not torch.equal(p, decoder_before[name])]
    assert any(n.startswith("decoder.") for n in changed) and any(n.startswith("head.") for n in changed)


def test_encoder_trains_after_the_head_warmup(tokenizer, windows_for_warmup, tmp_path):
    model = _pretrained_looking(tokenizer, tmp_path / "init")
    loss = RetroMAELoss(model, head_warmup_steps=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pretrain(model, windows_for_warmup, tmp_path / "run", loss=loss, batch_size=8, max_steps=3,
             learning_rate=1e-3, warmup_ratio=0.0, save_steps=10)  # fmt: skip
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_auto_warmup_end_rule(tokenizer, tmp_path):
    """The warm-up goes on while either loss is above ln(V) / 2 and ends at the first step both are below."""
    loss = RetroMAELoss(_pretrained_looking(tokenizer, tmp_path / "init"))
    half = math.log(len(tokenizer)) / 2
    loss.current_step = 3
    loss._maybe_end_head_warmup(
        {"encoder_mlm": torch.tensor(half - 0.1), "decoder": torch.tensor(half + 0.1)}
    )
    assert loss.head_warmup_ended is None  # below ln(V) but not below half of it: a head still learning
    loss.current_step = 4
    loss._maybe_end_head_warmup(
        {"encoder_mlm": torch.tensor(half - 0.1), "decoder": torch.tensor(half - 0.1)}
    )
    assert loss.head_warmup_ended == 4


def test_auto_head_lr_factor_only_for_a_fresh_head_on_a_pretrained_encoder(tokenizer, tiny_model, tmp_path):
    assert RetroMAELoss(tiny_model).head_lr_factor == 1.0  # from scratch: every weight is new
    pretrained = _pretrained_looking(tokenizer, tmp_path / "pretrained")
    assert RetroMAELoss(pretrained).head_lr_factor == RetroMAELoss.AUTO_HEAD_LR_FACTOR
    assert RetroMAELoss(pretrained, head_lr_factor=2).head_lr_factor == 2.0
    assert RetroMAELoss(pretrained, head_lr_factor=2).get_config_dict()["head_lr_factor"] == 2
    for bad in (0, -1.0, float("nan"), "fast"):
        with pytest.raises(UserInputError, match="head_lr_factor"):
            RetroMAELoss(pretrained, head_lr_factor=bad)
    mlm, tok, _ = _masked_lm("bert", tokenizer, None)
    mlm.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    assert RetroMAELoss(load_encoder(str(tmp_path / "bert"))).head_lr_factor == 1.0  # the checkpoint's head


def test_auto_stage1_rate_halves_for_an_existing_model_without_a_masked_lm_head(tokenizer, tmp_path):
    mlm, tok, _ = _masked_lm("bert", tokenizer, None)
    mlm.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    headed = load_encoder(str(tmp_path / "bert"))
    assert has_pretrained_head(headed)
    assert (
        stage1_learning_rate("auto", str(tmp_path / "bert"), loaded=headed)
        == PRETRAINED_LEARNING_RATE
        == 1e-4
    )

    _pretrained_looking(tokenizer, tmp_path / "embedding")  # saved without a head, as an embedding model
    headless = load_encoder(str(tmp_path / "embedding"))
    assert not has_pretrained_head(headless)
    assert (
        stage1_learning_rate("auto", str(tmp_path / "embedding"), loaded=headless) == HEADLESS_LEARNING_RATE
    )
    assert HEADLESS_LEARNING_RATE == 5e-5
    assert (
        stage1_learning_rate("auto", str(tmp_path / "embedding")) == 1e-4
    )  # not loaded yet: the checks' value
    assert stage1_learning_rate(3e-4, str(tmp_path / "embedding"), loaded=headless) == 3e-4  # explicit: kept
    assert stage1_learning_rate("auto", "retromae-tiny", loaded=headless) == 1e-3  # a preset keeps its own


def test_the_trainer_gives_the_decoder_and_head_their_learning_rate(tokenizer, windows_for_warmup, tmp_path):
    """pretrain() puts the loss's own weights, and only them, in optimizer groups at factor x the rate."""
    model = _pretrained_looking(tokenizer, tmp_path / "init")
    loss = RetroMAELoss(model, head_warmup_steps=0, head_lr_factor=4)
    groups: list[tuple[float, set[int]]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if not groups:  # the groups' base rates (before the schedule)
                groups.extend(
                    (g.get("initial_lr", g["lr"]), {id(p) for p in g["params"]})
                    for g in optimizer.param_groups
                )

    pretrain(model, windows_for_warmup, tmp_path / "run", loss=loss, batch_size=8, max_steps=1,
             learning_rate=1e-3, warmup_ratio=0.0, save_steps=10, callbacks=[Record()])  # fmt: skip
    own = {id(p) for p in loss.own_parameters()}
    encoder = {id(p) for p in model.parameters()}
    fast = set().union(*(ids for lr, ids in groups if lr == pytest.approx(4e-3)))
    slow = set().union(*(ids for lr, ids in groups if lr == pytest.approx(1e-3)))
    assert fast == own and encoder <= slow and not fast & slow


@pytest.fixture
def windows_for_warmup(tokenizer):
    from conftest import make_texts
    from datasets import Dataset

    from retromae_st.data.tokenize import tokenize_corpus

    dataset, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(24, seed=3)}), tokenizer, max_seq_length=64
    )
    return dataset


def test_left_padding_is_refused(tiny_model):
    tiny_model.tokenizer.padding_side = "left"
    try:
        with pytest.raises(UserInputError, match=r"padding_side='left'.*padding_side = \"right\""):
            RetroMAELoss(tiny_model)
        tiny_model.tokenizer.padding_side = "right"
        loss = RetroMAELoss(tiny_model)
        tiny_model.tokenizer.padding_side = "left"  # changed after the loss was built
        with pytest.raises(UserInputError, match="padding_side"):
            loss([features_of(tiny_model, REPETITIVE[:2])])
    finally:
        tiny_model.tokenizer.padding_side = "right"


def test_h_is_the_retrieval_vector_after_normalize(tokenizer, tmp_path, caplog):
    """Mean pooling + Normalize (an embedding model like all-MiniLM-L6-v2): the decoder reads the unit vector
    encode() returns, and says so at INFO, not as a warning."""
    base = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    model = SentenceTransformer(modules=[base[0], Pooling(TINY.hidden, "mean"), Normalize()])
    with caplog.at_level(logging.INFO, logger="retromae_st.pretraining.loss"):
        loss = RetroMAELoss(model)
    records = [r for r in caplog.records if r.name == "retromae_st.pretraining.loss"]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert any("mean pooling then Normalize" in r.getMessage() for r in records)

    seen = []
    original = loss._enhanced

    def spy(adapter, content, sentence_embedding, visible):
        seen.append(sentence_embedding.detach())
        return original(adapter, content, sentence_embedding, visible)

    loss._enhanced = spy
    loss.callback_attached = True
    features = features_of(model, REPETITIVE[:4])
    loss.eval()
    model.eval()
    with torch.no_grad():
        loss([features])
        expected = model(dict(features))["sentence_embedding"]  # unmasked input: same pipeline of modules
    h = torch.cat(seen)
    assert torch.allclose(h.norm(dim=-1), torch.ones(len(h)), atol=1e-5)
    # Same vector space as encode(): h of the masked text points the way the text's embedding does.
    assert torch.nn.functional.cosine_similarity(h, expected).min() > 0.5


def test_a_sentence_embedding_of_another_size_is_refused(tokenizer, tmp_path):
    base = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    dense = Dense(TINY.hidden, 16)
    model = SentenceTransformer(modules=[base[0], Pooling(TINY.hidden, "mean"), dense])
    with pytest.raises(UserInputError, match="hidden size 32"):
        RetroMAELoss(model)


def test_head_warmup_option_in_recipe_and_cli():
    assert RetroMAEOptions().head_warmup_steps == "auto"
    assert RetroMAEOptions(head_warmup_steps=7).head_warmup_steps == 7
    parser = build_parser()
    common = ["pretrain", "--model", "retromae-tiny", "--corpus", "c.txt", "--output", "o"]
    assert parser.parse_args(common).head_warmup_steps == "auto"
    assert parser.parse_args([*common, "--head-warmup-steps", "0"]).head_warmup_steps == 0
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--head-warmup-steps", "soon"])
    assert RetroMAEOptions().head_lr_factor == "auto"
    assert RetroMAEOptions(head_lr_factor=3).head_lr_factor == 3
    assert parser.parse_args(common).head_lr_factor == "auto"
    assert parser.parse_args([*common, "--head-lr-factor", "2.5"]).head_lr_factor == 2.5
    for bad in ("0", "-1", "fast"):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, "--head-lr-factor", bad])


def test_transformer_module_is_found_when_loaded_from_a_plain_checkpoint(tokenizer, tmp_path):
    """A plain transformers folder loads as Transformer + Pooling('cls'): the head is looked up in that folder."""
    mlm, tok, _ = _masked_lm("bert", tokenizer, None)
    mlm.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model = load_encoder(str(tmp_path / "bert"))
    assert isinstance(model[0], Transformer)
    assert str(tmp_path / "bert") in RetroMAELoss(model).head_source


def test_auto_warmup_ends_once_both_losses_are_below_half_of_uniform_and_resumes_so(tokenizer, tmp_path):
    model = _pretrained_looking(tokenizer, tmp_path / "init")
    torch.manual_seed(0)
    loss = RetroMAELoss(model)
    # Half of ln(V) takes a frozen tiny encoder far more steps than a test may: end at 0.9 ln(V) here
    # (the rule itself at the default share: test_auto_warmup_end_rule).
    loss.AUTO_HEAD_WARMUP_END = 0.9
    loss.callback_attached = True
    features = features_of(model, REPETITIVE)
    optimizer = torch.optim.AdamW(loss.own_parameters(), lr=2e-2)
    for step in range(1, 51):
        loss.current_step = step
        parts = loss([features])
        optimizer.zero_grad()
        torch.stack(list(parts.values())).sum().backward()
        optimizer.step()
        if loss.head_warmup_ended is not None:
            break
    ended = loss.head_warmup_ended
    assert ended is not None and ended < loss.head_warmup_limit
    assert max(parts["encoder_mlm"].item(), parts["decoder"].item()) < 0.9 * math.log(len(tokenizer))
    assert loss.encoder_frozen(ended) and not loss.encoder_frozen(ended + 1)
    # A resumed run reads where the warm-up ended from the checkpoint and does not freeze the encoder again.
    loss.save_own_weights(tmp_path / "checkpoint")
    resumed = RetroMAELoss(model)
    resumed.load_own_weights(tmp_path / "checkpoint")
    assert resumed.head_warmup_ended == ended and not resumed.encoder_frozen(ended + 1)


def test_head_names_of_original_bert_checkpoints_and_shape_mismatch():
    from retromae_st.pretraining.heads import MLMHead, pretrained_head_state

    expected = MLMHead(4, 10).state_dict()
    tensors = {
        "cls.predictions.transform.dense.weight": torch.ones(4, 4),
        "cls.predictions.transform.dense.bias": torch.ones(4),
        "cls.predictions.transform.LayerNorm.gamma": torch.full((4,), 2.0),  # bert-base-uncased's names
        "cls.predictions.transform.LayerNorm.beta": torch.ones(4),
        "cls.predictions.bias": torch.ones(10),
    }
    state, layout = pretrained_head_state(tensors, expected)
    assert layout == "bert" and torch.equal(state["layer_norm.weight"], torch.full((4,), 2.0))
    tensors["cls.predictions.bias"] = torch.ones(12)  # another vocabulary: not this model's head
    assert pretrained_head_state(tensors, expected) is None

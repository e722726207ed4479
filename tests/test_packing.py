"""Packing: the encoder run on the real tokens only gives the length-group step's losses and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_texts
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from retromae_st.errors import UserInputError
from retromae_st.models import Preset, build_model
from retromae_st.pretraining import packing
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.unpadding import plan_length_groups

ARCHITECTURES = ["bert", "roberta", "modernbert", "distilbert", "electra"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _byte_level_tokenizer(texts):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(texts, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizerFast(tokenizer_object=raw._tokenizer, model_max_length=64)


def _transformer(arch: str, wordpiece, texts, folder) -> Transformer:
    """A tiny random encoder of ``arch`` as a Sentence-Transformers ``Transformer`` module."""
    import transformers as tf

    tok = _byte_level_tokenizer(texts) if arch == "roberta" else wordpiece
    if arch == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=len(tok), max_position_embeddings=64, **SMALL))
    elif arch == "roberta":
        config = tf.RobertaConfig(
            vocab_size=len(tok), max_position_embeddings=66, pad_token_id=tok.pad_token_id, **SMALL
        )
        model = tf.RobertaModel(config)
    elif arch == "modernbert":
        # Layer 0 global, layer 1 local with a window (8) shorter than the rows: sliding masks are checked.
        config = tf.ModernBertConfig(
            vocab_size=len(tok),
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id,
            global_attn_every_n_layers=2,
            local_attention=8,
            **SMALL,
        )
        model = tf.ModernBertModel(config)
        assert config.layer_types == ["full_attention", "sliding_attention"]
    elif arch == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
        model = tf.DistilBertModel(config)
    elif arch == "electra":
        config = tf.ElectraConfig(vocab_size=len(tok), embedding_size=32, max_position_embeddings=64, **SMALL)
        model = tf.ElectraModel(config)
    else:  # pragma: no cover - parametrisation guard
        raise AssertionError(arch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Transformer(str(folder), max_seq_length=40)


@pytest.fixture(scope="module")
def transformers_by_arch(tokenizer, texts, tmp_path_factory) -> dict[str, Transformer]:
    torch.manual_seed(0)
    return {
        arch: _transformer(arch, tokenizer, texts, tmp_path_factory.mktemp(arch)) for arch in ARCHITECTURES
    }


def _model(transformer: Transformer, pooling: str) -> SentenceTransformer:
    dimension = transformer.get_embedding_dimension()
    if pooling == "cls":
        return SentenceTransformer(modules=[transformer, Pooling(dimension, "cls")])
    return SentenceTransformer(modules=[transformer, Pooling(dimension, "mean"), Normalize()])


def _features(model: SentenceTransformer, longest_first: bool = False) -> dict[str, torch.Tensor]:
    """A right-padded batch of mixed lengths (3 to 40 tokens, some truncated to the full width).

    ``longest_first``: rows in falling length, so the stream ends with short rows whose buckets are padded
    past the stream's last token.
    """
    texts = sorted(make_texts(24, seed=3), key=len)[::3] + ["index", " ".join(make_texts(3, seed=5))]
    features = {k: v for k, v in model.preprocess(texts).items() if torch.is_tensor(v)}
    lengths = features["attention_mask"].sum(dim=1)
    if longest_first:
        order = lengths.argsort(descending=True, stable=True)
        features, lengths = {k: v[order] for k, v in features.items()}, lengths[order]
    assert lengths.min() < 8 and lengths.max() == features["attention_mask"].shape[1]  # mixed, with padding
    return features


def _step(model: SentenceTransformer, features, packed: bool, options: dict):
    """One forward + backward with fixed seeds (same masks on both paths); losses, gradients, diagnostics."""
    torch.manual_seed(0)
    loss = RetroMAELoss(model, packed=packed, **options)
    loss.eval()  # no dropout; masking still draws from the RNG, the same draws on both paths
    model.zero_grad(set_to_none=True)
    loss.request_diagnostics()
    torch.manual_seed(1)
    parts = loss([features])
    sum(parts.values()).backward()
    grads = {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in parts.items()}, grads, loss.last_diagnostics


@pytest.fixture
def packed_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Records the query shape of every packed attention call."""
    calls = []

    def spy(module, query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return packing.packed_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, packing.PACKED_ATTENTION, spy)
    return calls


@pytest.mark.parametrize(
    ("pooling", "options"),
    [
        ("cls", {}),
        ("cls", {"decoding": "basic"}),
        ("cls", {"bow_weight": 0.1}),
        ("mean", {"bow_weight": 0.1, "mean_mix_start": 0.5}),
        ("mean", {"decoding": "basic"}),
    ],
    ids=["enhanced", "basic", "dupmae", "mean-normalize-dupmae-mix", "mean-normalize-basic"],
)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_step_equals_the_length_group_step(transformers_by_arch, arch, pooling, options, packed_calls):
    model = _model(transformers_by_arch[arch], pooling)
    features = _features(model)
    config = transformers_by_arch[arch].auto_model.config
    implementation = config._attn_implementation
    assert len(plan_length_groups(features["attention_mask"], RetroMAELoss.DEFAULT_LENGTH_GROUPS, 32)) > 1

    grouped, grouped_grads, grouped_diagnostics = _step(model, features, False, options)
    assert not packed_calls
    packed, packed_grads, packed_diagnostics = _step(model, features, True, options)

    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers
    real = int(features["attention_mask"].sum())
    assert packed_calls == [(1, 2, real, 16)] * layers  # one packed stream of the real tokens per layer
    assert config._attn_implementation == implementation  # switched back after the call
    assert (
        packed.keys()
        == grouped.keys()
        == {"encoder_mlm", "decoder"} | ({"bow"} if options.get("bow_weight") else set())
    )
    for name in grouped:
        assert packed[name] == pytest.approx(grouped[name], rel=1e-5, abs=1e-6), name
    assert packed_grads.keys() == grouped_grads.keys()
    assert any(name.startswith("model.") for name in packed_grads)
    for name in grouped_grads:
        torch.testing.assert_close(packed_grads[name], grouped_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in grouped_diagnostics:
        assert packed_diagnostics[name] == pytest.approx(grouped_diagnostics[name], abs=2e-4), name


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_packed_step_equals_the_length_group_step_when_short_rows_end_the_stream(transformers_by_arch, arch):
    """Transformers >= 5.25 turns packed position ids into a same-row mask function; it is evaluated at the
    stream positions each bucket really gathered, also for a short last row padded past the stream's end
    (where evaluating it at start + offset indexed past the stream: IndexError)."""
    model = _model(transformers_by_arch[arch], "cls")
    features = _features(model, longest_first=True)
    grouped, grouped_grads, _ = _step(model, features, False, {})
    packed, packed_grads, _ = _step(model, features, True, {})
    for name in grouped:
        assert packed[name] == pytest.approx(grouped[name], rel=1e-5, abs=1e-6), name
    for name in grouped_grads:
        torch.testing.assert_close(packed_grads[name], grouped_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_stay_apart(transformers_by_arch):
    """A row's token states do not depend on the other rows of the batch (no attention across rows)."""
    transformer = transformers_by_arch["bert"]
    model = _model(transformer, "cls").eval()
    features = _features(model)
    lengths = features["attention_mask"].sum(dim=1)

    def token_states(batch_features):
        rows = packing.pack_rows(batch_features["attention_mask"], hidden_size=32)
        inputs = packing.pack_inputs(batch_features, batch_features["input_ids"], rows)
        with torch.no_grad(), packing.packed_call(transformer, rows, batch_features, inputs):
            return model(inputs)["token_embeddings"]

    together = token_states(features)
    for row in (0, len(lengths) - 1):
        alone = token_states({k: v[row : row + 1, : int(lengths[row])] for k, v in features.items()})
        torch.testing.assert_close(together[row, : int(lengths[row])], alone[0], rtol=1e-4, atol=1e-5)
        assert not together[row, int(lengths[row]) :].any()  # zeros at padding


def test_pack_rows_covers_every_token_once():
    lengths = [40, 3, 17, 40, 1, 25, 9]
    mask = (torch.arange(40).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    rows = packing.pack_rows(mask, max_buckets=3, hidden_size=32)
    assert rows.tokens == sum(lengths) and 1 < len(rows.buckets) <= 3
    assert rows.cu_seq_lens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    gathered = torch.cat([bucket.index[bucket.valid] for bucket in rows.buckets])
    assert sorted(gathered.tolist()) == list(range(sum(lengths)))
    assert torch.equal(rows.gather[rows.inverse], torch.arange(sum(lengths)))  # each token's own slot
    assert rows.gather.numel() == sum(bucket.slots for bucket in rows.buckets)
    stream = torch.arange(1, sum(lengths) + 1, dtype=torch.float).view(1, -1, 1)
    padded = packing.unpack(stream, rows)[..., 0]  # [B, L]
    assert torch.equal(padded != 0, mask.bool())
    assert padded[2, :17].tolist() == list(range(3 + 40 + 1, 3 + 40 + 18))
    with pytest.raises(ValueError, match="right-padded"):
        packing.pack_rows(mask.flip(1))


def test_an_encoder_that_ignores_the_packed_attention_is_refused(transformers_by_arch, monkeypatch):
    """Stock attention over the stream would let rows attend to each other: the call must fail loudly."""
    model = _model(transformers_by_arch["bert"], "cls")
    monkeypatch.setitem(AttentionInterface._global_mapping, packing.PACKED_ATTENTION, sdpa_attention_forward)
    loss = RetroMAELoss(model, packed=True)
    with pytest.raises(RuntimeError, match="did not call the packed attention"):
        loss([_features(model)])
    assert transformers_by_arch["bert"].auto_model.config._attn_implementation != packing.PACKED_ATTENTION


def test_unpadded_batches_and_refusals_run_as_length_groups(tiny_model, packed_calls, caplog):
    features = {k: v for k, v in tiny_model.preprocess(["index search"] * 4).items() if torch.is_tensor(v)}
    assert features["attention_mask"].all()
    RetroMAELoss(tiny_model, packed=True)([features])
    assert not packed_calls  # no padding: nothing to pack

    loss = RetroMAELoss(tiny_model, packed=True, compile=True)
    assert loss.packing_refused is not None and "compile" in caplog.text
    assert RetroMAELoss(tiny_model, packed="auto").packing_refused is None
    assert RetroMAELoss(tiny_model, packed="auto").get_config_dict()["packed"] == "auto"
    assert RetroMAELoss(tiny_model).get_config_dict()["packed"] == "auto"


@pytest.mark.parametrize(("hidden", "packs"), [(128, False), (256, True)])
def test_auto_packs_on_cpu_from_hidden_size_256(tokenizer, tmp_path, packed_calls, hidden, packs):
    """The default ``packed="auto"`` packs where it was measured to pay on CPU (hidden >= 256), silently
    runs length groups below it, and packs at any size on CUDA."""
    preset = Preset(layers=1, hidden=hidden, heads=2, intermediate=2 * hidden, max_positions=64)
    model = build_model(preset, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    loss = RetroMAELoss(model)
    assert loss.packing_refused is None  # BERT can pack; "auto" decides per call
    loss([_features(model)])
    assert bool(packed_calls) is packs
    assert packing.packing_pays(hidden, torch.device("cuda"))


def test_unknown_architectures_run_as_length_groups(tiny_model, monkeypatch, packed_calls):
    monkeypatch.setattr(packing, "PACKABLE", frozenset({"roberta"}))
    assert "bert" in packing.packable(tiny_model[0].auto_model)
    loss = RetroMAELoss(tiny_model, packed=True)
    assert loss.packing_refused is not None
    loss([_features(tiny_model)])
    assert not packed_calls


def test_invalid_packed_option_is_refused(tiny_model):
    with pytest.raises(UserInputError, match="packed"):
        RetroMAELoss(tiny_model, packed="always")


def test_activation_checkpointing_runs_as_length_groups(tiny_model, packed_calls):
    """Checkpointed layers recompute in backward, after the packed call: that must not run packed."""
    tiny_model[0].auto_model.activation_checkpointing_enable()
    loss = RetroMAELoss(tiny_model, packed=True)
    assert "checkpointing" in loss.packing_refused
    loss([_features(tiny_model)])["decoder"].backward()
    assert not packed_calls


def test_flash_varlen_path_gets_the_row_offsets(transformers_by_arch, monkeypatch):
    """Where flash-attn serves the call (CUDA), transformers' varlen path must get cu_seq_lens and no
    mask. Checked here with a stand-in for flash_attention_2 that attends row by row from those offsets."""
    seen = []

    def varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert attention_mask is None and query.shape[0] == 1 and "packed_rows" not in kwargs
        offsets = kwargs["cu_seq_lens_q"].tolist()
        assert kwargs["cu_seq_lens_k"].tolist() == offsets and offsets[-1] == query.shape[2]
        assert kwargs["max_length_q"] == max(b - a for a, b in zip(offsets, offsets[1:]))
        seen.append(offsets)
        rows = [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scaling
            )
            for a, b in zip(offsets, offsets[1:])
        ]
        return torch.cat(rows, dim=2).transpose(1, 2), None  # [1, T, H, d]

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", varlen)
    monkeypatch.setattr(packing, "_flash_varlen_available", lambda model, device: True)
    model = _model(transformers_by_arch["bert"], "cls")
    features = _features(model)
    grouped, grouped_grads, _ = _step(model, features, False, {})
    packed, packed_grads, _ = _step(model, features, True, {})
    assert len(seen) == 2  # both layers, through the varlen path
    for name in grouped:
        assert packed[name] == pytest.approx(grouped[name], rel=1e-5, abs=1e-6), name
    for name in grouped_grads:
        torch.testing.assert_close(packed_grads[name], grouped_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_reaches_the_loss_from_the_cli_and_from_recipes():
    """``pretrain --packed`` and the recipe key ``pretrain.loss.packed`` become ``RetroMAELoss(packed=True)``."""
    from retromae_st.cli import _loss_kwargs, build_parser
    from retromae_st.recipes import RetroMAEOptions

    parse = build_parser().parse_args
    common = ["pretrain", "--model", "retromae-tiny", "--corpus", "c.txt", "--output", "o"]
    assert _loss_kwargs(parse([*common, "--packed"]))["packed"] is True
    assert _loss_kwargs(parse([*common, "--packed", "false"]))["packed"] is False
    assert _loss_kwargs(parse([*common, "--packed", "auto"]))["packed"] == "auto"
    assert _loss_kwargs(parse(common))["packed"] == "auto"
    with pytest.raises(SystemExit):
        parse([*common, "--packed", "always"])
    assert RetroMAEOptions(packed=True).model_dump()["packed"] is True
    assert RetroMAEOptions().model_dump()["packed"] == "auto"

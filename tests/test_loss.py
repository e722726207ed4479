"""RetroMAELoss: it learns, it runs on every supported architecture, and it refuses bad options."""

from __future__ import annotations

import math

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

from retromae_st.pretraining import heads
from retromae_st.pretraining.heads import ChunkedLinearCrossEntropy, ChunkedMaxPooledLogits
from retromae_st.pretraining.loss import NonFiniteLossError, RetroMAELoss

REPETITIVE = [
    "the package provides a library for parsing configuration files",
    "this module implements a fast database storage engine",
    "a python client for the network server protocol",
    "kernel driver for the storage device with memory support",
] * 8


def features_of(model: SentenceTransformer, texts: list[str]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.preprocess(texts).items() if torch.is_tensor(value)}


def train_steps(loss: RetroMAELoss, features, steps: int, lr: float = 2e-3) -> list[dict[str, float]]:
    loss.callback_attached = True
    optimizer = torch.optim.AdamW(loss.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        parts = loss([features])
        optimizer.zero_grad()
        torch.stack(list(parts.values())).sum().backward()
        optimizer.step()
        history.append({name: value.item() for name, value in parts.items()})
    return history


@pytest.mark.parametrize("options", [{}, {"decoding": "basic"}, {"bow_weight": 0.1}])
def test_loss_decreases_on_repetitive_corpus(tiny_model, options):
    torch.manual_seed(0)
    loss = RetroMAELoss(tiny_model, **options)
    history = train_steps(loss, features_of(tiny_model, REPETITIVE), steps=60, lr=5e-3)
    components = history[0].keys()
    assert set(components) == {"encoder_mlm", "decoder"} | ({"bow"} if options.get("bow_weight") else set())
    # The bag-of-words loss cannot go below the entropy of the uniform target, ln(distinct ids).
    tokenizer = tiny_model.tokenizer
    distinct = [len(set(tokenizer(text, add_special_tokens=False)["input_ids"])) for text in REPETITIVE]
    floor = {"bow": options.get("bow_weight", 0) * sum(map(math.log, distinct)) / len(distinct)}
    for name in components:
        start = sum(h[name] for h in history[:3]) / 3 - floor.get(name, 0.0)
        end = sum(h[name] for h in history[-3:]) / 3 - floor.get(name, 0.0)
        assert end < 0.75 * start, f"{name} did not fall clearly: {start:.3f} -> {end:.3f} above its floor"


def test_returns_components_and_config(tiny_model):
    loss = RetroMAELoss(tiny_model, encoder_mask_ratio=0.2, decoder_mask_ratio=0.6, decoder_layers=2)
    config = loss.get_config_dict()
    assert config["encoder_mask_ratio"] == 0.2 and config["decoder_layers"] == 2
    assert "retromae" in loss.citation and "2205.12035" in loss.citation
    assert len(loss.decoder.layers) == 2
    # the loss owns its decoder and head, the model keeps only its own parameters
    own = {name for name, _ in loss.own_named_parameters()}
    assert own and all(name.startswith(("decoder.", "head.")) for name in own)
    model_params = {id(p) for p in tiny_model.parameters()}
    assert not any(id(p) in model_params for p in loss.own_parameters())


def test_decoder_gradient_reaches_the_sentence_embedding(tiny_model):
    """The decoder loss alone must train the encoder through h (the point of RetroMAE)."""
    loss = RetroMAELoss(tiny_model)
    parts = loss([features_of(tiny_model, REPETITIVE[:4])])
    parts["decoder"].backward()
    encoder_layers = tiny_model[0].auto_model.encoder.layer
    assert encoder_layers[-1].output.dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("encoder_mask_ratio", 0.0),
        ("encoder_mask_ratio", 1.0),
        ("encoder_mask_ratio", -0.1),
        ("decoder_mask_ratio", 0.0),
        ("decoder_mask_ratio", 1.0),
        ("decoder_mask_ratio", "half"),
        ("decoding", "fancy"),
        ("decoder_layers", 0),
        ("decoder_layers", 1.5),
        ("decoder_heads", 3),
        ("decoder_heads", 0),
        ("bow_weight", -1.0),
        ("bow_weight", float("nan")),
        ("query_stream", "other"),
        ("chunk_rows", 0),
    ],
)
def test_invalid_options_raise_naming_the_option(tiny_model, option, value):
    with pytest.raises(ValueError, match=option):
        RetroMAELoss(tiny_model, **{option: value})


def test_two_text_columns_are_refused(tiny_model):
    loss = RetroMAELoss(tiny_model)
    features = features_of(tiny_model, REPETITIVE[:2])
    with pytest.raises(ValueError, match="one text column"):
        loss([features, features])


def test_non_finite_loss_names_the_component_and_step(tiny_model):
    loss = RetroMAELoss(tiny_model)
    loss.current_step = 7
    with torch.no_grad():
        loss.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"'encoder_mlm'.*step 7"):
        loss([features_of(tiny_model, REPETITIVE[:2])])


@pytest.mark.parametrize("padding", [0, 6], ids=["cpu", "vocab-padded-as-on-cuda"])
def test_chunked_cross_entropy_matches_full(monkeypatch, padding):
    monkeypatch.setattr(heads, "vocab_padding", lambda device, vocab: padding)
    torch.manual_seed(0)
    x = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    chunked = ChunkedLinearCrossEntropy.apply(x, weight, bias, labels, 5)
    grads = torch.autograd.grad(chunked * 3.0, (x, weight, bias))
    full = torch.nn.functional.cross_entropy(x @ weight.t() + bias, labels)
    expected = torch.autograd.grad(full * 3.0, (x, weight, bias))
    assert torch.allclose(chunked, full, atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("grad_w_product", ["fp32", "compute-dtype"])
def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_fp32(monkeypatch, grad_w_product):
    """Under CPU autocast the vocabulary products run in bf16 (the table cast once per call); the loss and
    the gradients stay within bf16 rounding of fp32 and keep their inputs' dtypes. ``compute-dtype``: the
    CUDA path, d/dW formed as a bf16 product per chunk and summed in fp32, the vocabulary padded to a
    multiple of 64 (forced here on the CPU)."""
    cuda_policy = grad_w_product == "compute-dtype"
    monkeypatch.setattr(heads, "grad_w_in_compute_dtype", lambda device: cuda_policy)
    monkeypatch.setattr(heads, "vocab_padding", lambda device, vocab: -vocab % 64 if cuda_policy else 0)
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    weight = (0.3 * torch.randn(200, 16)).requires_grad_()
    bias = torch.randn(200, requires_grad=True)
    labels = torch.randint(0, 200, (37,))
    full = torch.nn.functional.cross_entropy(x @ weight.t() + bias, labels)
    expected = torch.autograd.grad(full, (x, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = ChunkedLinearCrossEntropy.apply(x, weight, bias, labels, 8)
    grads = torch.autograd.grad(chunked, (x, weight, bias))
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - full.item()) < 0.02 * full.item()
    for got, want, tensor in zip(grads, expected, (x, weight, bias)):
        assert got.dtype == tensor.dtype
        assert (got - want).norm() < 0.03 * want.norm()


def test_chunk_rows_default_per_device(tiny_model):
    """Larger chunks on CUDA (a GPU needs more work per kernel), the CPU's on the CPU; a given value wins."""
    vocab = tiny_model[0].auto_model.config.vocab_size
    assert heads.default_chunk_rows(30522, "cuda") > 10 * heads.default_chunk_rows(30522, "cpu")
    assert heads.vocab_padding("cuda", 30522) == 6 and heads.vocab_padding("cuda", 30528) == 0
    assert heads.vocab_padding("cpu", 30522) == 0
    loss = RetroMAELoss(tiny_model)
    assert loss._chunk_rows_for(torch.device("cpu")) == heads.default_chunk_rows(vocab, "cpu")
    assert loss._chunk_rows_for(torch.device("cuda")) == heads.default_chunk_rows(vocab, "cuda")
    given = RetroMAELoss(tiny_model, chunk_rows=7)
    assert given._chunk_rows_for(torch.device("cuda")) == given._chunk_rows_for(torch.device("cpu")) == 7


@pytest.mark.parametrize(
    "sizes, weights",
    [((7, 30), (1.0, 1.0)), ((7, 30), (2.0, 0.5)), ((0, 37), (1.0, 3.0)), ((30, 7), (0.25, 0.25))],
    ids=["plain-sum", "weighted", "empty-segment", "equal-weights"],
)
def test_segmented_cross_entropy_equals_one_loss_per_segment(sizes, weights):
    """Segments: one call, one mean per segment. Loss values and gradients equal separate full
    cross-entropies weighted as the caller weights them (unequal weights take the recomputing path);
    chunks of 5 rows straddle the segment boundary."""
    torch.manual_seed(0)
    x = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    means = ChunkedLinearCrossEntropy.apply(x, weight, bias, labels, 5, sizes)
    scale = torch.tensor(weights)
    grads = torch.autograd.grad((means * scale).sum(), (x, weight, bias))
    expected_means, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        logits = x[rows] @ weight.t() + bias
        expected_means.append(
            torch.nn.functional.cross_entropy(logits, labels[rows]) if size else logits.sum() * 0.0
        )
        start += size
    expected_means = torch.stack(expected_means)
    expected = torch.autograd.grad((expected_means * scale).sum(), (x, weight, bias))
    assert means.shape == (len(sizes),)
    assert torch.allclose(means, expected_means, atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_joint_head_losses_may_be_scaled_in_place():
    """The joint call's losses are plain views, so ``loss *= weight`` works, and gives the weighted gradient."""
    torch.manual_seed(0)
    head, weight = heads.MLMHead(8, 50), torch.randn(50, 8, requires_grad=True)
    parts = [(torch.randn(5, 8), torch.randint(0, 50, (5,))), (torch.randn(9, 8), torch.randint(0, 50, (9,)))]
    encoder, decoder = head.losses(parts, weight, 4)
    encoder *= 2.0
    (encoder + decoder).backward()
    joint, weight.grad = weight.grad.clone(), None
    encoder, decoder = head.losses(parts, weight, 4, joint=False)
    (2.0 * encoder + decoder).backward()
    assert torch.allclose(joint, weight.grad, atol=1e-6)


def test_retromae_loss_joint_head_call_equals_one_call_per_loss(tiny_model, monkeypatch):
    """On the CPU both MLM losses share one vocabulary-wide call; the losses and every gradient equal one
    call per loss (the GPU's path)."""
    features = features_of(tiny_model, REPETITIVE[:4])

    def losses_and_grads() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        loss = RetroMAELoss(tiny_model)
        loss.callback_attached = True
        loss.zero_grad(set_to_none=True)
        parts = loss([features])
        torch.stack(list(parts.values())).sum().backward()
        grads = {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in parts.items()}, grads

    joint_losses, joint_grads = losses_and_grads()
    original = heads.MLMHead.losses
    monkeypatch.setattr(
        heads.MLMHead,
        "losses",
        lambda self, parts, w, rows, joint=True: original(self, parts, w, rows, False),
    )
    separate_losses, separate_grads = losses_and_grads()
    assert joint_losses.keys() == separate_losses.keys() == {"encoder_mlm", "decoder"}
    for name in joint_losses:
        assert torch.allclose(joint_losses[name], separate_losses[name], atol=1e-6)
    assert joint_grads.keys() == separate_grads.keys()
    assert any("word_embeddings" in name for name in joint_grads)
    for name in joint_grads:
        assert torch.allclose(joint_grads[name], separate_grads[name], atol=1e-6), name


def test_sparse_lookup_gradients_leave_every_gradient_as_dense_ones(tiny_model):
    """On the CPU the word-embedding lookups give sparse gradients during the loss's forward: the table's
    .grad stays dense (the tied head's d/dW absorbs them) and every gradient equals the dense lookups' to
    float tolerance; the module is left as it was."""
    features = features_of(tiny_model, REPETITIVE[:4])
    table = RetroMAELoss(tiny_model).encoder().word_embeddings
    seen: list[bool] = []
    hook = table.register_forward_pre_hook(lambda module, args: seen.append(module.sparse))

    def grads(sparse: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        loss = RetroMAELoss(tiny_model)
        loss.callback_attached = True
        loss.zero_grad(set_to_none=True)
        # forward() switches the lookups to sparse gradients; _forward() is the same step without it.
        table_weight = loss.encoder().word_embeddings.weight
        parts = loss([features]) if sparse else loss._forward([features], table_weight)
        torch.stack(list(parts.values())).sum().backward()
        return {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}

    sparse = grads(True)
    assert seen and all(seen) and not table.sparse  # sparse during the forward only
    seen.clear()
    dense = grads(False)
    assert seen and not any(seen)
    hook.remove()
    name = next(name for name in sparse if name.endswith("word_embeddings.weight"))
    assert sparse[name].layout == torch.strided
    assert sparse.keys() == dense.keys()
    for key in sparse:
        assert torch.allclose(sparse[key], dense[key], atol=1e-6), key


def test_head_gradient_buffer_becomes_the_table_gradient(tiny_model, monkeypatch):
    """On the CPU the tied head's d/dW buffer is the table's .grad after backward: the lookups' sparse rows
    were added into it in place, not into a fresh [V, D] copy. Autograd does that only when the dense
    d/dW arrives after the sparse rows (sparse_lookup_gradients' identity node)."""
    features = features_of(tiny_model, REPETITIVE[:4])
    buffers: list[int] = []
    original = heads._chunked_pass

    def recording(*args, **kwargs):
        totals, grads = original(*args, **kwargs)
        if grads is not None:
            buffers.append(grads[1].data_ptr())  # d/dW [V, D]
        return totals, grads

    monkeypatch.setattr(heads, "_chunked_pass", recording)
    loss = RetroMAELoss(tiny_model)
    loss.callback_attached = True
    loss.zero_grad(set_to_none=True)
    torch.stack(list(loss([features]).values())).sum().backward()
    table = loss.encoder().word_embeddings.weight
    assert len(buffers) == 1  # one joint head call
    assert table.grad.layout == torch.strided
    assert table.grad.data_ptr() == buffers[0]


def test_chunked_cross_entropy_refuses_a_second_backward():
    x = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss = ChunkedLinearCrossEntropy.apply(x, weight, torch.zeros(10), torch.randint(0, 10, (6,)), 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunked_max_pool_matches_full():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    valid = torch.rand(3, 11) > 0.3
    valid[:, 1] = True
    pooled = ChunkedMaxPooledLogits.apply(x, weight, bias, valid, 4)
    upstream = torch.randn_like(pooled)
    grads = torch.autograd.grad((pooled * upstream).sum(), (x, weight, bias))
    logits = (x @ weight.t() + bias).masked_fill(~valid.unsqueeze(-1), float("-inf"))
    full = logits.max(dim=1).values
    expected = torch.autograd.grad((full * upstream).sum(), (x, weight, bias))
    assert torch.allclose(pooled, full, atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-4)


def test_chunked_max_pool_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 8)
    weight = torch.randn(20, 8)
    bias = torch.randn(20)
    valid = torch.ones(3, 11, dtype=torch.bool)
    full = ChunkedMaxPooledLogits.apply(x, weight, bias, valid, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = ChunkedMaxPooledLogits.apply(x, weight, bias, valid, 4)
    assert pooled.dtype == torch.float32
    assert (pooled - full).abs().max() < 0.05 * full.abs().max()


# -- architectures -------------------------------------------------------------------------------------


def _byte_level_tokenizer(texts, folder):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(texts, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizerFast(tokenizer_object=raw._tokenizer, model_max_length=64)


def _sentencepiece_tokenizer(texts, folder):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaTokenizerFast

    raw = SentencePieceUnigramTokenizer()
    raw.train_from_iterator(texts, vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return XLMRobertaTokenizerFast(tokenizer_object=raw._tokenizer, model_max_length=64)


def _encoder(arch: str, tokenizer, wordpiece, texts, folder) -> SentenceTransformer:
    import transformers as tf

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if arch in ("roberta", "xlm-roberta"):
        tok = (_byte_level_tokenizer if arch == "roberta" else _sentencepiece_tokenizer)(texts, folder)
        config_class = tf.RobertaConfig if arch == "roberta" else tf.XLMRobertaConfig
        config = config_class(
            vocab_size=len(tok), max_position_embeddings=66, pad_token_id=tok.pad_token_id, **small
        )
        model = (tf.RobertaModel if arch == "roberta" else tf.XLMRobertaModel)(config)
    else:
        tok = wordpiece
        if arch == "bert":
            model = tf.BertModel(tf.BertConfig(vocab_size=len(tok), max_position_embeddings=64, **small))
        elif arch == "distilbert":
            config = tf.DistilBertConfig(
                vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
            )
            model = tf.DistilBertModel(config)
        elif arch == "modernbert":
            config = tf.ModernBertConfig(
                vocab_size=len(tok),
                max_position_embeddings=64,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                cls_token_id=tok.cls_token_id,
                sep_token_id=tok.sep_token_id,
                global_attn_every_n_layers=1,
                **small,
            )
            model = tf.ModernBertModel(config)
        elif arch == "electra":
            config = tf.ElectraConfig(
                vocab_size=len(tok), embedding_size=32, max_position_embeddings=64, **small
            )
            model = tf.ElectraModel(config)
        else:  # pragma: no cover - parametrisation guard
            raise AssertionError(arch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=32)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "cls")])


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "electra"])
def test_each_architecture_trains(arch, tokenizer, texts, tmp_path):
    torch.manual_seed(0)
    model = _encoder(arch, tokenizer, tokenizer, texts, tmp_path / arch)
    loss = RetroMAELoss(model, bow_weight=0.1)
    features = features_of(model, REPETITIVE[:8])
    history = train_steps(loss, features, steps=12, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["decoder"] < history[0]["decoder"]
    if arch == "modernbert":  # rotary encoders get a decoder-owned position table
        assert loss.decoder.position_embeddings is not None
    else:
        assert loss.decoder.position_embeddings is None


def test_unsupported_encoder_names_the_architecture(tmp_path, tokenizer):
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    AlbertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    transformer = Transformer(str(tmp_path))
    model = SentenceTransformer(modules=[transformer, Pooling(32, "cls")])
    with pytest.raises(ValueError, match="AlbertModel"):
        RetroMAELoss(model)


def test_decoder_dropouts_follow_the_encoder_config(tiny_model):
    """Presets drop attention dropout (fused CPU attention); the decoder copies both rates."""
    config = tiny_model[0].auto_model.config
    assert config.attention_probs_dropout_prob == 0.0 and config.hidden_dropout_prob == 0.1
    layer = RetroMAELoss(tiny_model).decoder.layers[0]
    assert layer.attention.dropout == config.attention_probs_dropout_prob
    assert layer.dropout.p == config.hidden_dropout_prob

"""The model: parity with the released implementation, padding, RoPE, heads, I/O."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from neobert import (
    NeoBERTConfig,
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTForTokenClassification,
    NeoBERTModel,
)
from neobert.modeling_neobert import apply_rope, flash_attn_varlen_func, rope_cos_sin


# --------------------------------------------------------------------------------------
# An independent, naive re-statement of the released forward pass (complex-number RoPE,
# explicit softmax attention), used to check shapes other than the fixture's.


def naive_reference(sd: dict, cfg: NeoBERTConfig, input_ids, attention_mask, probabilities=None):
    """(last hidden state, MLM logits, block outputs); appends each block's attention
    probabilities (B, H, L, L) to ``probabilities`` when a list is given."""
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    B, L = input_ids.shape
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    freqs_cis = torch.polar(torch.ones(L, D // 2), torch.outer(torch.arange(L).float(), freqs))  # (L, D/2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x):  # (B, L, H, D)
        xc = torch.view_as_complex(x.float().reshape(B, L, H, D // 2, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    x = sd["model.encoder.weight"][input_ids]
    outs = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.transformer_encoder.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        qkv = (h @ sd[p + "qkv.weight"].T).view(B, L, H, 3 * D)
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        q, k = rope(q), rope(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        if probabilities is not None:
            probabilities.append(scores.softmax(-1))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, H * D)
        x = x + attn @ sd[p + "wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        gate, up = (h @ sd[p + "ffn.w12.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ sd[p + "ffn.w3.weight"].T
        outs.append(x)
    last = rms(x, sd["model.layer_norm.weight"])
    return last, last @ sd["decoder.weight"].T + sd["decoder.bias"], outs


def padded_batch(vocab, lengths, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, pad), mask


# --------------------------------------------------------------------------------------
# Parity with the released implementation


@pytest.mark.parametrize("loader", ["auto", "class"])
def test_reference_fixture_parity(reference_dir, loader):
    """Released-layout checkpoint loads directly and reproduces the reference outputs."""
    exp = load_file(reference_dir / "expected.safetensors")
    cls = AutoModelForMaskedLM if loader == "auto" else NeoBERTForMaskedLM
    model = cls.from_pretrained(reference_dir).eval()
    assert isinstance(model, NeoBERTForMaskedLM)
    keep = exp["attention_mask"].bool()
    with torch.no_grad():
        out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"], output_hidden_states=True)
        base = AutoModel.from_pretrained(reference_dir).eval()(exp["input_ids"], exp["attention_mask"])
    torch.testing.assert_close(out.logits[keep], exp["logits"][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(base.last_hidden_state[keep], exp["last_hidden_state"][keep], atol=1e-5, rtol=0)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # embeddings + every block
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(out.hidden_states[i + 1][keep], exp[f"hidden_state_{i}"][keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
        dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=250),  # SwiGLU 166 -> 168
        dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=8, intermediate_size=512),
    ],
)
def test_naive_reference_parity_other_shapes(shape):
    """Random weights (norms too) of several shapes agree with a naive restatement."""
    torch.manual_seed(1)
    cfg = NeoBERTConfig(vocab_size=200, max_length=32, **shape)
    model = NeoBERTForMaskedLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    assert model.model.transformer_encoder[0].ffn.w3.in_features == 8 * math.ceil(int(2 * shape["intermediate_size"] / 3) / 8)
    ids, mask = padded_batch(200, [20, 13, 7])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last, logits, blocks = naive_reference(model.state_dict() | {"decoder.weight": model.decoder.weight, "decoder.bias": model.decoder.bias}, cfg, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], logits[keep], atol=1e-5, rtol=1e-5)
    for i, b in enumerate(blocks):
        torch.testing.assert_close(out.hidden_states[i + 1][keep], b[keep], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Padding, documents, RoPE


def test_padding_invariance(tiny_config):
    """Each sequence of a padded batch equals the sequence run alone, however much padding."""
    model = NeoBERTModel(tiny_config).eval()
    lengths = [17, 5, 11]
    ids, mask = padded_batch(tiny_config.vocab_size, lengths)
    extra = torch.zeros(3, 9, dtype=torch.long)
    with torch.no_grad():
        batched = model(ids, mask).last_hidden_state
        more_padding = model(torch.cat([ids, extra], 1), torch.cat([mask, extra], 1)).last_hidden_state
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n]).last_hidden_state[0]  # no mask: no padding
            torch.testing.assert_close(batched[i, :n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(more_padding[i, :n], alone, atol=1e-5, rtol=1e-5)


def test_document_ids_match_separate_documents(tiny_config):
    """Packed documents (mask of document ids) attend only within themselves, positions restart."""
    model = NeoBERTModel(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 100, (n,), generator=g) for n in (6, 9, 4)]
    packed = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]  # (1, 22) with 3 padding tokens
    doc_ids = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)] + [torch.zeros(3, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(packed, doc_ids).last_hidden_state[0]
        start = 0
        for d in docs:
            alone = model(d[None]).last_hidden_state[0]
            torch.testing.assert_close(out[start : start + len(d)], alone, atol=1e-5, rtol=1e-5)
            start += len(d)


def test_rope_depends_only_on_relative_offset():
    """q.k after RoPE at positions (i, j) equals that at (i + t, j + t)."""
    torch.manual_seed(0)
    D = 16
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def rotated(x, pos):
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), D, 10000.0)
        return apply_rope(x.float(), cos, sin).double()

    for i, j, t in [(0, 5, 7), (3, 1, 100), (10, 10, 2000)]:
        a = (rotated(q, i) * rotated(k, j)).sum()
        b = (rotated(q, i + t) * rotated(k, j + t)).sum()
        assert abs(a - b) < 1e-4
    # and it is not trivially constant: a different offset gives a different product
    assert abs((rotated(q, 0) * rotated(k, 5)).sum() - (rotated(q, 0) * rotated(k, 6)).sum()) > 1e-3


def test_rope_rotates_adjacent_pairs():
    """Pair (x0, x1) rotates by pos * theta^0 as a 2-D rotation; other pairs are slower."""
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0
    cos, sin = rope_cos_sin(torch.tensor([[1]]), 4, 10000.0)
    out = apply_rope(x, cos, sin).flatten()
    torch.testing.assert_close(out, torch.tensor([math.cos(1.0), math.sin(1.0), 0.0, 0.0]))


def test_longer_than_max_length_warns_once(tiny_config):
    model = NeoBERTModel(tiny_config).eval()
    ids = torch.randint(1, 100, (1, tiny_config.max_length * 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(ids).last_hidden_state
            model(ids)
    assert out.shape == (1, 128, 48) and torch.isfinite(out).all()
    assert sum("exceeds max_length" in str(w.message) for w in caught) == 1


# --------------------------------------------------------------------------------------
# Heads and losses


def test_masked_lm_full_logits_by_default_sparse_on_request(tiny_config):
    """Default: (B, L, V) logits with labels (the usual ``preds[labels != -100]`` metric works);
    ``sparse_prediction=True`` decodes only the labelled rows, with the same loss."""
    assert NeoBERTConfig().sparse_prediction is False
    model = NeoBERTForMaskedLM(tiny_config).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [12, 8])
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 7]] = ids[0, [1, 4, 7]]
    labels[1, 2] = ids[1, 2]
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask, labels=labels)
        full = model(input_ids=ids, attention_mask=mask)
    assert dense.logits.shape == (2, 12, tiny_config.vocab_size)
    assert dense.logits[labels != -100].shape == (4, tiny_config.vocab_size)
    expected = F.cross_entropy(full.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(dense.loss, expected)
    model.config.sparse_prediction = True
    with torch.no_grad():
        sparse = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sparse.logits.shape == (4, tiny_config.vocab_size)  # only the labelled positions are decoded
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, expected)


def classification_head_by_hand(model, ids, mask, pooling):
    """The sequence-classification logits in float64 from the encoder's hidden states: the
    pooled vector (first token, or the mean of each row's real tokens), dense, tanh, classifier."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = torch.stack([hidden[i, : int(n)].mean(0) for i, n in enumerate(mask.sum(1))])
    dense, classifier = model.dense, model.classifier
    x = torch.tanh(pooled @ dense.weight.double().T + dense.bias.double())
    return x @ classifier.weight.double().T + classifier.bias.double()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification_problem_types(tiny_config, pooling):
    """Logits and each problem type's loss against values computed here by hand (float64)
    from the encoder's hidden states; the pooling changes the logits of the same weights."""
    ids, mask = padded_batch(tiny_config.vocab_size, [10, 6])
    tiny_config.classifier_pooling = pooling
    tiny_config.num_labels = 3
    model = NeoBERTForSequenceClassification(tiny_config).eval()
    z = classification_head_by_hand(model, ids, mask, pooling)
    y = torch.tensor([0, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=y)
    assert out.logits.shape == (2, 3) and model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.logits.double(), z, rtol=1e-5, atol=1e-6)
    cross_entropy = (torch.logsumexp(z, -1) - z[torch.arange(2), y]).mean()
    torch.testing.assert_close(out.loss.double(), cross_entropy, rtol=1e-5, atol=1e-6)

    multi = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    model.config.problem_type = "multi_label_classification"
    out = model(input_ids=ids, attention_mask=mask, labels=multi)
    binary_cross_entropy = -(multi * torch.log(torch.sigmoid(z)) + (1 - multi) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(out.loss.double(), binary_cross_entropy, rtol=1e-5, atol=1e-6)

    other = "mean" if pooling == "cls" else "cls"
    model.config.classifier_pooling = other
    with torch.no_grad():
        pooled_otherwise = model(input_ids=ids, attention_mask=mask).logits.double()
    torch.testing.assert_close(pooled_otherwise, classification_head_by_hand(model, ids, mask, other), rtol=1e-5, atol=1e-6)
    assert (pooled_otherwise - z).abs().max() > 1e-3  # the pooling decides the result

    tiny_config.num_labels, tiny_config.problem_type, tiny_config.classifier_pooling = 1, None, pooling
    reg = NeoBERTForSequenceClassification(tiny_config).eval()
    scores = torch.tensor([0.5, 3.0])
    out = reg(input_ids=ids, attention_mask=mask, labels=scores)
    assert out.logits.shape == (2, 1) and reg.config.problem_type == "regression"
    mean_squared_error = ((classification_head_by_hand(reg, ids, mask, pooling)[:, 0] - scores.double()) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), mean_squared_error, rtol=1e-5, atol=1e-6)


def test_mean_pooling_ignores_padding(tiny_config):
    tiny_config.classifier_pooling = "mean"
    tiny_config.num_labels = 2
    model = NeoBERTForSequenceClassification(tiny_config).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [10, 6])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :6]).logits
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)


def test_token_classification(tiny_config):
    """Per-token logits and the loss over labelled tokens (-100: padding and a sub-word) against
    values computed here by hand (float64) from the encoder's hidden states."""
    tiny_config.num_labels = 5
    model = NeoBERTForTokenClassification(tiny_config).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [9, 4])
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 9, 5)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    z = hidden @ model.classifier.weight.double().T + model.classifier.bias.double()
    real = mask.bool()
    torch.testing.assert_close(out.logits.double()[real], z[real], rtol=1e-5, atol=1e-6)
    terms = [torch.logsumexp(z[b, i], -1) - z[b, i, labels[b, i]] for b in range(2) for i in range(9) if labels[b, i] != -100]
    assert len(terms) == 9 + 4 - 1
    torch.testing.assert_close(out.loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_inputs_embeds_and_tuple_output(tiny_config):
    model = NeoBERTModel(tiny_config).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [7, 5])
    with torch.no_grad():
        a = model(ids, mask).last_hidden_state
        b = model(inputs_embeds=model.encoder(ids), attention_mask=mask).last_hidden_state
        c = model(ids, mask, return_dict=False)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


# --------------------------------------------------------------------------------------
# The transformers contract: attention implementations, output_attentions, arguments


def _count_sdpa_calls(monkeypatch) -> list:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_output_attentions_are_the_attention_probabilities(tiny_config):
    """output_attentions=True returns each block's softmax(q k^T / sqrt(D)) over real keys,
    equal to a naive restatement, from any attn_implementation (it takes the eager path)."""
    ids, mask = padded_batch(tiny_config.vocab_size, [11, 6, 9])
    for implementation in ("sdpa", "eager"):
        model = NeoBERTForMaskedLM._from_config(tiny_config, attn_implementation=implementation).eval()
        expected = []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            last, _, _ = naive_reference(dict(model.state_dict()), tiny_config, ids, mask, expected)
            plain = model(input_ids=ids, attention_mask=mask)
        assert plain.attentions is None and len(out.attentions) == tiny_config.num_hidden_layers
        real = mask.bool()
        for got, want in zip(out.attentions, expected):
            assert got.shape == (3, tiny_config.num_attention_heads, 11, 11)
            torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)  # real query rows
            padding_keys_of_real_queries = (real[:, None, :, None] & ~real[:, None, None, :]).expand_as(got)
            assert torch.all(got[padding_keys_of_real_queries] == 0)
        torch.testing.assert_close(out.logits[real], plain.logits[real], atol=1e-5, rtol=1e-5)
        tuple_out = model(input_ids=ids, attention_mask=mask, output_attentions=True, return_dict=False)
        assert len(tuple_out) == 2 and len(tuple_out[1]) == tiny_config.num_hidden_layers  # (logits, attentions)


def test_document_mask_attentions_stay_inside_documents(tiny_config):
    model = NeoBERTModel(tiny_config).eval()
    ids = torch.randint(1, 100, (1, 10))
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0]])
    with torch.no_grad():
        probs = model(ids, doc_ids, output_attentions=True).attentions[0][0]  # (H, L, L)
    same = (doc_ids[0][:, None] == doc_ids[0][None, :]) & (doc_ids[0] > 0)[None, :]
    real_queries = doc_ids[0] > 0
    assert torch.all(probs[:, real_queries][~same[real_queries].expand_as(probs[:, real_queries])] == 0)
    torch.testing.assert_close(probs[:, real_queries].sum(-1), torch.ones(probs.shape[0], 8))


@pytest.mark.parametrize("padding_free", [True, False])
def test_attn_implementation_is_honoured(tiny_config, monkeypatch, tmp_path, padding_free):
    """eager runs no SDPA kernel, sdpa does; all give the same outputs at real tokens. Set
    the transformers ways: from_pretrained, _from_config, set_attn_implementation."""
    tiny_config.padding_free = padding_free
    ids, mask = padded_batch(tiny_config.vocab_size, [12, 5])
    NeoBERTModel(tiny_config).save_pretrained(tmp_path)
    calls = _count_sdpa_calls(monkeypatch)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = NeoBERTModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        calls.clear()
        with torch.no_grad():
            outputs[implementation] = model(ids, mask).last_hidden_state
        assert len(calls) == (0 if implementation == "eager" else tiny_config.num_hidden_layers * (1 if not padding_free else 2))
    real = mask.bool()
    torch.testing.assert_close(outputs["eager"][real], outputs["sdpa"][real], atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("sdpa")
    calls.clear()
    with torch.no_grad():
        model(ids, mask)
    assert calls


def test_flash_attention_2_needs_flash_attn(tiny_config):
    """flash_attention_2 is accepted where flash-attn is installed and refused (by transformers,
    with its message) where it is not, never silently replaced by another kernel."""
    if flash_attn_varlen_func is None:
        with pytest.raises((ImportError, ValueError), match="(?i)flash"):
            NeoBERTModel._from_config(tiny_config, attn_implementation="flash_attention_2")
    else:
        model = NeoBERTModel._from_config(tiny_config, attn_implementation="flash_attention_2")
        assert model.config._attn_implementation == "flash_attention_2"


def test_unknown_arguments_are_refused_and_token_type_ids_ignored(tiny_config):
    tiny_config.num_labels = 2
    ids, mask = padded_batch(tiny_config.vocab_size, [7, 4])
    for cls in (NeoBERTModel, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification):
        model = cls(tiny_config).eval()
        with pytest.raises(TypeError, match="output_attention"):
            model(input_ids=ids, attention_mask=mask, output_attention=True)  # a typo is an error
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask)[0]
            b = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))[0]
        assert torch.equal(a, b)  # NeoBERT has no token-type embeddings


@pytest.mark.parametrize("implementation, padding_free", [("sdpa", True), ("sdpa", False), ("eager", True)])
def test_batch_of_padding_only(tiny_config, implementation, padding_free):
    """A batch whose every token is padding runs (zeros out); an all-padding row beside real
    rows changes nothing for them."""
    tiny_config.padding_free = padding_free
    model = NeoBERTForMaskedLM._from_config(tiny_config, attn_implementation=implementation).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [6, 0])
    with torch.no_grad():
        empty = model.model(torch.zeros_like(ids), torch.zeros_like(mask), output_hidden_states=True)
        both = model.model(ids, mask).last_hidden_state
        alone = model.model(ids[:1, :6]).last_hidden_state
    assert empty.last_hidden_state.shape == (2, 6, tiny_config.hidden_size)
    assert torch.equal(empty.last_hidden_state, torch.zeros_like(empty.last_hidden_state))
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(both[1], torch.zeros_like(both[1]))


# --------------------------------------------------------------------------------------
# Save/load, Auto classes


def test_save_load_round_trip_and_auto_classes(tiny_config, tmp_path):
    tiny_config.num_labels = 2
    ids, mask = padded_batch(tiny_config.vocab_size, [8, 3])
    for cls, auto in [
        (NeoBERTModel, AutoModel),
        (NeoBERTForMaskedLM, AutoModelForMaskedLM),
        (NeoBERTForSequenceClassification, AutoModelForSequenceClassification),
        (NeoBERTForTokenClassification, AutoModelForTokenClassification),
    ]:
        model = cls(tiny_config).eval()
        path = tmp_path / cls.__name__
        model.save_pretrained(path)
        assert AutoConfig.from_pretrained(path).model_type == "neobert"
        loaded = auto.from_pretrained(path).eval()
        assert type(loaded) is cls
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask)[0]
            b = loaded(input_ids=ids, attention_mask=mask)[0]
        assert torch.equal(a, b)


def test_tied_word_embeddings_share_one_tensor_through_training_and_reload(tiny_config, tmp_path):
    """Untied by default (the released layout); tied, the decoder is the embedding matrix: one
    parameter whose gradient sums both uses (an untied twin with equal weights gives the two
    parts), stored once and tied again on reload."""
    untied_config = NeoBERTConfig(**tiny_config.to_dict())
    untied = NeoBERTForMaskedLM(untied_config)
    assert untied.decoder.weight is not untied.model.encoder.weight
    tiny_config.tie_word_embeddings = True
    model = NeoBERTForMaskedLM(tiny_config)
    assert model.decoder.weight is model.model.encoder.weight
    untied.load_state_dict({**model.state_dict(), "decoder.weight": model.model.encoder.weight.detach().clone()})

    ids, mask = padded_batch(tiny_config.vocab_size, [8, 5])
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5, ids, -100)
    labels[mask == 0] = -100
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    untied(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.testing.assert_close(model.model.encoder.weight.grad, untied.model.encoder.weight.grad + untied.decoder.weight.grad)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert model.decoder.weight is model.model.encoder.weight  # one tensor, updated once

    model.save_pretrained(tmp_path)
    assert len({"decoder.weight", "model.encoder.weight"} & load_file(tmp_path / "model.safetensors").keys()) == 1  # stored once
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.decoder.weight is loaded.model.encoder.weight
    assert torch.equal(loaded.decoder.weight, model.decoder.weight)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, model.eval()(input_ids=ids, attention_mask=mask).logits)


def test_fresh_init_follows_documented_scheme(tiny_config):
    model = NeoBERTForMaskedLM(tiny_config)
    r = tiny_config.decoder_init_range
    assert model.decoder.weight.abs().max() <= r and model.decoder.weight.std() > r / 3
    assert torch.equal(model.decoder.bias, torch.zeros_like(model.decoder.bias))
    assert torch.equal(model.model.encoder.weight[0], torch.zeros(tiny_config.hidden_size))
    assert torch.equal(model.model.layer_norm.weight, torch.ones(tiny_config.hidden_size))


# --------------------------------------------------------------------------------------
# Precision, gradients, FLOPs


def test_bf16_autocast_close_to_fp32(tiny_config):
    model = NeoBERTModel(tiny_config).eval()
    ids, mask = padded_batch(tiny_config.vocab_size, [16, 9])
    with torch.no_grad():
        ref = model(ids, mask).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, mask).last_hidden_state
    keep = mask.bool()
    assert low.dtype in (torch.bfloat16, torch.float32)
    err = (low.float() - ref)[keep].abs().mean() / ref[keep].abs().mean()
    assert err < 0.03, err


def test_gradients_reach_every_parameter(tiny_config):
    tiny_config.num_labels = 2
    for model, labels in [
        (NeoBERTForMaskedLM(tiny_config), lambda ids: ids.masked_fill(torch.rand(ids.shape) < 0.5, -100)),
        (NeoBERTForSequenceClassification(tiny_config), lambda ids: torch.tensor([0, 1])),
    ]:
        ids, mask = padded_batch(tiny_config.vocab_size, [12, 8])
        model(input_ids=ids, attention_mask=mask, labels=labels(ids)).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(tiny_config)
    ids, mask = padded_batch(tiny_config.vocab_size, [12, 8])
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()  # the name users know (deprecated alias in transformers 5)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)


def test_flops_per_token_matches_flop_counter(tiny_config):
    """The closed-form count equals torch's FLOP counter on the naive forward (explicit
    attention matmuls, which the counter sees; it does not count fused CPU SDPA)."""
    model = NeoBERTForMaskedLM(tiny_config).eval()
    B, L = 2, 32
    ids, mask = padded_batch(tiny_config.vocab_size, [L] * B)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        naive_reference(dict(model.state_dict()), tiny_config, ids, mask)
    assert tiny_config.flops_per_token(L, include_head=True) * B * L == counter.get_total_flops()


def test_flops_per_token_base_figures():
    """NeoBERT-base: about 0.44 GFLOPs per token at 512 and 0.75 at 4096 (issue 4's table)."""
    cfg = NeoBERTConfig()
    assert round(cfg.flops_per_token(512) / 1e9, 2) == 0.44
    assert round(cfg.flops_per_token(4096) / 1e9, 2) == 0.75

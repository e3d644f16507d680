"""Padding-free attention: the fast path equals the released code's padded, masked path."""

import copy

import pytest
import torch

from neobert import NeoBERTForMaskedLM, NeoBERTModel
from neobert.modeling_neobert import Segments, flash_attn_varlen_func, real_token_segments, segment_attention


def twin_models(config, cls=NeoBERTModel):
    """The same random weights (norms too) run padding-free and the released way."""
    torch.manual_seed(0)
    fast = cls(config).eval()
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    padded = copy.deepcopy(fast)
    padded.config.padding_free = False
    fast.config.padding_free = True
    return fast, padded


def batch(kind: str, vocab: int):
    """(input_ids, attention_mask) of each mask convention, with ragged lengths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 20), generator=g)
    if kind == "none":
        return ids, None
    if kind == "ones":
        return ids, torch.ones_like(ids)
    if kind == "padding":
        mask = (torch.arange(20) < torch.tensor([[20], [7], [13]])).long()
    else:  # packed documents, some rows padded, one row a single document
        mask = torch.tensor([[1] * 6 + [2] * 9 + [3] * 5, [1] * 4 + [2] * 11 + [0] * 5, [1] * 17 + [0] * 3])
    return ids.masked_fill(mask == 0, 0), mask


KINDS = ["padding", "documents", "none", "ones"]


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_equals_padded_path(tiny_config, kind):
    fast, padded = twin_models(tiny_config)
    ids, mask = batch(kind, tiny_config.vocab_size)
    with torch.no_grad():
        a = fast(ids, mask, output_hidden_states=True)
        b = padded(ids, mask, output_hidden_states=True)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask > 0
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha[real], hb[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(a.last_hidden_state[~real], torch.zeros_like(a.last_hidden_state[~real]))


@pytest.mark.parametrize("kind", ["padding", "documents"])
def test_fast_path_gradients_equal_padded_path(tiny_config, kind):
    fast, padded = twin_models(tiny_config, NeoBERTForMaskedLM)
    ids, mask = batch(kind, tiny_config.vocab_size)
    labels = ids.masked_fill((mask == 0) | (torch.arange(20) % 3 != 0), -100)
    for model in (fast, padded):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(fast.named_parameters(), padded.parameters()):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["padding", "documents"])
def test_bf16_fast_path_close_to_padded_path(tiny_config, kind):
    fast, padded = (m.to(torch.bfloat16) for m in twin_models(tiny_config))
    ids, mask = batch(kind, tiny_config.vocab_size)
    with torch.no_grad():
        a = fast(ids, mask).last_hidden_state.float()[mask > 0]
        b = padded(ids, mask).last_hidden_state.float()[mask > 0]
    assert a.dtype == b.dtype and ((a - b).abs().mean() / b.abs().mean()) < 0.02


def test_segments_follow_rows_documents_and_holes():
    mask = torch.tensor([[1, 1, 2, 2, 2, 0], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]])
    keep, segments = real_token_segments(mask)
    assert segments.lengths == [2, 3, 4, 6]  # a hole in a 0/1 row does not split it, as in the dense mask
    assert segments.cu_seqlens.tolist() == [0, 2, 5, 9, 15] and segments.cu_seqlens.dtype == torch.int32
    assert keep.tolist() == [0, 1, 2, 3, 4, 7, 8, 10, 11, 18, 19, 20, 21, 22, 23]
    keep, segments = real_token_segments(torch.ones(2, 4, dtype=torch.long))
    assert keep is None and segments.lengths == [4, 4]


def test_ragged_attention_equals_each_segment_alone():
    torch.manual_seed(0)
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out = segment_attention(q, k, v, Segments(cu, max(lengths), lengths, "sdpa"))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / 8**0.5
        torch.testing.assert_close(out[s:e], torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(flash_attn_varlen_func is None or not torch.cuda.is_available(), reason="needs CUDA and flash_attn")
def test_flash_attn_varlen_equals_sdpa_per_segment():
    torch.manual_seed(0)
    lengths = [37, 5, 300]
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 37, 42, 342], dtype=torch.int32, device="cuda")
    flash = segment_attention(q, k, v, Segments(cu, max(lengths), lengths, "flash"))
    sdpa = segment_attention(q.float(), k.float(), v.float(), Segments(cu, max(lengths), lengths, "sdpa"))  # fp32 takes the SDPA loop
    torch.testing.assert_close(flash.float(), sdpa, atol=2e-2, rtol=2e-2)

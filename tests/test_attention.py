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


# --------------------------------------------------------------------------------------
# Flattened batches: the layout computed by the collator on the host (cu_seq_lens_q)


def collated(packing: str, vocab: int, labelled: bool = True) -> dict:
    """A collated batch of ``packing`` whose rows are: packed documents, a short row (padding),
    an empty row (all padding) and a full one-document row; labels on every third real token."""
    import numpy as np

    from neobert.data.packing import collate

    g = np.random.default_rng(3)
    doc_ids = [[1] * 6 + [2] * 9 + [3] * 9, [1] * 4 + [2] * 7, [], [1] * 24]
    if packing != "document":  # one document per row
        doc_ids = [[1] * len(d) for d in doc_ids]
    rows = [(g.integers(5, vocab, len(d)), np.array(d, dtype=np.int64)) for d in doc_ids]
    batch = collate(rows, packing, 24)
    if labelled:
        every_third = torch.arange(batch["input_ids"].numel()).view_as(batch["input_ids"]) % 3 == 0
        batch["labels"] = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | ~every_third, -100)
    return batch


def padded_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}


@pytest.mark.parametrize("packing", ["document", "none", "split"])
def test_flattened_batch_equals_mask_path(tiny_config, packing):
    """The collator's layout (cu_seq_lens_q, max_length_q, label_positions) gives the hidden
    states, MLM loss and gradients of the mask-derived path bit for bit (the same kernels on
    the same tokens; pretraining's results do not change), and the released padded path's
    within float tolerance; with a padded row and an all-padding row in the batch."""
    from neobert.data.packing import flatten

    tiny_config.sparse_prediction = True
    fast, padded = twin_models(tiny_config, NeoBERTForMaskedLM)
    flat = copy.deepcopy(fast)
    batch = collated(packing, tiny_config.vocab_size)
    real = batch["attention_mask"] > 0
    outputs = {}
    for name, model, inputs in (("mask", fast, padded_inputs(batch)), ("padded", padded, padded_inputs(batch)), ("flat", flat, flatten(batch))):
        out = model(**inputs, output_hidden_states=True)
        out.loss.backward()
        outputs[name] = out
    mask, flat_out = outputs["mask"], outputs["flat"]
    assert flat_out.hidden_states[-1].shape == (1, int(real.sum()), tiny_config.hidden_size)
    for a, b in zip(mask.hidden_states, flat_out.hidden_states):
        assert torch.equal(a[real], b[0])
    assert torch.equal(mask.loss, flat_out.loss) and torch.equal(mask.logits, flat_out.logits)
    for (name, p), q in zip(fast.named_parameters(), flat.parameters()):
        assert p.grad.abs().sum() > 0 and torch.equal(p.grad, q.grad), name
    torch.testing.assert_close(flat_out.loss, outputs["padded"].loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(flat.named_parameters(), padded.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flattened_batch_on_the_padded_and_eager_paths(tiny_config):
    """padding_free=False and eager attention take the flattened row with a document mask made
    from cu_seq_lens_q: the same outputs as the padding-free path."""
    from neobert.data.packing import flatten

    fast, padded = twin_models(tiny_config)
    inputs = flatten(collated("document", tiny_config.vocab_size, labelled=False))
    with torch.no_grad():
        expected = fast(**inputs).last_hidden_state
        torch.testing.assert_close(padded(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        eager = fast(**inputs, output_attentions=True)
    torch.testing.assert_close(eager.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    lengths = torch.diff(inputs["cu_seq_lens_q"]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    assert (eager.attentions[0][0][:, segment[:, None] != segment[None, :]] == 0).all()  # no attention across segments
    no_positions = {k: v for k, v in inputs.items() if k != "position_ids"}  # positions restart at each segment by default
    with torch.no_grad():
        torch.testing.assert_close(fast(**no_positions).last_hidden_state, expected)


HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "masked_select",
              "unique", "unique_consecutive", "repeat_interleave"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of tensor data back to Python (a host sync on an accelerator) and
    every boolean-mask index, except in the CPU per-segment loop, which reads the CPU offsets."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                      for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in HOST_READS or boolean_index:
            frame, in_loop = sys._getframe(1), False
            while frame is not None and not in_loop:
                in_loop, frame = frame.f_code.co_name in ("sdpa_segments", "_segment_sdpa_backward"), frame.f_back
            if not in_loop:
                self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_flattened_path_reads_nothing_back_from_the_device(tiny_config):
    """Forward and backward given cu_seq_lens_q read no tensor data back to Python (what would
    be a host sync on CUDA): no .item(), .tolist(), bool(), nonzero or boolean indexing.
    The mask-derived path does (it finds the layout itself), which shows the check works."""
    from neobert.data.packing import flatten

    tiny_config.sparse_prediction = True
    model = NeoBERTForMaskedLM(tiny_config)
    batch = collated("document", tiny_config.vocab_size)
    inputs = flatten(batch)
    with HostReads() as spy:
        model(**inputs).loss.backward()
    assert spy.reads == []
    with HostReads() as spy:
        model(**padded_inputs(batch)).loss.backward()
    assert {"tolist", "nonzero"} <= set(spy.reads)


def test_flattened_path_compiles_to_one_graph_for_every_layout(tiny_config):
    """torch.compile(fullgraph=True) takes the flattened path whole (a host read would break
    the graph and fail), with the token, segment and label counts marked dynamic: batches
    of other layouts reuse the first graph, with the eager losses and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from neobert.data.packing import flatten
    from neobert.train.pretrain import to_device

    tiny_config.sparse_prediction = True
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(tiny_config)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        for packing in ("document", "split", "none"):
            batch = collated(packing, tiny_config.vocab_size)
            if packing == "none":  # another token count and layout
                batch = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in batch.items()}
                batch.update(collated_layout(batch["attention_mask"]))
            inputs = to_device(flatten(batch), torch.device("cpu"), dynamic=True)
            inputs["max_length_q"] = 24  # what pretraining passes when compiling: the row length, a constant
            for m in (model, compiled):
                m.zero_grad()
            loss = compiled(**inputs).loss
            loss.backward()
            expected = model(**inputs).loss
            expected.backward()
            torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
            for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        assert backend.frame_count == 1  # one graph, never recompiled
    finally:
        torch._dynamo.reset()


def collated_layout(attention_mask: torch.Tensor) -> dict:
    from neobert.data.packing import segment_layout

    indices, cu = segment_layout(attention_mask.numpy())
    return {"indices": torch.from_numpy(indices), "cu_seqlens": torch.from_numpy(cu), "max_seqlen": int(torch.from_numpy(cu).diff().max())}


@pytest.mark.parametrize("layout", ["flattened", "mask"])
def test_flex_attention_equals_the_sdpa_path(tiny_config, layout):
    """attn_implementation="flex_attention": FlexAttention with a document mask made from the
    segment offsets on the device gives the SDPA path's outputs (eager on CPU, forward only:
    FlexAttention has no CPU backward; its gradients and speed are checked on CUDA, in
    test_cuda_varlen.py)."""
    from neobert.data.packing import flatten

    tiny_config.sparse_prediction = True
    sdpa, _ = twin_models(tiny_config, NeoBERTForMaskedLM)
    flex = copy.deepcopy(sdpa)
    flex.set_attn_implementation("flex_attention")
    batch = collated("document", tiny_config.vocab_size)
    inputs = flatten(batch) if layout == "flattened" else padded_inputs(batch)
    with torch.no_grad():
        a, b = sdpa(**inputs), flex(**inputs)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)


def test_compiled_segment_op_gradients_equal_autograd_of_the_loop():
    """The per-segment loop as a custom op (what traced graphs call): its backward op gives
    autograd's gradients of the eager loop."""
    from neobert.modeling_neobert import sdpa_segments

    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    q, k, v = (torch.randn(15, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(15, 2, 8, dtype=torch.float64)
    expected = torch.autograd.grad(sdpa_segments(q, k, v, cu), (q, k, v), grad)
    out = torch.ops.neobert.segment_sdpa(q, k, v, cu)
    torch.testing.assert_close(out, sdpa_segments(q, k, v, cu))
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected):
        torch.testing.assert_close(got, want)

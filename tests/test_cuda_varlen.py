"""The CUDA padding-free path without flash_attn: PyTorch's varlen_attn and FlexAttention
against the padded path, no host sync given the collator's layout, and one compiled graph
for every batch layout. Skipped without a CUDA device (scripts/gpu-check.sh runs them)."""

import copy

import numpy as np
import pytest
import torch

from neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert.data.packing import collate, flatten
from neobert.modeling_neobert import varlen_attn
from neobert.train.pretrain import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def models(implementation: str = "sdpa"):
    """The same random weights on CUDA, padding-free (``implementation``) and padded."""
    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                           max_length=256, sparse_prediction=True)
    fast = NeoBERTForMaskedLM(config).to(CUDA)
    padded = copy.deepcopy(fast)
    padded.config.padding_free = False
    if implementation != "sdpa":
        fast.set_attn_implementation(implementation)
    return fast, padded


def batch(seed: int = 0, rows: int = 6, length: int = 256) -> dict:
    """A collated, labelled batch of packed documents of random lengths, the last row short."""
    g = np.random.default_rng(seed)
    out = []
    for r in range(rows):
        n = length if r < rows - 1 else int(g.integers(20, length))
        cuts = np.sort(g.choice(np.arange(1, n), size=int(g.integers(0, 6)), replace=False))
        docs = np.repeat(np.arange(1, len(cuts) + 2), np.diff(np.concatenate([[0], cuts, [n]])))
        out.append((g.integers(5, 500, n), docs))
    b = collate(out, "document", length)
    chosen = torch.from_numpy(g.random(b["input_ids"].shape) < 0.2) & (b["attention_mask"] > 0)
    b["labels"] = b["input_ids"].masked_fill(~chosen, -100)
    return b


def padded_inputs(b: dict) -> dict:
    return {k: b[k].to(CUDA) for k in ("input_ids", "attention_mask", "position_ids", "labels")}


def step(model, inputs: dict, bf16: bool = True):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs)
    out.loss.backward()
    return out.loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, tolerance: float):
    for name in a:
        error = (a[name] - b[name]).norm() / b[name].norm().clamp(min=1e-12)
        assert error < tolerance, (name, float(error))


@pytest.mark.skipif(varlen_attn is None, reason="torch.nn.attention.varlen needs PyTorch >= 2.10")
def test_varlen_attn_path_equals_the_padded_path_in_bf16():
    fast, padded = models()
    b = batch()
    loss, grads = step(fast, to_device(flatten(b), CUDA))
    reference_loss, reference_grads = step(padded, padded_inputs(b), bf16=False)  # fp32, dense mask
    assert abs(loss - reference_loss) < 0.02 * reference_loss
    assert_grads_close(grads, reference_grads, 0.05)


def test_fp32_on_cuda_takes_the_per_segment_loop_and_matches_the_padded_path():
    fast, padded = models()
    b = batch(1)
    loss, grads = step(fast, to_device(flatten(b), CUDA), bf16=False)
    reference_loss, reference_grads = step(padded, padded_inputs(b), bf16=False)
    torch.testing.assert_close(loss, reference_loss, atol=1e-4, rtol=1e-4)
    assert_grads_close(grads, reference_grads, 1e-3)


def test_flex_attention_equals_the_padded_path():
    fast, padded = models("flex_attention")
    b = batch(2)
    loss, grads = step(fast, to_device(flatten(b), CUDA), bf16=False)
    reference_loss, reference_grads = step(padded, padded_inputs(b), bf16=False)
    torch.testing.assert_close(loss, reference_loss, atol=1e-4, rtol=1e-4)
    assert_grads_close(grads, reference_grads, 1e-3)


@pytest.mark.skipif(varlen_attn is None, reason="torch.nn.attention.varlen needs PyTorch >= 2.10")
def test_flattened_bf16_step_makes_no_host_sync():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing call: the forward
    and backward of a flattened batch given the collator's layout make none."""
    fast, _ = models()
    inputs = to_device(flatten(batch(3)), CUDA)
    step(fast, inputs)  # warm-up: lazy initialisations may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(fast, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(varlen_attn is None, reason="torch.nn.attention.varlen needs PyTorch >= 2.10")
def test_compiled_varlen_path_is_one_graph_for_every_layout():
    """torch.compile (inductor, fullgraph) of the flattened bf16 path: varlen_attn is traced as
    an op, the token, segment and label counts are dynamic, so batches of other layouts reuse
    the first graph, with the eager losses."""
    from torch._dynamo.testing import CompileCounterWithBackend

    fast, _ = models()
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(copy.deepcopy(fast), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        for seed in range(4):
            inputs = to_device(flatten(batch(seed, rows=4 + seed)), CUDA, dynamic=True)
            inputs["max_length_q"] = 256  # pretraining passes the row length when compiling
            loss, _ = step(compiled, inputs)
            expected, _ = step(fast, inputs)
            assert abs(loss - expected) < 0.01 * expected
        assert backend.frame_count == 1
    finally:
        torch._dynamo.reset()

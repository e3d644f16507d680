"""NeoBERT: configuration and model classes (one file, torch + transformers only).

NeoBERT (Le Breton et al., 2025) is a pre-norm Transformer encoder with RMSNorm, SwiGLU
feed-forward blocks and rotary position embeddings, no biases in the blocks, 28 x 768.
Parameter names and tensor layouts follow the released checkpoints, so a released model
directory loads with ``from_pretrained`` as it is:

    model.encoder                          Embedding(vocab, d, padding_idx=pad)
    model.transformer_encoder.{i}.qkv      Linear(d, 3d), rows grouped per head [q_h|k_h|v_h]
    model.transformer_encoder.{i}.wo       Linear(d, d)
    model.transformer_encoder.{i}.ffn.w12  Linear(d, 2h) -> (gate, up), h = round8(2/3 * ffn)
    model.transformer_encoder.{i}.ffn.w3   Linear(h, d)
    model.transformer_encoder.{i}.{attention_norm,ffn_norm}   RMSNorm(d)
    model.layer_norm                       RMSNorm(d), the final norm
    decoder                                Linear(d, vocab) with bias (masked-LM head, untied by default)

Attention masks. ``attention_mask`` is (B, L) and follows ``transformers``: 1 for tokens,
0 for padding, ``None`` for no padding. It may also hold *document ids* (1, 2, 3, ... per
packed document, each document one contiguous run, 0 for padding): attention then stays
inside each document and, unless ``position_ids`` are given, positions restart at 0 at every
document start. Outputs at real tokens never depend on how much padding the batch carries;
outputs at padding are zeros.

Attention paths. ``config._attn_implementation`` (set the transformers way:
``from_pretrained(..., attn_implementation=...)`` or ``model.set_attn_implementation(...)``)
chooses among four:

- ``sdpa`` (the default) with ``config.padding_free`` (the default): the encoder drops the
  padding once after the embedding, runs every block on the N real tokens of the batch as
  one (N, d) matrix, and puts the padding back once after the final norm. Attention runs
  per *segment* (a row, or a document of a packed row). On CUDA in bf16/fp16 it is one
  call of PyTorch's own variable-length flash kernel (``torch.nn.attention.varlen``), so
  ``flash_attn`` is not needed; elsewhere (CPU, CUDA fp32) one SDPA call over all segments
  when they have equal lengths, one call per segment otherwise (on CPU, SDPA without a
  mask is its fused flash-attention kernel, and this loop beat nested tensors and
  FlexAttention there). No (L, L) mask is built and nothing is computed on padding.
- ``flash_attention_2`` (CUDA, ``flash_attn`` installed): the same padding-free path with
  ``flash_attn_varlen_func``.
- ``flex_attention``: the same padding-free path with FlexAttention and a document mask
  built on the device from the segment offsets (any device; fast only under
  ``torch.compile``, whose kernels it generates).
- ``eager``: the padded batch and an explicit softmax that returns the attention
  probabilities. ``output_attentions=True`` takes this path whatever the setting.

The *padded path* (the batch as it came, a (B, 1, L, L) boolean mask, SDPA or eager) also
runs with ``padding_free=False`` (the released code's way), for inputs without a mask, and
whenever a forward pass given only an ``attention_mask`` is traced into a graph
(``torch.compile``, ``torch.export``, ONNX): its shapes follow the input's and nothing is
read back to the host, so a compiled model is one graph that padding changes do not
recompile. The padding-free path's data-dependent shapes are then all computed in
``real_token_segments``. Every path gives the same outputs at real tokens and zeros at
padding.

Flattened batches (transformers' padding-free convention, ``DataCollatorWithFlattening``):
the real tokens of a batch laid end to end as one row, ``input_ids`` (1, N), with
``cu_seq_lens_q`` (S + 1,) int32 offsets of its segments and ``max_length_q`` the longest
segment, computed on the host by the collator (``neobert.data.packing.collate``). The
model then reads nothing back from the device: the layout is given, positions restart at
every segment unless ``position_ids`` are given, and the masked-LM head takes the labelled
positions as ``label_positions``. Traced, this stays the padding-free path: on CUDA a
single graph whose token count is a dynamic size; on CPU the per-segment loop runs
between the graphs of each block (it reads the segment lengths from the CPU offsets).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils.generic import can_return_tuple

try:  # CUDA only; attention falls back to PyTorch's own kernels without it
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # PyTorch >= 2.10: its own variable-length flash attention (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


# Auto class -> class of this file, written into every saved config.json as ``auto_map``
AUTO_CLASSES = {
    "AutoConfig": "NeoBERTConfig",
    "AutoModel": "NeoBERTModel",
    "AutoModelForMaskedLM": "NeoBERTForMaskedLM",
    "AutoModelForSequenceClassification": "NeoBERTForSequenceClassification",
    "AutoModelForTokenClassification": "NeoBERTForTokenClassification",
}


class NeoBERTConfig(PretrainedConfig):
    """NeoBERT hyper-parameters; defaults are NeoBERT-base.

    Args:
        vocab_size: tokens in the embedding and the MLM decoder (bert-base-uncased: 30522).
        hidden_size: model width d.
        num_hidden_layers: encoder blocks.
        num_attention_heads: heads; head size is hidden_size / num_attention_heads.
        intermediate_size: nominal FFN width; SwiGLU uses round8(2/3 * intermediate_size).
        max_length: trained context length; longer inputs still run (RoPE extrapolates).
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        pad_token_id: padding id (the embedding row kept at zero).
        embedding_init_range: init scale of the embedding (uniform +-range).
        decoder_init_range: init scale of every linear layer (uniform +-range).
        classifier_dropout: dropout in the classification heads.
        classifier_pooling: ``cls`` (first token, the paper) or ``mean`` (masked mean).
        sparse_prediction: with ``labels``, decode only positions whose label is not -100
            (``logits`` is then (N_labelled, V)); pretraining turns it on, the default gives
            the usual (B, L, V) logits.
        padding_free: run attention on the real tokens only (see the module docstring);
            False runs the released code's padded batch with a dense mask.
        tie_word_embeddings: share the MLM decoder's weight with the input embedding
            (BERT's choice; the released NeoBERT keeps them untied).
    """

    model_type = "neobert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = None  # none: [CLS] and [SEP] are the tokenizer's; transformers' padding check reads these
    eos_token_id: int | None = None
    embedding_init_range: float = 0.02
    decoder_init_range: float = 0.02
    classifier_dropout: float = 0.0
    classifier_pooling: str = "cls"
    sparse_prediction: bool = False
    padding_free: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {self.classifier_pooling!r}")
        kwargs.pop("dim_head", None)  # released configs store it; here it is derived
        # Every saved directory carries this file (see the end of the file) and names all its
        # classes, whatever Auto class saved it and whatever file a released config named.
        kwargs.pop("auto_map", None)
        module = __name__.rsplit(".", 1)[-1]
        self.auto_map = {auto: f"{module}.{name}" for auto, name in AUTO_CLASSES.items()}
        super().__post_init__(**kwargs)

    @property
    def dim_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def swiglu_size(self) -> int:
        """SwiGLU hidden width: 2/3 of intermediate_size rounded up to a multiple of 8."""
        return 8 * ((int(2 * self.intermediate_size / 3) + 7) // 8)

    @property
    def max_position_embeddings(self) -> int:  # the name pipelines and tokenizers look for
        return self.max_length

    def flops_per_token(self, seq_len: int, include_head: bool = False) -> int:
        """Matmul FLOPs of one forward pass per token at ``seq_len`` (2 FLOPs per MAC).

        Counts the q/k/v/o projections, the SwiGLU matrices and the two attention
        products (QK^T and AV, full bidirectional attention); ``include_head`` adds the
        MLM decoder. Backward costs about twice this.
        """
        d, h = self.hidden_size, self.swiglu_size
        per_layer = 2 * d * 3 * d + 2 * d * d + 2 * d * 2 * h + 2 * h * d + 2 * 2 * seq_len * d
        return self.num_hidden_layers * per_layer + (2 * d * self.vocab_size if include_head else 0)


# ---------------------------------------------------------------------------------------
# Rotary position embeddings, adjacent pairs (x[2i], x[2i+1]) rotated by angle pos * theta^(-2i/D)


def rope_cos_sin(position_ids: torch.Tensor, dim_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of positions (...) in the form ``apply_rope`` takes, each (..., 1, D) in
    float32: cos of each pair's angle twice, and its sin as (-sin, +sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, device=position_ids.device, dtype=torch.float32) / dim_head))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (..., D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos, cos), dim=-1).flatten(-2)[..., None, :], torch.stack((-sin, sin), dim=-1).flatten(-2)[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) of x (..., H, D) by their angles, in float32.

    The reference multiplies complex numbers, (x0 + i x1) * (cos + i sin); this is the same
    product in real numbers, x * cos + (x1, x0) * (-sin, sin), so that torch.export, ONNX and
    ``torch.compile`` (which have no complex tensors) take the model as it is.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    swapped = wide.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in every pair
    return torch.addcmul(wide * cos, swapped, sin).type_as(x)


def default_positions(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Positions when none are given, (B or 1, L): 0..L-1, restarting at every document when
    the mask holds document ids (> 1 somewhere). Chosen on the device (no host sync)."""
    arange = torch.arange(length, device=device)[None]
    if attention_mask is None:
        return arange
    return torch.where(attention_mask.max() > 1, document_positions(attention_mask), arange)


def document_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document start of a document-id mask, (B, L)."""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    # a start: the first token, or a change of id (roll, not slices of L - 1: export keeps L symbolic)
    starts = (idx == 0) | (attention_mask != attention_mask.roll(1, dims=1))
    run = starts.long().cumsum(dim=1) - 1  # which run of equal ids each token is in
    # where each run starts (a scatter-max, not cummax, which ONNX lacks), read back per token
    first = torch.zeros_like(idx).scatter_reduce(1, run, torch.where(starts, idx, 0), "amax")
    return idx - first.gather(1, run)


# ---------------------------------------------------------------------------------------
# Attention. The tokens of a block are one (N, d) matrix in one of two layouts: Padded (the
# batch as it came, N = B * L) or Segments (the real tokens only, split into sequences that
# attend only within themselves)


class Padded(NamedTuple):
    """N = B * L tokens, ``batch`` rows of L; the padded path (see the module docstring)."""

    batch: int
    mask: torch.Tensor | None  # (B, 1, L, L) bool, True where a query may attend; None: no padding
    eager: bool  # explicit softmax that returns the probabilities (output_attentions, attn_implementation="eager")


class Segments(NamedTuple):
    """The padding-free layout: the N real tokens of a batch, in order, split into segments."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32 start offsets, the form flash-attn takes
    max_seqlen: int | None  # the longest segment (the varlen kernels' work size); None: unknown
    lengths: list[int] | None  # the segment lengths when already on the host (None: read from cu_seqlens when needed)
    kernel: str  # "sdpa" (varlen_attn on CUDA in bf16/fp16, per-segment SDPA elsewhere), "flash" or "flex"
    block_mask: object = None  # FlexAttention's document mask (kernel "flex"), built once per forward pass


KERNELS = {"flash_attention_2": "flash", "flex_attention": "flex"}  # any other implementation: "sdpa"


def segments_layout(cu_seqlens: torch.Tensor, max_seqlen: int | None, implementation: str, n: int, lengths: list[int] | None = None) -> Segments:
    """The padding-free layout of n tokens split at ``cu_seqlens``, for ``config._attn_implementation``."""
    kernel = KERNELS.get(implementation, "sdpa")
    block_mask = flex_document_mask(cu_seqlens, n) if kernel == "flex" else None
    return Segments(cu_seqlens, max_seqlen, lengths, kernel, block_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Padded | Segments) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of q, k, v (N, H, D) -> (N, H, D), and the probabilities (B, H, L, L)
    on the eager path (None otherwise)."""
    if isinstance(layout, Segments):
        return segment_attention(q, k, v, layout), None
    q, k, v = (t.unflatten(0, (layout.batch, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    if layout.eager:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if layout.mask is not None:
            scores = scores.masked_fill(~layout.mask, torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        out = probs @ v
    else:
        out, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask), None
    return out.transpose(1, 2).flatten(0, 1), probs


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Softmax attention of q, k, v (N, H, D) within each segment -> (N, H, D).

    Without a host sync when ``segments.max_seqlen`` is known, on CUDA in bf16/fp16 (one
    varlen kernel call, flash-attn's or PyTorch's) and with FlexAttention; the per-segment
    SDPA loop (CPU, CUDA fp32) needs the lengths on the host: free when ``cu_seqlens`` is a
    CPU tensor, one sync on CUDA.
    """
    cu = segments.cu_seqlens
    if q.shape[0] == 0:  # a batch of padding only: no token to attend from
        return torch.empty_like(q)
    if segments.kernel == "flex":
        return flex_segment_attention(q, k, v, segments.block_mask)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and (segments.kernel == "flash" or varlen_attn is not None):
        longest = segments.max_seqlen if segments.max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        kernel = flash_attn_varlen_func if segments.kernel == "flash" else varlen_attn
        return kernel(q, k, v, cu, cu, longest, longest)
    if torch.compiler.is_compiling():  # one opaque op, so that the graph does not break at the loop
        return torch.ops.neobert.segment_sdpa(q, k, v, cu)
    return sdpa_segments(q, k, v, cu, segments.lengths)


def sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Maskless SDPA per segment of q, k, v (N, H, D): one call over (S, H, L, D) views when
    the segments have equal lengths, one call per segment otherwise."""
    if lengths is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if not lengths:  # a batch of padding only: no token to attend from
        return torch.empty_like(q)
    if len(set(lengths)) == 1:  # equal lengths: one call on (S, H, L, D) views
        q, k, v = (t.unflatten(0, (len(lengths), lengths[0])).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(0, 1)
    # unequal lengths: one maskless call per segment beat nested tensors and FlexAttention on CPU
    parts = zip(q.split(lengths), k.split(lengths), v.split(lengths))
    return torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in p))[0].transpose(0, 1) for p in parts])


# The per-segment loop as a custom op for traced graphs (torch.compile): the graph sees one op
# whose output is shaped like q, and the op reads the segment lengths from the offsets when it
# runs. Its backward is a second op (autograd does not run inside an op): the softmax
# attention gradients per segment, recomputing the probabilities in float32 (or wider).


@torch.library.custom_op("neobert::segment_sdpa", mutates_args=())
def _segment_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return sdpa_segments(q, k, v, cu_seqlens).contiguous()


@_segment_sdpa.register_fake
def _(q, k, v, cu_seqlens):
    return q.new_empty(q.shape)


@torch.library.custom_op("neobert::segment_sdpa_backward", mutates_args=())
def _segment_sdpa_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    scale = q.shape[-1] ** -0.5
    grads = []
    wide = torch.promote_types(q.dtype, torch.float32)
    for g, qs, ks, vs in zip(*(t.split(lengths) for t in (grad, q, k, v))):
        g, qs, ks, vs = (t.transpose(0, 1).to(wide) for t in (g, qs, ks, vs))  # (H, L, D)
        probs = (qs @ ks.transpose(1, 2) * scale).softmax(-1)
        dv = probs.transpose(1, 2) @ g
        dp = g @ vs.transpose(1, 2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        grads.append((ds @ ks * scale, ds.transpose(1, 2) @ qs * scale, dv))
    if not grads:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(torch.cat([part[i].transpose(0, 1) for part in grads]).to(t.dtype).contiguous() for i, t in enumerate((q, k, v)))


@_segment_sdpa_backward.register_fake
def _(grad, q, k, v, cu_seqlens):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _segment_sdpa_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _segment_sdpa_grad(ctx, grad):
    return (*torch.ops.neobert.segment_sdpa_backward(grad, *ctx.saved_tensors), None)


_segment_sdpa.register_autograd(_segment_sdpa_grad, setup_context=_segment_sdpa_setup)


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """The segment (0, 1, ...) of each of the n tokens that ``cu_seqlens`` splits, (n,) long, on the device."""
    return torch.searchsorted(cu_seqlens.long(), torch.arange(n, device=cu_seqlens.device), right=True) - 1


def segment_positions(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Positions restarting at 0 at every segment start, (n,) long, on the device."""
    return torch.arange(n, device=cu_seqlens.device) - cu_seqlens.long()[segment_ids(cu_seqlens, n)]


def flex_document_mask(cu_seqlens: torch.Tensor, n: int):
    """FlexAttention's block mask over n tokens that keeps each query inside its own segment."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment = segment_ids(cu_seqlens, n)

    def same_segment(b, h, q_idx, kv_idx):
        return segment[q_idx] == segment[kv_idx]

    return create_block_mask(same_segment, None, None, n, n, device=cu_seqlens.device)


def flex_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention of q, k, v (N, H, D) with a document block mask -> (N, H, D)."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, D)
    return flex_attention(q, k, v, block_mask=block_mask)[0].transpose(0, 1)


@torch.compiler.disable(reason="data-dependent: the number of real tokens and the segment lengths")
def real_token_segments(attention_mask: torch.Tensor, implementation: str = "sdpa") -> tuple[torch.Tensor | None, Segments]:
    """The padding-free layout of a (B, L) padding or document-id mask.

    Returns the indices of the real tokens in the flattened (B * L) batch, (N,) long, or
    None when every token is real, and their segments: each run of real tokens sharing a
    row and a document id, in order. Every data-dependent shape of the padding-free path
    given a mask is computed here, on the host, and nowhere else; traced runs
    (``torch.compile``, ``torch.export``, ONNX) take the padded path instead and never reach
    it. A collator that computes the layout on the host passes it as ``cu_seq_lens_q``
    instead (see the module docstring).
    """
    B, L = attention_mask.shape
    keep = attention_mask.flatten() > 0
    row = torch.arange(B, device=attention_mask.device).repeat_interleave(L)
    key = row * (int(attention_mask.max()) + 1) + attention_mask.flatten().long()  # (row, document) as one number
    lengths = torch.unique_consecutive(key[keep], return_counts=True)[1]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    lengths = lengths.tolist()
    layout = segments_layout(cu_seqlens, max(lengths, default=0), implementation, sum(lengths), lengths)
    return (None if bool(keep.all()) else keep.nonzero().squeeze(1)), layout


def dense_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The padded path's mask, (B, 1, L, L) bool, True where a query may attend.

    A query sees the real keys of its own document (a 0/1 mask is one document per row).
    Padding queries see every key so that no row is empty (their outputs are zeroed). The
    same rule for both kinds of mask, so that nothing depends on the mask's values on the host.
    """
    keys = attention_mask > 0
    same_document = attention_mask[:, :, None] == attention_mask[:, None, :]
    return ((same_document & keys[:, None, :]) | ~keys[:, :, None])[:, None]


# ---------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.RMSNorm):
    """x * rsqrt(mean(x^2) + eps) * weight, with the mean square accumulated in float32 by
    one reduction instead of a float32 copy of x and three more passes over it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square() / x.shape[-1]
        return x * torch.rsqrt(mean_square + self.eps).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w3(silu(gate) * up) with (gate, up) = w12(x) split in two; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class EncoderBlock(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)), on the (N, d) tokens of a batch."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.num_heads, self.dim_head = config.num_attention_heads, config.dim_head
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ffn = SwiGLU(config.hidden_size, config.swiglu_size)
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Padded | Segments) -> tuple[torch.Tensor, torch.Tensor | None]:
        N = x.shape[0]
        # rows of qkv are grouped per head: view as (N, H, 3*D) then split q, k, v
        q, k, v = self.qkv(self.attention_norm(x)).view(N, self.num_heads, 3 * self.dim_head).chunk(3, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (N, H, D)
        out, probs = attention(q, k, v, layout)
        x = x + self.wo(out.flatten(1))
        return x + self.ffn(self.ffn_norm(x)), probs


# ---------------------------------------------------------------------------------------
# Models


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    config: NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def _init_weights(self, module: nn.Module):
        """All weight init lives here. Released recipe: every linear weight uniform in
        +-decoder_init_range, the embedding uniform in +-embedding_init_range, biases 0,
        norms 1; keeping the padding embedding row at 0 is this project's addition (the
        release's uniform draw overwrites it)."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            init.uniform_(module.weight, -cfg.decoder_init_range, cfg.decoder_init_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -cfg.embedding_init_range, cfg.embedding_init_range)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)


def _traced() -> bool:
    """Whether this forward pass is being traced into a graph (torch.compile, torch.export,
    the ONNX exporters): such graphs take the padded path, whose shapes follow the input's."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class NeoBERTModel(NeoBERTPreTrainedModel):
    """The encoder: embedding -> blocks -> final RMSNorm. ``last_hidden_state`` is (B, L, d)."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.encoder = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.transformer_encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.layer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self._warned_length = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
    ) -> BaseModelOutput:
        """Either a padded batch, ``input_ids`` (B, L) with an optional ``attention_mask`` (0/1
        or document ids, see the module docstring), or a flattened one (transformers'
        padding-free convention, ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``):

        - ``input_ids`` (1, N): the real tokens of a batch end to end, no ``attention_mask``;
        - ``cu_seq_lens_q`` (S + 1,) int32: where each segment (a sequence or a packed
          document, attending only within itself) starts, then N;
        - ``max_length_q`` (int): the longest segment; optional, but the CUDA kernels read it
          back from the device (a host sync) when it is missing;
        - ``position_ids`` (1, N): optional, by default 0.. from every segment start.

        ``cu_seq_lens_k`` / ``max_length_k`` are the same for self-attention and are accepted
        in their place. Given these, the forward pass reads nothing back to the host.

        ``token_type_ids`` is accepted because BERT tokenizers return it, and ignored: NeoBERT
        has no token-type embeddings. ``return_dict`` is taken by ``can_return_tuple``; any
        other keyword argument is refused (TypeError)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        cu_seqlens = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
        max_seqlen = max_length_q if max_length_q is not None else max_length_k
        flattened = cu_seqlens is not None
        if flattened and attention_mask is not None:
            raise ValueError("cu_seq_lens_q describes a flattened batch, which takes no attention_mask")
        if input_ids is not None and attention_mask is None and not flattened:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)  # as BERT: once, eager only
        x = self.encoder(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, d)
        B, L, _ = x.shape
        if flattened and B != 1:
            raise ValueError(f"a flattened batch (cu_seq_lens_q given) is one row of tokens, (1, N); got {B} rows")
        longest = max_seqlen if flattened else L  # an int on the host, or None (unknown: no warning)
        if not self._warned_length and not _traced() and longest is not None and longest > self.config.max_length:
            warnings.warn(f"sequence length {longest} exceeds max_length {self.config.max_length}: RoPE extrapolates past the trained length")
            self._warned_length = True
        if position_ids is None:
            position_ids = segment_positions(cu_seqlens, L)[None] if flattened else default_positions(attention_mask, L, x.device)
        position_ids = position_ids.expand(B, L).flatten()  # (B*L,)

        implementation = self.config._attn_implementation
        eager = output_attentions or implementation == "eager"
        keep, real = None, None
        if flattened and self.config.padding_free and not eager:
            layout = segments_layout(cu_seqlens, max_seqlen, implementation, L)
        elif flattened:  # the padded path of the one row, its segments as documents
            layout = Padded(1, dense_mask(segment_ids(cu_seqlens, L)[None] + 1), eager)
        elif attention_mask is not None and self.config.padding_free and not eager and not _traced():
            keep, layout = real_token_segments(attention_mask, implementation)
        else:
            layout = Padded(B, None if attention_mask is None else dense_mask(attention_mask), eager)
            real = None if attention_mask is None else (attention_mask > 0).flatten()[:, None]  # (B*L, 1)

        def padded(tokens: torch.Tensor) -> torch.Tensor:  # (N, d) -> (B, L, d), zeros at padding
            if keep is not None:
                return tokens.new_zeros(B * L, tokens.shape[-1]).index_copy(0, keep, tokens).view(B, L, -1)
            return (tokens if real is None else tokens * real).view(B, L, -1)

        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        x = x.flatten(0, 1)  # (B*L, d)
        if keep is not None:
            x, position_ids = x[keep], position_ids[keep]  # (N, d): the real tokens only, unpadded once
        cos, sin = rope_cos_sin(position_ids, self.config.dim_head, self.config.rope_theta)  # (N, 1, D) each
        for block in self.transformer_encoder:
            x, probs = block(x, cos, sin, layout)
            if output_hidden_states:
                hidden_states.append(padded(x))
            if output_attentions:
                attentions.append(probs)
        return BaseModelOutput(
            last_hidden_state=padded(self.layer_norm(x)),  # re-padded once
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class NeoBERTForMaskedLM(NeoBERTPreTrainedModel):
    """Encoder + linear decoder (untied unless ``config.tie_word_embeddings``). ``logits`` is
    (B, L, V); with ``labels`` and ``config.sparse_prediction`` (what pretraining sets), only
    positions whose label is not -100 are decoded and ``logits`` is (N_labelled, V)."""

    _tied_weights_keys = {"decoder.weight": "model.encoder.weight"}

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.model = NeoBERTModel(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, value: nn.Linear):
        self.decoder = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        label_positions: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """As :meth:`NeoBERTModel.forward` (padded or flattened batches), plus ``labels`` (-100:
        not scored) and ``label_positions``: the flat indices (into the B * L tokens) of the
        labels that are not -100, in order, as the collator computes them on the host. With
        ``config.sparse_prediction`` the head then gathers those rows instead of finding them
        on the device (a host sync)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True,
                         cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q, max_length_k=max_length_k)
        hidden = out.last_hidden_state  # (B, L, d)
        loss = None
        if labels is not None and self.config.sparse_prediction:
            if label_positions is None:
                selected = labels != -100
                hidden, target = hidden[selected], labels[selected]
            else:
                hidden, target = hidden.flatten(0, 1)[label_positions], labels.flatten()[label_positions]
            logits = self.decoder(hidden)  # (N, V): the unlabelled rows are never decoded
            loss = F.cross_entropy(logits.float(), target)
        else:
            logits = self.decoder(hidden)  # (B, L, V)
            if labels is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, L, d) -> (B, d): the first token, or the mean over real tokens."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = (attention_mask > 0).to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """Pooled (CLS or mean) -> dropout -> dense -> tanh -> dropout -> classifier.

    Loss as in ``transformers``: MSE for regression (num_labels == 1), cross-entropy for
    single-label, BCE-with-logits for multi-label (``problem_type``)."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)
        pooled = pool(out.last_hidden_state, attention_mask, self.config.classifier_pooling)  # (B, d)
        x = self.dropout(torch.tanh(self.dense(self.dropout(pooled))))
        logits = self.classifier(x)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 else F.mse_loss(logits.float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class NeoBERTForTokenClassification(NeoBERTPreTrainedModel):
    """Per-token dropout -> classifier; labels -100 are ignored."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> TokenClassifierOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, L, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


# Sharing: ``save_pretrained`` copies this file beside the weights and writes ``auto_map``
# (transformers' remote-code mechanism), so a saved directory loads with only transformers
# installed (``trust_remote_code=True``); where ``neobert`` is imported it loads without.
for _auto, _name in AUTO_CLASSES.items():
    globals()[_name].register_for_auto_class(_auto)

# The released code names the masked-LM class NeoBERTLMHead and the base NeoBERT.
NeoBERTLMHead = NeoBERTForMaskedLM
NeoBERT = NeoBERTModel

__all__ = [
    "NeoBERTConfig",
    "NeoBERTPreTrainedModel",
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTForTokenClassification",
]

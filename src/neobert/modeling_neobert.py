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

Padding-free attention (``config.padding_free``, the default). The encoder drops the padding
once after the embedding, runs every block on the N real tokens of the batch as one (N, d)
matrix, and puts the padding back once after the final norm. Attention runs per *segment*
(a row, or a document of a packed row): one SDPA call over all segments when they have equal
lengths, one call per segment otherwise (on CPU, SDPA without a mask is its fused
flash-attention kernel), and ``flash_attn_varlen_func`` on CUDA when ``flash_attn`` is
installed. No (L, L) mask is ever built and nothing is computed on padding. With
``padding_free=False`` the model runs as the released code does: the padded batch and a
dense (B, H, L, L) additive mask; it gives the same outputs at real tokens, more slowly.
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

try:  # CUDA only; attention falls back to SDPA without it
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


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
        sparse_prediction: with ``labels``, decode only positions whose label is not -100.
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
    embedding_init_range: float = 0.02
    decoder_init_range: float = 0.02
    classifier_dropout: float = 0.0
    classifier_pooling: str = "cls"
    sparse_prediction: bool = True
    padding_free: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {self.classifier_pooling!r}")
        kwargs.pop("dim_head", None)  # released configs store it; here it is derived
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
    """cos and sin of the rotation angles for positions (...), each (..., 1, D/2) in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, device=position_ids.device, dtype=torch.float32) / dim_head))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (..., D/2)
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., H, D) by ``rotation`` = cos + i sin (..., 1, D/2), in
    float32 the way the reference does: one complex product (x0 + i x1) * (cos + i sin), a
    single kernel where the real-valued form costs a stack and six passes (16x slower on CPU)."""
    pairs = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))  # (..., H, D/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate`` with the angles given as cos and sin (the model builds the complex
    rotation once per forward pass instead: ``torch.complex`` is a slow kernel on CPU)."""
    return rotate(x, torch.complex(cos, sin))


# ---------------------------------------------------------------------------------------
# Attention over segments: the tokens of a block are one (N, ...) matrix, split into
# segments (rows, or documents of packed rows) that attend only within themselves


class Segments(NamedTuple):
    """How the N tokens of a batch split into sequences that attend only within themselves."""

    lengths: list[int]  # in token order, summing to N
    cu_seqlens: torch.Tensor  # (S + 1,) int32 start offsets, the form flash-attn takes
    mask: torch.Tensor | None  # padded path only: the (B, H, L, L) additive mask over N = B * L


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Softmax attention of q, k, v (N, H, D) within each segment -> (N, H, D)."""
    lengths = segments.lengths
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and segments.mask is None:
        return flash_attn_varlen_func(q, k, v, segments.cu_seqlens, segments.cu_seqlens, max(lengths), max(lengths))
    if len(set(lengths)) == 1:  # equal lengths: one call on (S, H, L, D) views
        q, k, v = (t.unflatten(0, (len(lengths), lengths[0])).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=segments.mask).transpose(1, 2).flatten(0, 1)
    # unequal lengths: one maskless call per segment beat nested tensors and FlexAttention on CPU
    parts = zip(q.split(lengths), k.split(lengths), v.split(lengths))
    return torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in p))[0].transpose(0, 1) for p in parts])


def uniform_segments(batch: int, length: int, mask: torch.Tensor | None, device: torch.device) -> Segments:
    """``batch`` segments of ``length`` tokens each (no padding, or the padded path)."""
    return Segments([length] * batch, torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), mask)


def real_token_segments(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, Segments]:
    """The padding-free layout of a (B, L) padding or document-id mask.

    Returns the indices of the real tokens in the flattened (B * L) batch, (N,) long, or
    None when every token is real, and their segments: each run of real tokens sharing a
    row and a document id, in order.
    """
    B, L = attention_mask.shape
    keep = attention_mask.flatten() > 0
    row = torch.arange(B, device=attention_mask.device).repeat_interleave(L)
    key = row * (int(attention_mask.max()) + 1) + attention_mask.flatten().long()  # (row, document) as one number
    lengths = torch.unique_consecutive(key[keep], return_counts=True)[1]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return (None if bool(keep.all()) else keep.nonzero().squeeze(1)), Segments(lengths.tolist(), cu_seqlens, None)


def dense_mask(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The released code's mask: (B, H, L, L) additive, 0 where a query may attend.

    Plain 0/1 padding masks keys. With document ids a query sees the keys of its own
    document; padding queries see every real key so that no row is empty (their outputs
    are never used).
    """
    keys = attention_mask > 0
    allowed = keys[:, None, :].expand(-1, attention_mask.shape[1], -1)  # (B, L, L)
    if int(attention_mask.max()) > 1:
        allowed = (attention_mask[:, :, None] == attention_mask[:, None, :]) & allowed | ~keys[:, :, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return additive[:, None].repeat(1, num_heads, 1, 1)


def document_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document start of a document-id mask, (B, L)."""
    L = attention_mask.shape[1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


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

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, segments: Segments) -> torch.Tensor:
        N = x.shape[0]
        # rows of qkv are grouped per head: view as (N, H, 3*D) then split q, k, v
        q, k, v = self.qkv(self.attention_norm(x)).view(N, self.num_heads, 3 * self.dim_head).chunk(3, dim=-1)
        q, k = rotate(q, rotation), rotate(k, rotation)  # (N, H, D)
        x = x + self.wo(attention(q, k, v, segments).reshape(N, -1))
        return x + self.ffn(self.ffn_norm(x))


# ---------------------------------------------------------------------------------------
# Models


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    config: NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        """All weight init lives here. Released recipe: every linear weight uniform in
        +-decoder_init_range, the embedding uniform in +-embedding_init_range, biases 0,
        norms 1, the padding embedding row 0."""
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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.encoder(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, d)
        B, L, _ = x.shape
        if L > self.config.max_length and not self._warned_length:
            warnings.warn(f"sequence length {L} exceeds max_length {self.config.max_length}: RoPE extrapolates past the trained length")
            self._warned_length = True

        if position_ids is None:
            if attention_mask is not None and int(attention_mask.max()) > 1:
                position_ids = document_positions(attention_mask)
            else:
                position_ids = torch.arange(L, device=x.device)
        position_ids = position_ids.expand(B, L).flatten()  # (B*L,)

        if attention_mask is None:
            keep, segments = None, uniform_segments(B, L, None, x.device)
        elif self.config.padding_free:
            keep, segments = real_token_segments(attention_mask)
        else:
            keep, segments = None, uniform_segments(B, L, dense_mask(attention_mask, self.config.num_attention_heads, x.dtype), x.device)

        def padded(tokens: torch.Tensor) -> torch.Tensor:  # (N, d) -> (B, L, d), zeros at padding
            if keep is None:
                return tokens.view(B, L, -1)
            return tokens.new_zeros(B * L, tokens.shape[-1]).index_copy(0, keep, tokens).view(B, L, -1)

        hidden_states = [x] if output_hidden_states else None
        x = x.flatten(0, 1)  # (B*L, d)
        if keep is not None:
            x, position_ids = x[keep], position_ids[keep]  # (N, d): the real tokens only, unpadded once
        rotation = torch.complex(*rope_cos_sin(position_ids, self.config.dim_head, self.config.rope_theta))  # (N, 1, D/2)
        for block in self.transformer_encoder:
            x = block(x, rotation, segments)
            if output_hidden_states:
                hidden_states.append(padded(x))
        x = padded(self.layer_norm(x))  # re-padded once
        if not return_dict:
            return tuple(v for v in (x, hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)


class NeoBERTForMaskedLM(NeoBERTPreTrainedModel):
    """Encoder + linear decoder (untied unless ``config.tie_word_embeddings``). With
    ``labels`` and ``config.sparse_prediction``, only positions whose label is not -100 are
    decoded and ``logits`` is (N_masked, V); otherwise ``logits`` is (B, L, V)."""

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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state  # (B, L, d)
        loss = None
        if labels is not None and self.config.sparse_prediction:
            selected = labels != -100
            logits = self.decoder(hidden[selected])  # (N, V): the 80% unmasked rows are never decoded
            loss = F.cross_entropy(logits.float(), labels[selected])
        else:
            logits = self.decoder(hidden)  # (B, L, V)
            if labels is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, return_dict=True)
        pooled = _pool(out.last_hidden_state, attention_mask, self.config.classifier_pooling)  # (B, d)
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
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class NeoBERTForTokenClassification(NeoBERTPreTrainedModel):
    """Per-token dropout -> classifier; labels -100 are ignored."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, L, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


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

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
    decoder                                Linear(d, vocab) with bias (masked-LM head, untied)

Attention masks. ``attention_mask`` is (B, L) and follows ``transformers``: 1 for tokens,
0 for padding, ``None`` for no padding. It may also hold *document ids* (1, 2, 3, ... per
packed document, 0 for padding): attention then stays inside each document and, unless
``position_ids`` are given, positions restart at 0 at every document start. Outputs at
real tokens never depend on how much padding the batch carries.
"""

from __future__ import annotations

import warnings

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
    """cos and sin of the rotation angles, each (B, L, 1, D/2) in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, device=position_ids.device, dtype=torch.float32) / dim_head))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, D/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, L, H, D) in float32, the way the reference does."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------
# Blocks


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
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.num_heads, self.dim_head = config.num_attention_heads, config.dim_head
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ffn = SwiGLU(config.hidden_size, config.swiglu_size)
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        # rows of qkv are grouped per head: view as (B, L, H, 3*D) then split q, k, v
        q, k, v = self.qkv(self.attention_norm(x)).view(B, L, self.num_heads, 3 * self.dim_head).chunk(3, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, L, H, D)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + self.wo(attn.transpose(1, 2).reshape(B, L, -1))  # (B, H, L, D) -> (B, L, H*D)
        return x + self.ffn(self.ffn_norm(x))


def sdpa_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask from a (B, L) padding mask or document-id mask (True = attend).

    No padding: None (SDPA's fast path). Plain 0/1 padding: keys only, (B, 1, 1, L).
    Document ids: (B, 1, L, L), a query sees keys of its own document; padding queries
    see every real key so that no row is empty (their outputs are never used).
    """
    if attention_mask is None or bool(attention_mask.all()) and bool((attention_mask == attention_mask[:, :1]).all()):
        return None
    keys = attention_mask > 0
    if int(attention_mask.max()) <= 1:
        return keys[:, None, None, :]
    same_doc = attention_mask[:, :, None] == attention_mask[:, None, :]
    return ((same_doc & keys[:, None, :]) | ~keys[:, :, None])[:, None]


def document_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document start of a document-id mask, (B, L)."""
    L = attention_mask.shape[1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


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
        self.layer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
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
                position_ids = torch.arange(L, device=x.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.dim_head, self.config.rope_theta)  # (B, L, 1, D/2)
        mask = sdpa_mask(attention_mask)

        hidden_states = [x] if output_hidden_states else None
        for block in self.transformer_encoder:
            x = block(x, cos, sin, mask)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.layer_norm(x)
        if not return_dict:
            return tuple(v for v in (x, hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)


class NeoBERTForMaskedLM(NeoBERTPreTrainedModel):
    """Encoder + untied linear decoder. With ``labels`` and ``config.sparse_prediction``,
    only positions whose label is not -100 are decoded and ``logits`` is (N_masked, V);
    otherwise ``logits`` is (B, L, V)."""

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

"""NeoBERT weights in the layout of ``transformers.EuroBertModel``, for a portable export.

EuroBERT is the same architecture (pre-norm RMSNorm, SwiGLU, rotary positions, no biases,
final norm) under other parameter names, with the query/key rows of every head in
rotate-half order: NeoBERT's interleaved rotary pairs (2i, 2i+1) become the pairs
(i, i + D/2). Attention scores are dot products over the head dimension, so permuting q
and k the same way leaves them unchanged. A model saved this way loads with plain
``transformers`` (and ``sentence-transformers``), in a process that never imports ``neobert``.
"""

from __future__ import annotations

import torch
import transformers

from neobert.modeling_neobert import NeoBERTModel


def neobert_to_eurobert(model: NeoBERTModel, tokenizer=None) -> transformers.EuroBertModel:
    """The same network as a ``transformers.EuroBertModel`` (outputs equal up to rounding)."""
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.dim_head
    special = {}
    if tokenizer is not None:  # ids EuroBERT's config carries; an encoder never reads them
        special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        if tokenizer.mask_token_id is not None:
            special["mask_token_id"] = tokenizer.mask_token_id
    euro_cfg = transformers.EuroBertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.swiglu_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=H,
        max_position_embeddings=cfg.max_length,
        rms_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        **special,
    )
    # interleaved pairs (2i, 2i+1) -> rotate-half pairs (i, i + D/2)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    state = {"embed_tokens.weight": model.encoder.weight, "norm.weight": model.layer_norm.weight}
    for i, block in enumerate(model.transformer_encoder):
        q, k, v = block.qkv.weight.view(H, 3 * D, -1).split(D, dim=1)  # each (H, D, d): rows grouped per head
        gate, up = block.ffn.w12.weight.chunk(2, dim=0)
        p = f"layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": q[:, perm].reshape(H * D, -1),
            p + "self_attn.k_proj.weight": k[:, perm].reshape(H * D, -1),
            p + "self_attn.v_proj.weight": v.reshape(H * D, -1),
            p + "self_attn.o_proj.weight": block.wo.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.ffn.w3.weight,
            p + "input_layernorm.weight": block.attention_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    euro = transformers.EuroBertModel(euro_cfg).to(model.dtype)
    euro.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return euro.eval()

"""The optimizer and the learning-rate schedule of the paper's recipe.

``build_optimizer``: AdamW with weight decay on matrices (linear and embedding), not on
norms and biases (this project's choice; the release decays all). ``lr_at``: linear warmup, cosine decay to a floor over a fraction of the
run, then constant.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only, not on norm weights and
    biases: this project's choice. The paper does not say which parameters it decays; the released code
    decays every parameter (``AdamW(model.parameters())`` in chandar-lab/NeoBERT's
    src/neobert/optimizer/optimizer.py). See docs/fidelity.md."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # matrices decay; norm weights and biases (1-D) do not
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_at(step: int, peak: float, warmup: int, total: int, decay_fraction: float = 0.9, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup`` steps to ``peak``; cosine decay from ``peak`` to
    ``min_ratio * peak`` ending at ``decay_fraction * total``; constant afterwards.
    ``decay_fraction=0`` or ``min_ratio=1`` gives a constant rate after warmup.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    end = max(int(decay_fraction * total), warmup + 1)
    if step >= end:
        return peak * min_ratio
    progress = (step - warmup) / (end - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


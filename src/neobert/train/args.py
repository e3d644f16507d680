"""The run arguments the training commands share, each documented once (the docstring under it).

``RunArgs`` holds what every training command has (``pretrain``, ``extend``,
``contrastive``, ``finetune``); ``LoopArgs`` adds what the commands that run this package's
own loop (:mod:`neobert.train.loop`) have. A command's ``train:`` section subclasses one of
them, adds its own fields and may change a default by declaring the field again; the
documentation stays here. Derived values are methods; ``__post_init__`` checks the values
(:mod:`neobert.validate`), so a bad one is one line before any work starts. ``neobert <command> --help`` prints
every key with its documentation and default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from neobert import validate
from neobert.errors import UserError
from neobert.train.optim import lr_at


@dataclass
class RunArgs:
    output_dir: str = "runs/pretrain"
    """The run directory: config.yaml, metrics.jsonl, checkpoints and the final model."""
    seed: int = 0
    """Seeds the weights of new layers, the data order and the masks."""
    lr: float = 6e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not norms or biases)."""
    bf16: bool | None = None
    """bf16 autocast (fp32 master weights); null: where bf16 is native (CUDA, AVX512-BF16/AMX CPUs)."""
    overwrite: bool = False
    """output_dir holds something else (an earlier run, another command's, files neobert did not write):
    replace neobert's files in it (a user's file at a name the run writes is still refused)."""

    def __post_init__(self):
        validate.positive("train.lr", self.lr)
        validate.non_negative("train.weight_decay", self.weight_decay)


@dataclass
class LoopArgs(RunArgs):
    max_steps: int = 1_000_000
    """Optimizer steps of the run."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 2000
    """Steps of linear warmup from 0 to lr."""
    decay_fraction: float = 0.9
    """Cosine decay ends at this fraction of max_steps; the rate is constant afterwards (0: no decay)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of lr (1: constant after warmup)."""
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    save_every: int = 1000
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    keep_checkpoints: int = 2
    """The newest K checkpoints are kept."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir | none | a checkpoint path."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl (and the last step)."""
    eval_every: int = 500
    """Steps between evaluations (0: only at the end)."""
    dist_timeout_minutes: float = 30.0
    """Under torchrun: how long a process waits in a collective (a barrier, an all-reduce) for
    the others before the run fails, e.g. while rank 0 writes a checkpoint or prepares data."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_steps", "eps", "save_every", "log_every", "dist_timeout_minutes"):
            validate.positive(f"train.{key}", getattr(self, key))
        for key in ("warmup_steps", "grad_clip", "keep_checkpoints", "eval_every"):
            validate.non_negative(f"train.{key}", getattr(self, key))
        validate.in_range("train.decay_fraction", self.decay_fraction, 0, 1)
        validate.in_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        if len(self.betas) != 2:
            raise UserError(f"train.betas={self.betas} must be two numbers")
        for beta in self.betas:
            validate.in_range("train.betas", beta, 0, 1, high_open=True)
        validate.device("train.device", self.device)
        if not str(self.resume).strip():
            raise UserError("train.resume is empty: use auto, none or a checkpoint directory")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) on this schedule."""
        return lr_at(step, self.lr, self.warmup_steps, self.max_steps, self.decay_fraction, self.min_lr_ratio)

    def clip_norm(self) -> float:
        """The norm gradients are clipped to (infinite when clipping is off: the norm is still measured)."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def is_last(self, step: int) -> bool:
        return step == self.max_steps

    def should_log(self, step: int) -> bool:
        return _every(self.log_every, step) or self.is_last(step)

    def should_eval(self, step: int) -> bool:
        return _every(self.eval_every, step) or self.is_last(step)

    def should_save(self, step: int) -> bool:
        return _every(self.save_every, step) or self.is_last(step)


def _every(interval: int, step: int) -> bool:
    return interval > 0 and step % interval == 0

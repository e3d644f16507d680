"""``neobert extend``: stage 2, context extension, run by the pretraining loop itself.

Stage 2 is stage 1 continued: the same loop (``pretrain.run``), checkpoints, resume and
logging, with three differences that this module sets up and nothing else:

- the weights (and, with ``model.init_optimizer=true``, the AdamW state) come from a
  stage-1 run directory or model directory, ``model.init_from``, and so does the
  architecture: an extend config names no layer sizes;
- rows are longer (``data.max_length``, recorded as the model's ``max_length``) and take
  their documents from length buckets (``data.bucket_thresholds`` /
  ``data.bucket_probabilities``; the paper's 0.2 / 0.4 / 0.4 over all / >= 1024 / >= 2048),
  read from a prepared corpus window by window (``neobert.data.mixture``), as stage 1 is;
- the learning rate is constant by default (no warmup, no decay).

The RoPE base is kept unless ``model.rope_theta`` is set. The run directory's
``config.yaml`` is the resolved pretraining config (architecture included), so
``neobert pretrain RUN/config.yaml`` would reproduce it too.

    neobert extend configs/tiny-extend.yaml model.init_from=runs/tiny-stage1
    torchrun --nproc_per_node=8 -m neobert extend configs/neobert-base-4096.yaml
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from neobert import validate
from neobert.config import command_config
from neobert.data import DataConfig
from neobert.errors import UserError
from neobert.tokenizer import load_tokenizer
from neobert.train import pretrain

# NeoBERTConfig fields that stage 2 inherits from stage 1 (rope_theta unless overridden); a
# tied stage-1 model has no separate decoder weight, so the tie is architecture too
ARCHITECTURE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "norm_eps",
    "rope_theta",
    "embedding_init_range",
    "decoder_init_range",
    "tie_word_embeddings",
)


@dataclass
class ExtendModelArgs:
    """Where stage 2 starts; the architecture is read from there."""

    init_from: str | None = None
    """Required: a stage-1 run dir (its final/ or newest checkpoint), checkpoint dir or model dir."""
    init_optimizer: bool = False
    """Also continue its AdamW state (needs a checkpoint: a run dir or checkpoint dir)."""
    rope_theta: float | None = None
    """null keeps the stage-1 model's RoPE base."""

    def __post_init__(self):
        validate.positive("model.rope_theta", self.rope_theta, allow_none=True)


@dataclass
class ExtendDataConfig(DataConfig):
    """``DataConfig`` with the paper's stage-2 defaults: rows of 4096 from three length buckets."""

    max_length: int = 4096
    bucket_thresholds: list[int] | None = field(default_factory=lambda: [0, 1024, 2048])
    bucket_probabilities: list[float] | None = field(default_factory=lambda: [0.2, 0.4, 0.4])


@dataclass
class ExtendTrainArgs(pretrain.TrainArgs):
    """``TrainArgs`` with stage-2 defaults: 50k steps at a constant learning rate."""

    output_dir: str = "runs/extend"
    max_steps: int = 50_000
    lr: float = 6e-5  # stage 1's final rate (10% of its 6e-4 peak), held constant
    warmup_steps: int = 0
    decay_fraction: float = 0.0
    min_lr_ratio: float = 1.0


@dataclass
class ExtendConfig:
    model: ExtendModelArgs = field(default_factory=ExtendModelArgs)
    data: ExtendDataConfig = field(default_factory=ExtendDataConfig)
    train: ExtendTrainArgs = field(default_factory=ExtendTrainArgs)


def source_config(source: str) -> dict:
    """The model config of ``source``: a model directory's config.json, a run directory's
    final/config.json, else the ``model:`` section of its (or its checkpoint's run's) config.yaml."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"model.init_from={source}: no such directory")
    for file in (path / "config.json", path / "final" / "config.json"):
        if file.is_file():
            config = json.loads(file.read_text())
            if config.get("model_type") != "neobert":
                raise UserError(f"model.init_from={source}: {file} is a {config.get('model_type')!r} model; extend continues NeoBERT models")
            return config
    for file in (path / "config.yaml", path.parent.parent / "config.yaml"):  # a run dir, or a checkpoint inside one
        if file.is_file():
            config = yaml.safe_load(file.read_text()).get("model", {})
            if config.get("hf_config"):
                raise UserError(f"model.init_from={source}: a model.hf_config run; extend continues NeoBERT models")
            return config
    raise UserError(f"model.init_from={source}: no config.json, final/config.json or config.yaml (not a model or run directory)")


def resolve(cfg: ExtendConfig) -> pretrain.PretrainConfig:
    """The pretraining config that runs this extension: the source's architecture at the new length."""
    if not cfg.model.init_from:
        raise UserError("model.init_from is required: the stage-1 run directory or model directory to extend")
    source = source_config(cfg.model.init_from)
    vocab = source.get("vocab_size")
    tokenizer_size = len(load_tokenizer(cfg.data.tokenizer))
    if vocab is not None and vocab != tokenizer_size:
        raise UserError(
            f"model.init_from={cfg.model.init_from} has vocab_size {vocab} but the tokenizer (data.tokenizer={cfg.data.tokenizer}) "
            f"has {tokenizer_size} tokens: set data.tokenizer to the stage-1 tokenizer"
        )
    defaults = pretrain.ModelArgs()
    arch = {k: source.get(k, getattr(defaults, k)) for k in ARCHITECTURE}
    if cfg.model.rope_theta is not None:
        arch["rope_theta"] = cfg.model.rope_theta
    model = pretrain.ModelArgs(
        **arch, max_length=cfg.data.max_length, init_from=cfg.model.init_from, init_optimizer=cfg.model.init_optimizer
    )
    data = DataConfig(**{f.name: getattr(cfg.data, f.name) for f in fields(DataConfig)})
    train = pretrain.TrainArgs(**{f.name: getattr(cfg.train, f.name) for f in fields(pretrain.TrainArgs)})
    if os.environ.get("RANK", "0") == "0":
        print(
            f"extend {cfg.model.init_from}: max_length {source.get('max_length', '?')} -> {cfg.data.max_length}, "
            f"rope_theta {source.get('rope_theta', defaults.rope_theta)} -> {arch['rope_theta']}, "
            f"buckets {data.bucket_thresholds} with probabilities {data.bucket_probabilities}"
        )
    return pretrain.PretrainConfig(model=model, data=data, train=train)


def run(cfg: ExtendConfig) -> Path:
    """Extend to ``train.max_steps``; returns the final Hugging Face model directory."""
    return pretrain.run(resolve(cfg))


def main(argv: list[str]) -> int:
    run(command_config(ExtendConfig, argv, "neobert extend", __doc__.split("\n\n")[0]))
    return 0

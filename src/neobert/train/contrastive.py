"""``neobert contrastive``: sentence-embedding fine-tuning with InfoNCE, as the paper does.

    neobert contrastive configs/contrastive-news.yaml model.init_from=runs/demo train.output_dir=runs/demo-st
    torchrun --nproc_per_node=8 -m neobert contrastive configs/contrastive.yaml

The loss is InfoNCE on cosine similarity with temperature ``loss.temperature`` (0.07):
each query's positive against every other positive in the batch and every hard
negative in the batch; ``loss.symmetric`` adds the positive -> query direction and
averages the two. It is sentence-transformers' ``MultipleNegativesRankingLoss``, or
with ``loss.mini_batch_size`` its gradient-cached version (GradCache, Gao et al. 2021):
the batch is embedded in chunks without a graph, the loss's gradients with respect to
the embeddings are cached, and the chunks are embedded again with a graph to receive
them, so a contrastive batch of any size fits in the memory of one chunk. Across
``torchrun`` processes, embeddings are gathered so all ranks share negatives.

Data (``data.datasets``, a list): JSONL, CSV/TSV or parquet files, ``hf:NAME[:CONFIG]``
datasets, or ``builtin:news-titles`` (headline -> article pairs from the news corpus,
without the headlines of the retrieval evaluation). Rows are (query, positive[,
negatives]), with columns ``query``/``anchor``/``question``, ``positive``/``document``/
``answer`` and ``negative``, ``negative_1``.. or a list ``negatives``; or scored pairs
(``sentence1``, ``sentence2``, ``score``), kept as positives when score >= ``min_score``. Each dataset may set instructions prepended to its queries and
documents. Each contrastive batch comes from one dataset, drawn with probability
proportional to size^0.5 (``data.sampling_power``), so no batch mixes tasks and
small datasets are seen more often than their share.

The run directory has the same layout as pretraining (config.yaml, metrics.jsonl,
tensorboard/, atomic checkpoints/ with ``train.resume=auto``) and ends with ``final/``,
a sentence-transformers directory (``neobert export-st --model RUN`` makes the portable copy).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import cos_sim

from neobert import validate
from neobert.config import command_config, from_dict, to_dict
from neobert.data.pairs import DatasetArgs, PairSet, batch_plan, dataset_probabilities, load_pairs
from neobert.device import autocast
from neobert.embeddings import Encoder, load_encoder
from neobert.errors import UserError
from neobert.files import atomic_dir
from neobert.models import resolve_model
from neobert.train import common, loop
from neobert.train.args import LoopArgs
from neobert.train.optim import build_optimizer


@dataclass
class ModelArgs:
    init_from: str = ""
    """The encoder to fine-tune, what --model accepts: a neobert run dir, a HF encoder dir, a sentence-transformers dir."""
    pooling: str = "mean"
    """mean | cls, for HF encoders (a sentence-transformers dir keeps its own)."""
    max_length: int = 256
    """Tokens per text; longer texts are truncated."""

    def __post_init__(self):
        validate.positive("model.max_length", self.max_length)


@dataclass
class DataArgs:
    datasets: list[dict] = field(default_factory=list)
    """The training datasets, one mapping of DatasetArgs fields each (path, name, split,
    query_instruction, document_instruction, min_score, max_rows)."""
    sampling_power: float = 0.5
    """A batch's dataset is drawn with probability proportional to size ** power."""

    def __post_init__(self):
        validate.non_negative("data.sampling_power", self.sampling_power)


@dataclass
class LossArgs:
    temperature: float = 0.07
    """InfoNCE temperature."""
    symmetric: bool = False
    """Also positive -> queries, averaged with query -> documents."""
    hard_negatives: int = 1
    """At most this many negatives per row, where the data has them (0: in-batch only)."""
    mini_batch_size: int = 32
    """Gradient cache: texts per forward pass; 0 embeds the whole batch at once."""

    def __post_init__(self):
        validate.positive("loss.temperature", self.temperature)
        validate.non_negative("loss.hard_negatives", self.hard_negatives)
        validate.non_negative("loss.mini_batch_size", self.mini_batch_size)


@dataclass
class TrainArgs(LoopArgs):
    """Optimisation, schedule, checkpoints, logging and evaluation (shared keys: :class:`LoopArgs`)."""

    output_dir: str = "runs/contrastive"
    max_steps: int = 2000
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay_fraction: float = 1.0
    min_lr_ratio: float = 0.0
    save_every: int = 500
    eval_every: int = 0
    batch_size: int = 256
    """(query, positive) rows per contrastive batch, over all processes."""
    grad_accumulation: int = 1
    """Contrastive batches per optimizer step (each with its own negatives)."""
    eval_sts: str | None = None
    """An STS file (e.g. ../shared/data/glue/STS-B/dev.tsv): logs sts_spearman."""
    eval_retrieval: str | None = None
    """'news' or a BEIR-layout directory: logs ndcg@10, mrr@10."""
    eval_batch_size: int = 64
    """Texts per forward pass in evaluations."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("batch_size", "grad_accumulation", "eval_batch_size"):
            validate.positive(f"train.{key}", getattr(self, key))


@dataclass
class ContrastiveConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


# ---------------------------------------------------------------------------------------
# Loss


def cosine_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix in float32 even under bf16 autocast: at temperature 0.07 the
    logits reach 14, where bf16 resolves steps of 0.06."""
    with torch.autocast(a.device.type, enabled=False):
        return cos_sim(a.float(), b.float())


def build_loss(model: torch.nn.Module, args: LossArgs, distributed: bool = False) -> torch.nn.Module:
    """InfoNCE (sentence-transformers' MultipleNegativesRankingLoss), gradient-cached when
    ``args.mini_batch_size`` > 0. Call it as ``loss([queries, positives, *negatives], None)``
    with tokenized features; a cached loss does its second pass inside ``.backward()``."""
    kwargs = dict(
        scale=1.0 / args.temperature,
        similarity_fct=cosine_fp32,
        gather_across_devices=distributed,
        # symmetric: the mean of the query->document and document->query cross-entropies
        directions=("query_to_doc", "doc_to_query") if args.symmetric else ("query_to_doc",),
        partition_mode="per_direction" if args.symmetric else "joint",
    )
    if args.mini_batch_size > 0:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size, **kwargs)
    return MultipleNegativesRankingLoss(model, **kwargs)


def _set_loss_model(loss: torch.nn.Module, model: torch.nn.Module) -> None:
    """Point the loss (and the loss it wraps) at the DDP-wrapped model, as the
    sentence-transformers trainer does: the wrapper cannot be passed at construction."""
    for module in (loss, *loss.children()):
        if "model" in module._modules:
            module._modules["model"] = model


# ---------------------------------------------------------------------------------------
# The run


def main(argv: list[str]) -> int:
    run(command_config(ContrastiveConfig, argv, "neobert contrastive", __doc__.split("\n\n")[0]))
    return 0


def run(cfg: ContrastiveConfig) -> Path:
    """Train to ``train.max_steps``; returns the final sentence-transformers directory."""
    args = cfg.train
    if not cfg.model.init_from:
        raise UserError("model.init_from is required: the encoder to fine-tune (a neobert run dir, HF or sentence-transformers dir)")
    if not cfg.data.datasets:
        raise UserError("data.datasets is empty: give at least one dataset, e.g. data.datasets=[{path: builtin:news-titles}]")
    dist = common.setup_distributed(args.device, args.dist_timeout_minutes)
    if args.batch_size % dist.world:
        raise UserError(f"train.batch_size={args.batch_size} must be a multiple of the {dist.world} processes")
    per_rank = args.batch_size // dist.world
    run_dir = loop.claim(args, dist, "contrastive")  # before any data is read
    sets = load_datasets(cfg)
    st_model, model, loss_fn, optimizer = build_model_loss_and_optimizer(cfg, sets, dist)

    state, resumed_from, logger = loop.start(cfg, args, dist, st_model, optimizer, counters={"pairs": 0}, run=run_dir)
    plan = batch_plan([len(s.rows) for s in sets], args.batch_size, args.seed, cfg.data.sampling_power)
    for _ in range(state["step"] * args.grad_accumulation):  # replay the plan to where the checkpoint stopped
        next(plan)
    if dist.is_main:
        probs = dataset_probabilities([len(s.rows) for s in sets], cfg.data.sampling_power)
        sizes = ", ".join(f"{s.name} {len(s.rows)} rows ({len(s.rows[0][2])} negatives, p={p:.2f})" for s, p in zip(sets, probs))
        print(f"datasets: {sizes} | batch {args.batch_size} x {args.grad_accumulation} accumulation, {dist.world} processes"
              + (f" | resumed from {resumed_from}" if resumed_from else ""))

    pairs = state["pairs"]
    model.train()

    def train_step(step: int) -> loop.StepResult:
        nonlocal pairs
        step_loss, step_tokens, names = 0.0, 0, []
        for m in range(args.grad_accumulation):
            k, idx = next(plan)
            names.append(sets[k].name)
            mine = idx[dist.rank * per_rank : (dist.rank + 1) * per_rank]
            features = []
            for texts in sets[k].columns(mine):
                feats = st_model.preprocess(texts)
                features.append({key: v.to(dist.device) if torch.is_tensor(v) else v for key, v in feats.items()})
                step_tokens += int(feats["attention_mask"].sum())
            skip_sync = m < args.grad_accumulation - 1 and hasattr(model, "no_sync")
            # a cached loss embeds again inside backward(): keep autocast on around it
            with model.no_sync() if skip_sync else nullcontext(), autocast(dist.device, args.bf16):
                loss = loss_fn(features, None)
                (loss / args.grad_accumulation).backward()
            step_loss += float(loss.detach()) / args.grad_accumulation
        pairs += args.batch_size * args.grad_accumulation
        return loop.StepResult(dist.all_sum(step_loss) / dist.world, int(dist.all_sum(step_tokens)), {"pairs": pairs}, {"dataset": names[-1]})

    def evaluate_embeddings(step: int) -> tuple[dict, str] | None:
        if not (args.eval_sts or args.eval_retrieval):
            return None
        result = evaluate(st_model, args) if dist.is_main else {}
        dist.barrier()
        return result, ", ".join(f"{k} {v:.4f}" for k, v in result.items())

    def save(step: int, result: loop.StepResult) -> None:
        common.save_checkpoint(run_dir.path, step, st_model, optimizer, {**result.counters, "config": to_dict(cfg)},
                               args.keep_checkpoints, dist, run_dir.run_id)

    step = loop.run_loop(args, dist, optimizer, st_model.parameters(), state["step"], train_step, evaluate_embeddings, save,
                         logger, desc="contrastive")
    final = run_dir.path / "final"
    save_final(st_model, final, dist)
    loop.finish(logger, dist, f"done: {step} steps, {pairs:,} pairs; sentence-transformers model in {final}")
    return final


def load_datasets(cfg: ContrastiveConfig) -> list[PairSet]:
    specs = [from_dict(DatasetArgs, spec, "data.datasets", f"data.datasets[{i}].") for i, spec in enumerate(cfg.data.datasets)]
    return [load_pairs(spec, cfg.loss.hard_negatives) for spec in specs]


def build_model_loss_and_optimizer(cfg: ContrastiveConfig, sets: list[PairSet], dist: common.Dist):
    """The sentence-transformers model (seeded), its process wrapper, the loss and AdamW."""
    args = cfg.train
    common.seed_everything(args.seed)
    # decided on the directory the name resolves to (a run directory's final/), as load_encoder does
    source = resolve_model(cfg.model.init_from)
    pooling = None if (Path(source) / "modules.json").is_file() else cfg.model.pooling
    st_model = load_encoder(source, pooling=pooling, max_length=cfg.model.max_length, device=str(dist.device)).model
    st_model.prompts = _shared_prompts(sets) or st_model.prompts
    if args.gradient_checkpointing:
        st_model[0].auto_model.gradient_checkpointing_enable()
    model = st_model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(st_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    loss_fn = build_loss(st_model, cfg.loss, distributed=dist.world > 1)
    _set_loss_model(loss_fn, model)
    optimizer = build_optimizer(st_model, args.lr, args.weight_decay, tuple(args.betas), args.eps)
    return st_model, model, loss_fn, optimizer


# ---------------------------------------------------------------------------------------
# Evaluation, export


def evaluate(st_model, args: TrainArgs) -> dict:
    """STS Spearman and retrieval metrics of the current model (whichever are configured)."""
    from neobert.data.retrieval import news_split, read_retrieval_set
    from neobert.eval import retrieval, sts

    encoder = Encoder(st_model)
    st_model.eval()
    result = {}
    if args.eval_sts:
        s1, s2, gold = sts.read_sts(args.eval_sts)
        result["sts_spearman"] = sts.evaluate_sts(encoder, s1, s2, gold, args.eval_batch_size)["spearman"]
    if args.eval_retrieval:
        data = news_split()[0] if args.eval_retrieval == "news" else read_retrieval_set(args.eval_retrieval)
        metrics = retrieval.evaluate_encoder(data, encoder, args.eval_batch_size)
        result |= {"ndcg@10": metrics["ndcg@10"], "mrr@10": metrics["mrr@10"]}
    st_model.train()
    return result


def save_final(st_model, path: Path, dist: common.Dist) -> None:
    """The sentence-transformers directory, written whole then renamed into place."""
    if dist.is_main:
        with atomic_dir(path) as tmp:
            st_model.save(str(tmp))
    dist.barrier()


def _shared_prompts(sets: list[PairSet]) -> dict[str, str]:
    """Instructions saved with the model when every dataset uses the same ones."""
    pairs = {(s.query_instruction, s.document_instruction) for s in sets}
    if len(pairs) != 1:
        return {}
    query, document = pairs.pop()
    return {"query": query, "document": document} if query or document else {}

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
``answer`` (or any two named by ``query_column``/``positive_column``) and ``negative``,
``negative_1``.. or a list ``negatives``; or scored pairs
(``sentence1``, ``sentence2``, ``score``), kept as positives when score >= ``min_score``. Each dataset may set instructions prepended to its queries and
documents. Each contrastive batch comes from one dataset, drawn with probability
proportional to size^0.5 (``data.sampling_power``), so no batch mixes tasks and
small datasets are seen more often than their share.

The run directory has the same layout as pretraining (config.yaml, metrics.jsonl,
tensorboard/, atomic checkpoints/ with ``train.resume=auto``) and ends with ``final/``,
a sentence-transformers directory (``neobert export-st --model RUN`` makes the portable copy).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import cos_sim
from tqdm.auto import tqdm

from neobert import rundir, validate
from neobert.config import from_dict, load_config, save_config, split_args, to_dict
from neobert.embeddings import Encoder, load_encoder
from neobert.errors import UserError
from neobert.train import common

csv.field_size_limit(sys.maxsize)

QUERY_KEYS = ("query", "anchor", "question")
POSITIVE_KEYS = ("positive", "document", "answer")


@dataclass
class DatasetArgs:
    """One training dataset (an item of ``data.datasets``)."""

    path: str = ""  # a .jsonl/.csv/.tsv/.parquet file, hf:NAME[:CONFIG], or builtin:news-titles
    name: str = ""  # label in logs (default: the file name)
    split: str = "train"  # hf: datasets only
    query_instruction: str = ""  # prepended to every query, e.g. "Given a headline, retrieve the article: "
    document_instruction: str = ""  # prepended to positives and negatives
    min_score: float | None = None  # scored pairs: keep those with score >= min_score (required for them)
    max_rows: int | None = None  # use only the first N rows
    # The query and positive columns when their names are not among the recognised ones
    # (e.g. sentence-transformers/wikihow: text -> summary); both or neither.
    query_column: str = ""
    positive_column: str = ""


@dataclass
class ModelArgs:
    init_from: str = ""  # what --model accepts: a neobert run dir, a HF encoder dir, a sentence-transformers dir
    pooling: str = "mean"  # mean | cls, for HF encoders (a sentence-transformers dir keeps its own)
    max_length: int = 256  # tokens per text; longer texts are truncated

    def __post_init__(self):
        validate.positive("model.max_length", self.max_length)


@dataclass
class DataArgs:
    datasets: list[dict] = field(default_factory=list)  # DatasetArgs fields, one mapping per dataset
    sampling_power: float = 0.5  # dataset drawn with probability proportional to size ** power

    def __post_init__(self):
        validate.non_negative("data.sampling_power", self.sampling_power)


@dataclass
class LossArgs:
    temperature: float = 0.07
    symmetric: bool = False  # also positive -> queries, averaged with query -> documents
    hard_negatives: int = 1  # at most this many negatives per row, where the data has them (0: in-batch only)
    mini_batch_size: int = 32  # gradient cache: texts per forward pass; 0 embeds the whole batch at once

    def __post_init__(self):
        validate.positive("loss.temperature", self.temperature)
        validate.non_negative("loss.hard_negatives", self.hard_negatives)
        validate.non_negative("loss.mini_batch_size", self.mini_batch_size)


@dataclass
class TrainArgs:
    output_dir: str = "runs/contrastive"
    max_steps: int = 2000
    seed: int = 0
    batch_size: int = 256  # (query, positive) rows per contrastive batch, over all processes
    grad_accumulation: int = 1  # contrastive batches per optimizer step (each with its own negatives)
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay_fraction: float = 1.0  # cosine decay ends at this fraction of max_steps
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    bf16: bool | None = None  # bf16 autocast (fp32 master weights); None: where bf16 is native (CUDA, AVX512-BF16/AMX CPUs)
    gradient_checkpointing: bool = False
    device: str = "auto"
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | a checkpoint path
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_sts: str | None = None  # an STS file (e.g. ../shared/data/glue/STS-B/dev.tsv): logs sts_spearman
    eval_retrieval: str | None = None  # 'news' or a BEIR-layout directory: logs ndcg@10, mrr@10
    eval_batch_size: int = 64
    overwrite: bool = False  # output_dir holds something else (an earlier run, other files): replace neobert's files in it

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accumulation", "lr", "eps", "save_every", "log_every", "eval_batch_size"):
            validate.positive(f"train.{key}", getattr(self, key))
        for key in ("weight_decay", "warmup_steps", "grad_clip", "keep_checkpoints", "eval_every"):
            validate.non_negative(f"train.{key}", getattr(self, key))
        validate.in_range("train.decay_fraction", self.decay_fraction, 0, 1)
        validate.in_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        validate.device("train.device", self.device)


@dataclass
class ContrastiveConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class PairSet:
    """Rows of one dataset: ``(query, positive, negatives)`` with the same number of negatives each."""

    name: str
    rows: list[tuple[str, str, list[str]]]
    query_instruction: str = ""
    document_instruction: str = ""

    def columns(self, idx) -> list[list[str]]:
        """Texts of rows ``idx`` as loss inputs: queries, positives, then each negative column."""
        rows = [self.rows[i] for i in idx]
        cols = [[self.query_instruction + q for q, _, _ in rows], [self.document_instruction + p for _, p, _ in rows]]
        n_neg = len(rows[0][2]) if rows else 0
        cols += [[self.document_instruction + negs[j] for _, _, negs in rows] for j in range(n_neg)]
        return cols


def _read_records(args: DatasetArgs) -> list[dict]:
    """Raw rows of a dataset as dicts."""
    if args.path == "builtin:news-titles":
        from neobert.eval.retrieval import news_split

        return [{"query": a["title"], "positive": a["text"]} for a in news_split()[1]]
    if args.path.startswith("hf:"):
        import datasets

        name, _, config = args.path[3:].partition(":")
        try:
            return list(datasets.load_dataset(name, config or None, split=args.split))
        except Exception as e:  # offline, unknown name or split: one line for the user
            raise UserError(f"dataset {args.path}: {str(e).splitlines()[0]}") from None
    path = Path(args.path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {args.path}")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {n}: not valid JSON") from None
        return rows
    if path.suffix in (".csv", ".tsv"):
        tab = path.suffix == ".tsv"
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if tab else ",", quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL))
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    raise UserError(f"{args.path}: unknown format (use .jsonl, .csv, .tsv, .parquet, hf:NAME or builtin:news-titles)")


def _negatives(record: dict) -> list[str]:
    if isinstance(record.get("negatives"), list):
        return [str(x) for x in record["negatives"]]
    if record.get("negative") not in (None, ""):
        return [str(record["negative"])]
    numbered = sorted((k for k in record if k.startswith("negative_") and k[9:].isdigit()), key=lambda k: int(k[9:]))
    return [str(record[k]) for k in numbered if record[k] not in (None, "")]


def load_pairs(args: DatasetArgs, hard_negatives: int) -> PairSet:
    """A dataset as a :class:`PairSet`; every row keeps the same number of negatives
    (``hard_negatives``, or fewer when some row has fewer)."""
    where = args.name or args.path
    records = _read_records(args)[: args.max_rows]
    if not records:
        raise UserError(f"dataset {where}: no rows")
    keys = set(records[0])
    q_key = next((k for k in QUERY_KEYS if k in keys), None)
    p_key = next((k for k in POSITIVE_KEYS if k in keys), None)
    if args.query_column or args.positive_column:
        if not (args.query_column in keys and args.positive_column in keys):
            raise UserError(f"dataset {where}: query_column={args.query_column!r} and positive_column={args.positive_column!r} must both name columns of {sorted(keys)}")
        q_key, p_key = args.query_column, args.positive_column
    rows: list[tuple[str, str, list[str]]] = []
    if q_key and p_key:
        for n, r in enumerate(records, 1):
            if r.get(q_key) in (None, "") or r.get(p_key) in (None, ""):
                raise UserError(f"dataset {where} row {n}: empty {q_key} or {p_key}")
            rows.append((str(r[q_key]), str(r[p_key]), _negatives(r)))
    elif {"sentence1", "sentence2", "score"} <= keys:
        if args.min_score is None:
            raise UserError(f"dataset {where}: scored pairs (sentence1, sentence2, score) need min_score, the score from which a pair is a positive")
        for n, r in enumerate(records, 1):
            try:
                score = float(r["score"])
            except (TypeError, ValueError):
                raise UserError(f"dataset {where} row {n}: score {r['score']!r} is not a number") from None
            if score >= args.min_score:
                rows.append((str(r["sentence1"]), str(r["sentence2"]), []))
        if not rows:
            raise UserError(f"dataset {where}: no pair has score >= min_score={args.min_score}")
    else:
        raise UserError(
            f"dataset {where}: columns {sorted(keys)}; expected query (or anchor, question) and positive (or document, answer) "
            "[with negative, negative_1.. or negatives], or sentence1, sentence2 and score"
        )
    k = min([hard_negatives] + [len(negs) for _, _, negs in rows])
    rows = [(q, p, negs[:k]) for q, p, negs in rows]
    name = args.name or Path(args.path).stem or args.path
    return PairSet(name, rows, args.query_instruction, args.document_instruction)


def dataset_probabilities(sizes: list[int], power: float = 0.5) -> np.ndarray:
    """Probability of drawing each dataset for a batch: proportional to size ** power."""
    w = np.asarray(sizes, dtype=np.float64) ** power
    return w / w.sum()


def batch_plan(sizes: list[int], batch_size: int, seed: int, power: float = 0.5) -> Iterator[tuple[int, np.ndarray]]:
    """``(dataset index, row indices)`` for every contrastive batch, forever; a pure function of its arguments.

    A dataset is drawn with :func:`dataset_probabilities`, then the next ``batch_size`` rows
    of its current shuffled pass (each pass a fresh permutation; the incomplete tail of a
    pass is skipped). Resuming replays the plan up to the step reached: only indices.
    """
    too_small = [s for s in sizes if s < batch_size]
    if too_small:
        raise UserError(f"a dataset has {min(too_small)} rows, fewer than train.batch_size={batch_size}")
    probs = dataset_probabilities(sizes, power)
    rng = np.random.default_rng(seed)
    passes = [0] * len(sizes)
    cursors = [0] * len(sizes)
    orders = [np.random.default_rng([seed, k, 0]).permutation(n) for k, n in enumerate(sizes)]
    while True:
        k = int(rng.choice(len(sizes), p=probs))
        if cursors[k] + batch_size > sizes[k]:
            passes[k] += 1
            orders[k] = np.random.default_rng([seed, k, passes[k]]).permutation(sizes[k])
            cursors[k] = 0
        yield k, orders[k][cursors[k] : cursors[k] + batch_size]
        cursors[k] += batch_size


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
# Evaluation, checkpoints


def evaluate(st_model, a: TrainArgs) -> dict:
    """STS Spearman and retrieval metrics of the current model (whichever are configured)."""
    from neobert.eval import retrieval, sts

    encoder = Encoder(st_model)
    st_model.eval()
    result = {}
    if a.eval_sts:
        s1, s2, gold = sts.read_sts(a.eval_sts)
        result["sts_spearman"] = sts.evaluate_sts(encoder, s1, s2, gold, a.eval_batch_size)["spearman"]
    if a.eval_retrieval:
        data = retrieval.news_split()[0] if a.eval_retrieval == "news" else retrieval.read_retrieval_set(a.eval_retrieval)
        metrics = retrieval.evaluate_encoder(data, encoder, a.eval_batch_size)
        result |= {"ndcg@10": metrics["ndcg@10"], "mrr@10": metrics["mrr@10"]}
    st_model.train()
    return result


def save_final(st_model, path: Path, d: common.Dist) -> None:
    """The sentence-transformers directory, written whole then renamed into place."""
    if d.main:
        tmp = rundir.make_temp_dir(path, "final")
        try:
            st_model.save(str(tmp))
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise rundir.write_failure(path, e) from None
        if path.exists():
            rundir.safe_rmtree(path)
        os.replace(tmp, path)
    d.barrier()


def _shared_prompts(sets: list[PairSet]) -> dict[str, str]:
    """Instructions saved with the model when every dataset uses the same ones."""
    pairs = {(s.query_instruction, s.document_instruction) for s in sets}
    if len(pairs) != 1:
        return {}
    q, doc = pairs.pop()
    return {"query": q, "document": doc} if q or doc else {}


# ---------------------------------------------------------------------------------------
# The run


def run(cfg: ContrastiveConfig) -> Path:
    """Train to ``train.max_steps``; returns the final sentence-transformers directory."""
    a, la = cfg.train, cfg.loss
    if not cfg.model.init_from:
        raise UserError("model.init_from is required: the encoder to fine-tune (a neobert run dir, HF or sentence-transformers dir)")
    if not cfg.data.datasets:
        raise UserError("data.datasets is empty: give at least one dataset, e.g. data.datasets=[{path: builtin:news-titles}]")
    d = common.setup_distributed(a.device)
    if a.batch_size % d.world:
        raise UserError(f"train.batch_size={a.batch_size} must be a multiple of the {d.world} processes")
    per_rank = a.batch_size // d.world
    run_dir = common.open_run(a.output_dir, "contrastive", a.resume, a.overwrite, d)  # before any data is read
    out = run_dir.path

    specs = [from_dict(DatasetArgs, spec, "data.datasets", f"data.datasets[{i}].") for i, spec in enumerate(cfg.data.datasets)]
    sets = [load_pairs(spec, la.hard_negatives) for spec in specs]

    common.seed_everything(a.seed)
    pooling = None if (Path(cfg.model.init_from) / "modules.json").is_file() else cfg.model.pooling
    st_model = load_encoder(cfg.model.init_from, pooling=pooling, max_length=cfg.model.max_length, device=str(d.device)).model
    st_model.prompts = _shared_prompts(sets) or st_model.prompts
    if a.gradient_checkpointing:
        st_model[0].auto_model.gradient_checkpointing_enable()
    model = st_model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(st_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    loss_fn = build_loss(st_model, la, distributed=d.world > 1)
    _set_loss_model(loss_fn, model)
    optimizer = common.build_optimizer(st_model, a.lr, a.weight_decay, tuple(a.betas), a.eps)

    resume_from = common.resolve_resume(a.resume, run_dir, d)
    state = {"step": 0, "pairs": 0}
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, st_model, optimizer)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = common.MetricsLogger(out, d.main, resume_step=state["step"] if resume_from else None)

    plan = batch_plan([len(s.rows) for s in sets], a.batch_size, a.seed, cfg.data.sampling_power)
    step, pairs = state["step"], state["pairs"]
    for _ in range(step * a.grad_accumulation):  # replay the plan to where the checkpoint stopped
        next(plan)
    if d.main:
        probs = dataset_probabilities([len(s.rows) for s in sets], cfg.data.sampling_power)
        sizes = ", ".join(f"{s.name} {len(s.rows)} rows ({len(s.rows[0][2])} negatives, p={p:.2f})" for s, p in zip(sets, probs))
        print(f"datasets: {sizes} | batch {a.batch_size} x {a.grad_accumulation} accumulation, {d.world} processes"
              + (f" | resumed from {resume_from}" if resume_from else ""))

    model.train()
    bar = tqdm(total=a.max_steps, initial=step, disable=not d.main, desc="contrastive", dynamic_ncols=True)
    speed = common.Throughput()
    while step < a.max_steps:
        lr = common.lr_at(step, a.lr, a.warmup_steps, a.max_steps, a.decay_fraction, a.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens, names = 0.0, 0, []
        for m in range(a.grad_accumulation):
            k, idx = next(plan)
            names.append(sets[k].name)
            mine = idx[d.rank * per_rank : (d.rank + 1) * per_rank]
            features = []
            for texts in sets[k].columns(mine):
                feats = st_model.preprocess(texts)
                features.append({key: v.to(d.device) if torch.is_tensor(v) else v for key, v in feats.items()})
                step_tokens += int(feats["attention_mask"].sum())
            skip_sync = m < a.grad_accumulation - 1 and hasattr(model, "no_sync")
            # a cached loss embeds again inside backward(): keep autocast on around it
            with model.no_sync() if skip_sync else nullcontext(), common.autocast(d.device, a.bf16):
                loss = loss_fn(features, None)
                (loss / a.grad_accumulation).backward()
            step_loss += float(loss.detach()) / a.grad_accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(st_model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pairs += a.batch_size * a.grad_accumulation
        step_tokens = int(d.all_sum(step_tokens))
        speed.add(step_tokens)
        loss_value = d.all_sum(step_loss) / d.world
        bar.update(1)
        if step % a.log_every == 0 or step == a.max_steps:
            tps = speed.rate()
            logger.log({"step": step, "loss": loss_value, "lr": lr, "pairs": pairs, "tokens_per_s": tps,
                        "grad_norm": float(grad_norm), "dataset": names[-1]})
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        if (a.eval_sts or a.eval_retrieval) and ((a.eval_every and step % a.eval_every == 0) or step == a.max_steps):
            if d.main:
                result = evaluate(st_model, a)
                logger.log({"step": step, **result})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            d.barrier()
        if step % a.save_every == 0 or step == a.max_steps:
            common.save_checkpoint(out, step, st_model, optimizer, {"pairs": pairs, "config": to_dict(cfg)}, a.keep_checkpoints, d, run_dir.run_id)
    bar.close()
    save_final(st_model, out / "final", d)
    logger.close()
    if d.main:
        print(f"done: {step} steps, {pairs:,} pairs; sentence-transformers model in {out / 'final'}")
    common.teardown_distributed()
    return out / "final"


def main(argv: list[str]) -> int:
    path, overrides = split_args(argv)
    run(load_config(ContrastiveConfig, path, overrides))
    return 0

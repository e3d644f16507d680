"""Fine-tuning any encoder on a labelled task with the paper's protocol: ``run(cfg, data)``.

The loop is ``transformers.Trainer``: AdamW, linear warmup over ``train.warmup_ratio``
(6%) of the steps then linear decay to zero, optional bf16 autocast, gradient
accumulation, batches padded to their longest row (``DataCollatorWithPadding``),
evaluation every min(500, steps per epoch / 10) optimizer steps, early stopping after
``train.patience`` evaluations without a better task score, and the best checkpoint
restored at the end. Any ``AutoModelForSequenceClassification`` (or, for token
classification, ``AutoModelForTokenClassification``) model works: a NeoBERT directory, a
BERT, a hub name; ``all-MiniLM-L6-v2`` is served from its pip package.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (the Trainer's log lines),
``results.json`` (task, split, metrics, score, model, hyperparameters, seed) and ``best/``,
a Hugging Face directory with the tokenizer that ``pipeline("text-classification")``
(or ``"token-classification"``) loads; NeoBERT models need ``import neobert`` first.

``neobert finetune CONFIG.yaml [key=value ...]`` fine-tunes on own data (``data.*``: CSV,
TSV, JSONL, parquet or CoNLL files) or, with ``glue.task`` set, on a GLUE task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from neobert import rundir, validate
from neobert.config import command_config, save_config
from neobert.data.glue import TaskData, load_glue, load_labelled
from neobert.device import use_bf16
from neobert.errors import UserError
from neobert.eval.metrics import compute_metrics, task_score
from neobert.files import atomic_dir
from neobert.loading import strict_weights
from neobert.models import resolve_model
from neobert.tokenizer import load_tokenizer
from neobert.train.args import RunArgs


@dataclass
class ModelArgs:
    name: str | None = None
    """A Hugging Face model directory or hub name: a NeoBERT directory (or a neobert run
    directory, whose final/ is used), a BERT, ...; all-MiniLM-L6-v2 comes from its package."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name; null: the model's own, or NeoBERT's default
    (bert-base-uncased WordPiece) when a NeoBERT directory holds no tokenizer."""
    classifier_dropout: float | None = 0.1
    """Dropout of the classification head (the released GLUE runs: 0.1), set on models whose config has
    classifier_dropout (NeoBERT, BERT, RoBERTa, ...); null keeps the model's own."""

    def __post_init__(self):
        if self.classifier_dropout is not None:
            validate.in_range("model.classifier_dropout", self.classifier_dropout, 0, 1, high_open=True)


@dataclass
class OwnDataArgs:
    train: str | None = None
    """Training file: .csv, .tsv, .jsonl, .json, .parquet; for token classification also
    CoNLL (.conll, .txt: "word ... tag" lines, a blank line between sentences)."""
    validation: str | None = None
    """Validation file; null: hold out validation_fraction of train (the same rows every run)."""
    test: str | None = None
    """Test file, evaluated once with the best model."""
    task_type: str = "classification"
    """classification, regression or token_classification."""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    """One text column, or two for pairs."""
    label_column: str = "label"
    """The column of the labels (scores for regression, tag lists for token classification)."""
    labels: list[str] | None = None
    """The label set; null: the values seen in train, sorted."""
    validation_fraction: float = 0.1
    """Share of train held out when there is no validation file."""
    name: str = "custom"
    """The task name in results.json."""

    def __post_init__(self):
        validate.in_range("data.validation_fraction", self.validation_fraction, 0, 1, low_open=True, high_open=True)


@dataclass
class TrainArgs(RunArgs):
    """The ``transformers.Trainer`` run (shared keys: :class:`RunArgs`)."""

    output_dir: str = "runs/finetune"
    lr: float = 2e-5
    weight_decay: float = 0.01
    epochs: float = 10.0
    """Epochs (the paper: 10, with early stopping)."""
    max_steps: int = -1
    """> 0: stop after this many optimizer steps instead of epochs."""
    batch_size: int = 32
    """Sequences per optimizer step (all accumulation steps together)."""
    grad_accum: int = 1
    """batch_size is split into this many forward/backward passes."""
    eval_batch_size: int = 64
    """Sequences per evaluation forward pass."""
    warmup_ratio: float = 0.06
    """Share of the steps with a linear warmup; the rate then decays linearly to 0."""
    max_length: int = 1024
    """Tokens per row, special tokens included; longer rows are truncated (the released runs: 1024;
    docs/fidelity.md says when 128, faster on a CPU, gives the same inputs)."""
    patience: int = 15
    """Evaluations without a better score before stopping (the paper: 15); 0: never stop early."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0: min(500, steps per epoch / 10)."""
    group_by_length: bool = False
    """Batches of similar lengths: less padding, faster on CPU."""
    max_train_samples: int | None = None
    """A seeded subsample of train (quick runs)."""
    max_eval_samples: int | None = None
    """Likewise for evaluation, only for quick checks."""
    keep_checkpoints: bool = False
    """Keep the Trainer's checkpoint-*/ besides best/."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_length"):
            validate.positive(f"train.{key}", getattr(self, key))
        for key in ("patience", "eval_every"):
            validate.non_negative(f"train.{key}", getattr(self, key))
        validate.in_range("train.warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"train.max_steps={self.max_steps} must be positive, or -1 to train for train.epochs")
        validate.positive("train.max_train_samples", self.max_train_samples, allow_none=True)
        validate.positive("train.max_eval_samples", self.max_eval_samples, allow_none=True)


@dataclass
class GridArgs:
    """The paper's grid; `neobert glue --grid` runs every combination."""

    batch_size: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    """Batch sizes of the grid."""
    lr: list[float] = field(default_factory=lambda: [5e-6, 6e-6, 8e-6, 1e-5, 2e-5, 3e-5])
    """Learning rates of the grid."""
    weight_decay: list[float] = field(default_factory=lambda: [1e-2, 1e-5])
    """Weight decays of the grid."""

    def __post_init__(self):
        for value in self.batch_size:
            validate.positive("glue.grid.batch_size", value)
        for value in self.lr:
            validate.positive("glue.grid.lr", value)
        for value in self.weight_decay:
            validate.non_negative("glue.grid.weight_decay", value)


@dataclass
class GlueArgs:
    task: str | None = None
    """For `neobert finetune`: a GLUE task instead of data.*."""
    data_dir: str | None = None
    """GLUE's TSV layout (DIR/SST-2/train.tsv); null: the hub."""
    from_mnli: str | None = None
    """RTE, MRPC, STS-B and QNLI start from this MNLI-fine-tuned model directory; "auto":
    the best MNLI run under the same output directory (run mnli first, or `all`)."""
    grid: GridArgs = field(default_factory=GridArgs)
    keep_all_models: bool = False
    """Grid: keep every point's best/, not only the best point's."""


# The names a fine-tuning run writes in its directory (all neobert's in a marked run).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "results.json", "best", "checkpoints")


@dataclass
class FinetuneConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: OwnDataArgs = field(default_factory=OwnDataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    glue: GlueArgs = field(default_factory=GlueArgs)


# ---------------------------------------------------------------------------------------
# Model, tokenizer, features


def load_model_tokenizer(name: str, tokenizer: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer for model ``name``, padding and truncation left to the caller.

    A NeoBERT directory without tokenizer files gets NeoBERT's default tokenizer.
    """
    source = tokenizer or name
    if tokenizer is None and Path(name).is_dir() and not any((Path(name) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        if AutoConfig.from_pretrained(name).model_type != "neobert":
            raise UserError(f"{name} holds no tokenizer; pass model.tokenizer=...")
        source = None
    if source is None or source.endswith(".json") or source == "bert-base-uncased":
        return load_tokenizer(source)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {source!r}: {str(e).splitlines()[0]}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Some tokenizer.json files (all-MiniLM-L6-v2's) pad and truncate every row to a fixed
        # length; batches are padded by the collator and truncation is set per call.
        backend.no_padding()
        backend.no_truncation()
    return tok


def load_model(name: str, data: TaskData, classifier_dropout: float | None = None) -> torch.nn.Module:
    """A fresh task head on ``name``'s encoder; a head of another size (MNLI's) is replaced."""
    auto = AutoModelForTokenClassification if data.kind == "token_classification" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = dict(num_labels=data.num_labels, ignore_mismatched_sizes=True)
    if classifier_dropout is not None:
        kwargs["classifier_dropout"] = classifier_dropout
    if data.kind == "regression":
        kwargs.update(problem_type="regression", id2label={0: "score"}, label2id={"score": 0})
    else:
        kwargs["id2label"] = dict(enumerate(data.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(data.label_names)}
        if data.kind == "classification":
            kwargs["problem_type"] = "single_label_classification"
    try:
        with strict_weights(name):  # the new head may be missing from the file; the encoder's weights may not
            return auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def featurize(data: TaskData, split, tokenizer, max_length: int):
    """Tokenize a split: sequence tasks keep ``labels``; token tasks label each word's first sub-word."""
    texts = list(data.text_columns)
    if data.kind != "token_classification":

        def encode(batch):
            enc = tokenizer(*[batch[c] for c in texts], truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return enc

    else:

        def encode(batch):
            enc = tokenizer(batch[texts[0]], is_split_into_words=True, truncation=True, max_length=max_length)
            labels = []
            for i, word_labels in enumerate(batch["label"]):
                previous, row = None, []
                for w in enc.word_ids(i):
                    # Special tokens and continuation pieces are not scored (-100).
                    row.append(-100 if w is None or w == previous else word_labels[w])
                    previous = w
                labels.append(row)
            enc["labels"] = labels
            return enc

    return split.map(encode, batched=True, remove_columns=split.column_names)


def _subsample(split, n: int | None, seed: int):
    return split if n is None or n >= len(split) else split.shuffle(seed=seed).select(range(n))


# ---------------------------------------------------------------------------------------
# Training


class JsonlLog(TrainerCallback):
    """Appends every Trainer log line (loss, lr, eval metrics) to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({("lr" if k == "learning_rate" else k): v for k, v in (logs or {}).items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def eval_interval(train_rows: int, batch_size: int, eval_every: int) -> int:
    """Optimizer steps between evaluations: ``eval_every``, or min(500, steps per epoch / 10)."""
    if eval_every > 0:
        return eval_every
    steps_per_epoch = math.ceil(train_rows / batch_size)
    return max(1, min(500, steps_per_epoch // 10))


def run(cfg: FinetuneConfig, data: TaskData, init: str | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model.name`` (or the model ``init``, e.g. an MNLI one) on ``data``.

    Returns what it writes to ``results.json``.
    """
    train_args = cfg.train
    if train_args.batch_size < 1 or train_args.grad_accum < 1 or train_args.batch_size % train_args.grad_accum:
        raise UserError(f"train.batch_size={train_args.batch_size} must be a positive multiple of train.grad_accum={train_args.grad_accum}")
    # a fine-tuning run starts over: an earlier one in its directory is replaced; files
    # neobert did not write are refused (kept, and written beside, with train.overwrite=true)
    run_dir = rundir.claim(train_args.output_dir, "finetune", RUN_ENTRIES, resume="none", overwrite=train_args.overwrite, replace_own=True)
    out = run_dir.path
    save_config(cfg, out / "config.yaml")
    transformers.set_seed(train_args.seed)  # before the model: the new head's init follows the seed
    if not sys.stderr.isatty():  # no per-checkpoint or per-map progress bars in log files
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()

    model_name = resolve_model(cfg.model.name or "")
    tokenizer = load_model_tokenizer(model_name, cfg.model.tokenizer)
    model = load_model(resolve_model(init) if init else model_name, data, cfg.model.classifier_dropout)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds {model.get_input_embeddings().num_embeddings}")

    train = featurize(data, _subsample(data.train, train_args.max_train_samples, train_args.seed), tokenizer, train_args.max_length)
    evals = {k: featurize(data, _subsample(v, train_args.max_eval_samples, train_args.seed), tokenizer, train_args.max_length) for k, v in data.evals.items()}
    selection = next(iter(evals))  # model selection on the first dev split (MNLI: matched)
    interval = eval_interval(len(train), train_args.batch_size, train_args.eval_every)
    bf16 = use_bf16(train_args.bf16)
    trainer_args = TrainingArguments(
        output_dir=str(rundir.ensure_owned_dir(out / "checkpoints", "Trainer checkpoints")),
        per_device_train_batch_size=train_args.batch_size // train_args.grad_accum,
        gradient_accumulation_steps=train_args.grad_accum,
        per_device_eval_batch_size=train_args.eval_batch_size,
        num_train_epochs=train_args.epochs,
        max_steps=train_args.max_steps,
        learning_rate=train_args.lr,
        weight_decay=train_args.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=train_args.warmup_ratio,  # a float below 1 is a share of the total steps
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps",
        eval_steps=interval,
        save_strategy="steps",
        save_steps=interval,
        save_only_model=True,  # no optimizer state: checkpoints exist only to restore the best
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        logging_steps=max(1, min(50, interval)),
        train_sampling_strategy="group_by_length" if train_args.group_by_length else "random",
        seed=train_args.seed,
        data_seed=train_args.seed,
        report_to="none",
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
    )

    def metrics_fn(pred) -> dict[str, float]:
        m = compute_metrics(data.metrics, pred.predictions, pred.label_ids, data.kind, data.label_names)
        return {**m, "score": task_score(m)}

    collator = DataCollatorForTokenClassification(tokenizer) if data.kind == "token_classification" else DataCollatorWithPadding(tokenizer)
    callbacks: list[TrainerCallback] = [JsonlLog(out / "metrics.jsonl")]
    if train_args.patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train_args.patience))
    trainer = Trainer(
        model=model,
        args=trainer_args,
        train_dataset=train,
        eval_dataset=evals[selection],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=metrics_fn,
        callbacks=callbacks,
    )
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start

    # The best checkpoint is loaded; score it on every dev split (and the test file).
    trainer.remove_callback(EarlyStoppingCallback)  # it expects eval_score from every evaluation
    metrics: dict[str, float] = {}
    for split, ds in evals.items():
        m = trainer.evaluate(eval_dataset=ds, metric_key_prefix=split)
        for name in data.metrics:
            metrics[name if len(evals) == 1 else f"{name}_{split}"] = m[f"{split}_{name}"]
    result: dict[str, Any] = {
        "task": data.name,
        "split": data.eval_split,
        "metrics": metrics,
        "score": task_score(metrics),
        "model": cfg.model.name,
        "hyperparameters": {
            "lr": train_args.lr,
            "batch_size": train_args.batch_size,
            "weight_decay": train_args.weight_decay,
            "epochs": train_args.epochs,
            "max_steps": train_args.max_steps,
            "max_length": train_args.max_length,
            "warmup_ratio": train_args.warmup_ratio,
            "grad_accum": train_args.grad_accum,
            "patience": train_args.patience,
            "eval_every": interval,
            "bf16": bf16,
            "group_by_length": train_args.group_by_length,
            "max_train_samples": train_args.max_train_samples,
            "init": init,
        },
        "seed": train_args.seed,
        "train_rows": len(train),
        "steps": trainer.state.global_step,
        "best_step": _step_of(trainer.state.best_model_checkpoint),
        "train_seconds": round(train_seconds, 1),
    }
    if data.test is not None:
        test = featurize(data, data.test, tokenizer, train_args.max_length)
        m = trainer.evaluate(eval_dataset=test, metric_key_prefix="test")
        result["dev_metrics"] = metrics
        result["split"] = "test"
        result["metrics"] = {name: m[f"test_{name}"] for name in data.metrics}
        result["score"] = task_score(result["metrics"])

    with atomic_dir(out / "best") as best:
        trainer.save_model(str(best))
    if not train_args.keep_checkpoints:
        rundir.safe_rmtree(out / "checkpoints")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


# ---------------------------------------------------------------------------------------
# The command


def load_data(cfg: FinetuneConfig) -> TaskData:
    """GLUE when ``glue.task`` is set, otherwise the files in ``data.*``."""
    if cfg.glue.task:
        return load_glue(cfg.glue.task, cfg.glue.data_dir)
    files = dataclasses.asdict(cfg.data)
    if not files["train"]:
        raise UserError("set data.train (a labelled file) or glue.task")
    return load_labelled(files.pop("train"), files.pop("validation"), files.pop("test"), kind=files.pop("task_type"), **files)


def main(argv: list[str]) -> int:
    """``neobert finetune CONFIG.yaml [key=value ...]``."""
    cfg = command_config(FinetuneConfig, argv, "neobert finetune", __doc__)
    if not cfg.model.name:
        raise UserError("set model.name (a model directory or hub name)")
    result = run(cfg, load_data(cfg))
    print(json.dumps({k: result[k] for k in ("task", "split", "metrics", "score")}))
    return 0

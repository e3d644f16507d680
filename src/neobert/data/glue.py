"""GLUE tasks and labelled data for fine-tuning, as ``datasets.Dataset`` splits.

Every loader returns a ``TaskData``: a train split and one or more evaluation splits with
the columns ``text_a`` (and ``text_b`` for pairs) and ``label`` (a class index, a float
for regression, or a list of word-level class indices for token classification), plus
what the trainer needs to know: the kind of task, the label names and the metric names.

- GLUE (all tasks but WNLI) from a directory in GLUE's original TSV layout
  (``CoLA/train.tsv``, ``MNLI/dev_matched.tsv``, ...) or, online, from the hub
  (``datasets.load_dataset("nyu-mll/glue", task)``).
- Own data: CSV, TSV, JSONL or parquet files with named text and label columns, for
  classification and regression; token classification from CoNLL files (one
  ``word ... tag`` line per word, a blank line between sentences) or JSONL/parquet rows
  holding a list of words and a list of tags.

Bad input (unknown task, missing files or columns, labels outside the label set, empty
splits) raises ``UserError`` naming the file.
"""

from __future__ import annotations

import csv
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from neobert.errors import UserError

KINDS = ("classification", "regression", "token_classification")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its fields sit in the TSV files and on the hub, and its metrics."""

    name: str
    folder: str  # directory under the GLUE root
    text_columns: tuple[str, ...]  # TSV header names of the one or two texts
    label_column: str  # TSV header name of the label or score
    hf_columns: tuple[str, ...]  # the same texts in the hub dataset
    labels: tuple[str, ...] | None  # label strings as the TSV writes them, in the hub's index order; None: regression
    label_names: tuple[str, ...] | None  # readable names (config.id2label) in the same order
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)  # TSV file stems evaluated; MNLI has two
    header: tuple[str, ...] | None = None  # column names of a file without a header line (CoLA)


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), "label", ("sentence",), ("0", "1"), ("unacceptable", "acceptable"),
                 ("matthews",), header=("source", "label", "original_label", "sentence")),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",), ("0", "1"), ("negative", "positive"), ("accuracy",)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), ("0", "1"),
                 ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None, None, ("pearson", "spearman")),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), ("0", "1"),
                 ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
                 ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                 dev_splits=("dev_matched", "dev_mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), ("entailment", "not_entailment"),
                 ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                 ("entailment", "not_entailment"), ("accuracy",)),
    ]
}

# The paper's table order; MNLI first, so the tasks that may start from it come after.
TASK_ORDER = ("mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb")
FROM_MNLI = ("rte", "mrpc", "stsb", "qnli")  # tasks the paper starts from the best MNLI model

# The hub's split names for the TSV file stems.
HF_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


@dataclass
class TaskData:
    """Splits ready for tokenization, and what the trainer and the metrics need."""

    name: str
    kind: str  # one of KINDS
    train: Dataset
    evals: dict[str, Dataset]  # model selection uses the first; MNLI: matched, mismatched
    label_names: list[str] | None = None  # None for regression
    metrics: tuple[str, ...] = ("accuracy",)
    eval_split: str = "dev"  # what results.json calls the evaluation split
    test: Dataset | None = None
    text_columns: tuple[str, ...] = ("text_a",)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names or [])


def get_task(name: str) -> GlueTask:
    task = TASKS.get(name.lower())
    if task is None:
        raise UserError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
    return task


def _text_names(n: int) -> tuple[str, ...]:
    return ("text_a", "text_b")[:n]


def _label_index(value: Any, labels: list[str], where: str) -> int:
    key = str(value).strip()
    try:
        return labels.index(key)
    except ValueError:
        raise UserError(f"{where}: label {key!r} is not in the label set {labels}") from None


def _score(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: regression label {value!r} is not a number") from None


def _nonempty(ds: Dataset, where: str) -> Dataset:
    if len(ds) == 0:
        raise UserError(f"{where}: the split is empty")
    return ds


# ---------------------------------------------------------------------------------------
# GLUE


def read_glue_tsv(path: Path, task: GlueTask) -> Dataset:
    """One GLUE TSV file -> text_a[, text_b], label.

    GLUE's files are not CSV: quotes are literal text (MRPC and QNLI have unbalanced ones),
    so fields are split on tabs only. The MRPC header starts with a byte-order mark
    (``utf-8-sig`` drops it) and CoLA has no header at all. Rows with too few fields are
    skipped with a note, as GLUE's reference loaders do for the few broken QQP lines.
    """
    if not path.is_file():
        raise UserError(f"GLUE file not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = list(task.header) if task.header else (rows.pop(0) if rows else [])
    wanted = [*task.text_columns, task.label_column]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing} for {task.name} (header: {header})")
    idx = [header.index(c) for c in wanted]
    need = max(idx) + 1
    texts: list[list[str]] = [[] for _ in task.text_columns]
    labels: list[int | float] = []
    skipped = 0
    first_line = 1 if task.header else 2
    for n, row in enumerate(rows, start=first_line):
        if not row or row == [""]:
            continue
        if len(row) < need:
            skipped += 1
            continue
        for column, i in zip(texts, idx):
            column.append(row[i])
        raw = row[idx[-1]]
        where = f"{path}:{n}"
        labels.append(_score(raw, where) if task.labels is None else _label_index(raw, list(task.labels), where))
    if skipped:
        print(f"{path}: skipped {skipped} row(s) with fewer than {need} fields", file=sys.stderr)
    data = dict(zip(_text_names(len(texts)), texts), label=labels)
    return _nonempty(Dataset.from_dict(data), str(path))


def _from_hub(task: GlueTask, split: str) -> Dataset:
    """One split of ``nyu-mll/glue`` renamed to text_a[, text_b], label (needs the hub)."""
    import datasets

    hf_split = HF_SPLITS[split]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=hf_split)
    except Exception as e:  # offline, hub errors: one line, with the way out
        raise UserError(
            f"cannot load GLUE {task.name}/{hf_split} from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass --data-dir with GLUE's TSV files"
        ) from None
    ds = ds.select_columns([*task.hf_columns, "label"])
    for old, new in zip(task.hf_columns, _text_names(len(task.hf_columns))):
        ds = ds.rename_column(old, new)
    if task.labels is not None:
        bad = [v for v in ds["label"] if not 0 <= v < len(task.labels)]
        if bad:
            raise UserError(f"GLUE {task.name}/{hf_split}: label {bad[0]} is outside 0..{len(task.labels) - 1}")
    return _nonempty(ds, f"GLUE {task.name}/{hf_split}")


def load_glue(name: str, data_dir: str | Path | None = None) -> TaskData:
    """Train and dev splits of a GLUE task, from ``data_dir`` (GLUE's TSV layout) or the hub.

    ``data_dir`` may be the GLUE root (holding ``SST-2/``) or the task's own folder.
    """
    task = get_task(name)
    folder = None
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise UserError(f"GLUE data directory not found: {root}")
        if (root / task.folder).is_dir():
            folder = root / task.folder
        elif root.name == task.folder or (root / "train.tsv").is_file():
            folder = root
        else:
            raise UserError(f"{root} has no {task.folder}/ folder (GLUE's layout: {root}/{task.folder}/train.tsv)")

    def load(split: str) -> Dataset:
        return _from_hub(task, split) if folder is None else read_glue_tsv(folder / f"{split}.tsv", task)

    train = load("train")
    evals = {split.removeprefix("dev_") if len(task.dev_splits) > 1 else split: load(split) for split in task.dev_splits}
    return TaskData(
        name=task.name,
        kind="regression" if task.labels is None else "classification",
        train=train,
        evals=evals,
        label_names=list(task.label_names) if task.label_names else None,
        metrics=task.metrics,
        eval_split="dev",
        text_columns=_text_names(len(task.text_columns)),
    )


# ---------------------------------------------------------------------------------------
# Own data


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL (or JSON list) or parquet file, as dicts."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        elif suffix == ".tsv":
            frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8-sig")
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise UserError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .json, .parquet or .conll")
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    return frame.to_dict("records")


def read_conll(path: str | Path) -> list[dict[str, list[str]]]:
    """CoNLL-style file -> rows ``{"tokens": [...], "tags": [...]}``.

    One word per line with its tag in the last whitespace-separated field; sentences end at
    a blank line; ``-DOCSTART-`` lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    rows, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            if len(fields) < 2:
                raise UserError(f"{path}:{n}: expected 'word ... tag', got {line.strip()!r}")
            tokens.append(fields[0])
            tags.append(fields[-1])
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _read_rows(path: str | Path, kind: str) -> list[dict[str, Any]]:
    if kind == "token_classification" and Path(path).suffix.lower() in (".conll", ".txt", ".iob", ".bio"):
        return read_conll(path)
    return read_table(path)


def _check_columns(rows: list[dict], columns: list[str], path: str | Path) -> None:
    if not rows:
        raise UserError(f"{path}: the split is empty")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; columns: {list(rows[0])}")


def _check_labels_present(path: str | Path, rows: list[dict], label_column: str) -> None:
    """Refuse an empty label cell, naming the file and its line (a row number for parquet)."""
    suffix = Path(path).suffix.lower()
    for n, row in enumerate(rows, start=1):
        value = row.get(label_column)
        empty = value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())
        if empty:
            where = f"{path}:{n + 1}" if suffix in (".csv", ".tsv") else f"{path}:{n}" if suffix == ".jsonl" else f"{path}: row {n}"
            raise UserError(f"{where}: empty label in column {label_column!r}; fill it in or remove the row")


def load_labelled(
    train: str | Path,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    kind: str = "classification",
    text_columns: list[str] | tuple[str, ...] = ("text",),
    label_column: str = "label",
    labels: list[str] | None = None,
    validation_fraction: float = 0.1,
    name: str = "custom",
) -> TaskData:
    """Own data -> TaskData.

    ``kind`` is ``classification`` (any label values; the label set is ``labels`` or the
    sorted values seen in train), ``regression`` (numeric labels) or
    ``token_classification`` (one text column of word lists, one label column of tag
    lists; CoNLL files give the columns ``tokens`` and ``tags``). Without a validation
    file, ``validation_fraction`` of train is held out: the same rows in every run, whatever
    the training seed, so that runs compare.
    """
    if kind not in KINDS:
        raise UserError(f"unknown task type {kind!r}; valid: {', '.join(KINDS)}")
    text_columns = list(text_columns)
    if kind == "token_classification":
        if len(text_columns) != 1:
            raise UserError(f"token classification takes one text column (a list of words), got {text_columns}")
        if Path(train).suffix.lower() in (".conll", ".txt", ".iob", ".bio"):
            text_columns, label_column = ["tokens"], "tags"
    elif not 1 <= len(text_columns) <= 2:
        raise UserError(f"give one or two text columns, got {text_columns}")

    def read(path) -> list[dict[str, Any]]:
        rows = _read_rows(path, kind)
        _check_columns(rows, [*text_columns, label_column], path)
        if kind != "token_classification":  # in file order: an empty cell would otherwise become a class named ""
            _check_labels_present(path, rows, label_column)
        return rows

    raw = {"train": (train, read(train))}
    if validation is not None:
        raw["validation"] = (validation, read(validation))
    else:
        rows = raw["train"][1]
        if len(rows) < 2 or not 0 < validation_fraction < 1:
            raise UserError(f"{train}: no validation file, and {len(rows)} row(s) with validation_fraction={validation_fraction} cannot be split")
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        n_val = max(1, round(len(rows) * validation_fraction))
        raw["validation"] = (f"{train} (held-out {validation_fraction:g})", [rows[i] for i in order[:n_val]])
        raw["train"] = (train, [rows[i] for i in order[n_val:]])
    if test is not None:
        raw["test"] = (test, read(test))
    for path, rows in raw.values():
        _check_columns(rows, [*text_columns, label_column], path)

    if kind == "regression":
        label_names = None
    elif labels:
        label_names = [str(v) for v in labels]
    else:
        seen = raw["train"][1]
        values = {t for r in seen for t in r[label_column]} if kind == "token_classification" else {r[label_column] for r in seen}
        label_names = sorted(str(v) for v in values)

    def convert(path, rows) -> Dataset:
        out: dict[str, list] = {k: [] for k in [*_text_names(len(text_columns)), "label"]}
        for n, row in enumerate(rows, start=1):
            where = f"{path}: row {n}"
            for key, col in zip(_text_names(len(text_columns)), text_columns):
                value = row[col]
                if kind == "token_classification":
                    value = [str(w) for w in value]
                out[key].append(value if kind == "token_classification" else str(value))
            value = row[label_column]
            if kind == "regression":
                out["label"].append(_score(value, where))
            elif kind == "token_classification":
                if len(value) != len(row[text_columns[0]]):
                    raise UserError(f"{where}: {len(row[text_columns[0]])} words but {len(value)} tags")
                out["label"].append([_label_index(t, label_names, where) for t in value])
            else:
                out["label"].append(_label_index(value, label_names, where))
        return _nonempty(Dataset.from_dict(out), str(path))

    splits = {split: convert(path, rows) for split, (path, rows) in raw.items()}
    if kind == "regression":
        metrics: tuple[str, ...] = ("pearson", "spearman")
    elif kind == "token_classification":
        metrics = ("f1", "accuracy") if all(t == "O" or t[:2] in ("B-", "I-") for t in label_names) else ("f1_macro", "accuracy")
    else:
        metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy", "f1_macro")
    return TaskData(
        name=name,
        kind=kind,
        train=splits["train"],
        evals={"validation": splits["validation"]},
        label_names=label_names,
        metrics=metrics,
        eval_split="validation",
        test=splits.get("test"),
        text_columns=_text_names(len(text_columns)),
    )

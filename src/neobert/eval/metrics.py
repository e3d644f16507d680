"""Task metrics and scores, for fine-tuning and GLUE (scikit-learn / scipy).

Metrics (all in [0, 1] or [-1, 1], tables show them x 100): ``accuracy``; ``f1`` (binary:
of class 1, as GLUE's MRPC/QQP; token classification with BIO tags: entity-level, CoNLL
style); ``f1_macro``; ``matthews`` (CoLA); ``pearson`` and ``spearman`` (STS-B). MNLI
reports ``accuracy_matched`` and ``accuracy_mismatched``.

Scores follow GLUE's official averaging: a task's score is the mean of its metrics (MRPC
and QQP: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched),
and the GLUE score is the mean of the task scores (here over the eight tasks, no WNLI).
The same task score selects the best checkpoint and the best grid point.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities (type, start, end) of a BIO tag sequence; an ``I-`` without a ``B-`` starts one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and kind == tag[2:]
        if start is not None and not inside:
            spans.add((kind, start, i))
            start, kind = None, None
        if tag[:2] in ("B-", "I-") and not inside:
            start, kind = i, tag[2:]
    return spans


def entity_f1(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> float:
    """Micro F1 over exact entity spans (CoNLL-2003's measure)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(pred_tags, gold_tags):
        ps, gs = bio_spans(p), bio_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def _correlation(fn, p: np.ndarray, y: np.ndarray) -> float:
    # Undefined for a constant input (NaN, with a warning): score it 0 like Matthews does,
    # so model selection never compares against NaN.
    if len(y) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(p, y)[0])


METRICS = {
    "accuracy": lambda p, y: float(np.mean(p == y)),
    "f1": lambda p, y: float(f1_score(y, p, zero_division=0)),
    "f1_macro": lambda p, y: float(f1_score(y, p, average="macro", zero_division=0)),
    "matthews": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def compute_metrics(
    names: tuple[str, ...] | list[str], outputs: np.ndarray, labels: np.ndarray, kind: str, label_names: list[str] | None = None
) -> dict[str, float]:
    """Metrics from model outputs: logits (B, C) / scores (B, 1) / token logits (B, L, C).

    Token classification scores the positions whose label is not -100 (each word's first
    sub-word); ``f1`` there is entity-level over the BIO tags in ``label_names``.
    """
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if kind == "regression":
        preds = outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
        return {n: METRICS[n](preds, labels.astype(np.float64)) for n in names}
    preds = outputs.argmax(-1)
    if kind != "token_classification":
        return {n: METRICS[n](preds, labels) for n in names}
    keep = labels != -100
    result = {n: METRICS[n](preds[keep], labels[keep]) for n in names if n != "f1"}
    if "f1" in names:
        tag = np.asarray(label_names)
        result["f1"] = entity_f1([list(tag[p[k]]) for p, k in zip(preds, keep)], [list(tag[y[k]]) for y, k in zip(labels, keep)])
    return {n: result[n] for n in names}


def task_score(metrics: dict[str, float]) -> float:
    """GLUE's task score: the mean of the task's metrics."""
    return float(np.mean(list(metrics.values())))


def glue_average(scores: dict[str, float]) -> float | None:
    """The GLUE score: the mean of the task scores; None without any."""
    return float(np.mean(list(scores.values()))) if scores else None

"""``neobert eval sts``: cosine similarity of sentence embeddings against gold scores.

Reads a file of scored sentence pairs and reports the Spearman (the STS benchmark's
headline figure, as in MTEB) and Pearson correlations between the gold scores and the
cosine similarity of the two sentences' embeddings. Formats:

* the STS benchmark's ``sts-{train,dev,test}.csv``: tab-separated, no header, columns
  genre, file, year, id, score, sentence1, sentence2 and sometimes more (sources);
* a tab- or comma-separated file with a header naming ``sentence1``, ``sentence2`` and
  ``score``, such as GLUE's ``STS-B/dev.tsv``;
* JSONL with the keys ``sentence1``, ``sentence2`` and ``score``.

Tab-separated files are read with quoting off: sentences contain bare quote characters.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from neobert.cli import ArgumentParser, add_model_args
from neobert.embeddings import Encoder, load_encoder
from neobert.errors import UserError

STSB_COLUMNS = 7  # genre, file, year, id, score, sentence1, sentence2
REQUIRED = ("sentence1", "sentence2", "score")

csv.field_size_limit(sys.maxsize)


def _score(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{where}: score {value!r} is not a number") from None


def read_sts(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(sentences1, sentences2, gold scores) from any of the formats above."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"STS file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read STS file {path}: {e}") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                a, b, score = row["sentence1"], row["sentence2"], row["score"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} line {n}: expected a JSON object with keys {', '.join(REQUIRED)}") from None
            s1.append(str(a))
            s2.append(str(b))
            scores.append(_score(str(score), f"{path} line {n}"))
        return s1, s2, np.array(scores)

    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader)]
    if "sentence1" in header or "sentence2" in header:
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise UserError(
                f"{path}: the header lacks {', '.join(missing)} (it has {', '.join(header)}); "
                "GLUE's STS-B test split has no gold scores"
            )
        i1, i2, iscore = (header.index(c) for c in REQUIRED)
        width, rows = len(header), reader
    else:  # STS benchmark: the first line is data
        i1, i2, iscore = 5, 6, 4
        width, rows = STSB_COLUMNS, csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    for row in rows:
        where = f"{path} line {rows.line_num}"
        if not any(f.strip() for f in row):
            continue
        if len(row) < width:
            raise UserError(
                f"{where}: {len(row)} columns, expected at least {width}"
                + ("" if rows is reader else " (genre, file, year, id, score, sentence1, sentence2)")
            )
        s1.append(row[i1])
        s2.append(row[i2])
        scores.append(_score(row[iscore], where))
    if not scores:
        raise UserError(f"{path}: no sentence pairs")
    return s1, s2, np.array(scores)


def evaluate_sts(encoder: Encoder, s1: list[str], s2: list[str], gold: np.ndarray, batch_size: int = 32,
                 show_progress_bar: bool = False) -> dict:
    """{"spearman", "pearson", "n"}: correlations of cosine similarity with ``gold``."""
    if len(gold) < 2:
        raise UserError(f"{len(gold)} sentence pair(s): a correlation needs at least 2 pairs")
    unique = list(dict.fromkeys(s1 + s2))  # each sentence embedded once
    emb = encoder.encode(unique, batch_size=batch_size, normalize=True, show_progress_bar=show_progress_bar)
    row = {s: i for i, s in enumerate(unique)}
    a = emb[[row[s] for s in s1]]
    b = emb[[row[s] for s in s2]]
    cosine = (a * b).sum(axis=1)
    return {
        "spearman": float(spearmanr(gold, cosine).statistic),
        "pearson": float(pearsonr(gold, cosine).statistic),
        "n": len(gold),
    }


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="neobert eval sts", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--data", required=True, help="sts-*.csv (STS benchmark), a TSV/CSV with a header, or JSONL")
    parser.add_argument("--json", help="write {spearman, pearson, n} here")
    args = parser.parse_args(argv)
    s1, s2, gold = read_sts(args.data)
    if len(gold) < 2:  # before the model is loaded
        raise UserError(f"{args.data}: {len(gold)} sentence pair; a correlation needs at least 2 pairs")
    encoder = load_encoder(args.model, pooling=args.pooling, max_length=args.max_length, device=args.device)
    result = evaluate_sts(encoder, s1, s2, gold, batch_size=args.batch_size, show_progress_bar=True)
    print(f"STS {args.data} with {args.model}: spearman {result['spearman']:.4f}  pearson {result['pearson']:.4f}  n {result['n']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0

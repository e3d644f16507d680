"""``neobert eval ppl``: pseudo-perplexity by sequence length, for any masked-LM directory.

The pseudo-log-likelihood of a token is ``log p(x_i | x without x_i)``: the sequence with
token ``i`` replaced by [MASK], scored by the masked-LM head at ``i``. Pseudo-perplexity
(Salazar et al., 2020) is ``exp`` of minus the mean over the scored tokens. Each scored
position needs its own masked copy of the sequence; the copies go through the model many
at a time (``--batch-size`` copies per forward pass), and only the masked position of each
copy is decoded.

Sequences. For every length ``L`` (default 128, 256, ... up to twice the longest trained
length among the models), each of ``--docs`` documents of at least ``--min-doc-length``
tokens (default: the longest ``L``, so every length reads the same documents) gives the
sequence ``[CLS]`` + its first ``L - 2`` tokens + ``[SEP]``. The documents come from the
corpus's held-out split, or from its train split where the held-out one has too few
(the JSON says which, per length). The corpus is ``--data``, read as ``data.source`` is (a
``hf:`` dataset is streamed: its first ``--max-documents``; a prepared corpus is read from
its shards, its first million documents of each split at most). ``--positions K`` scores K
positions per sequence, one drawn in each of K equal strata, instead of all ``L - 2``;
``--max-tokens`` caps the scored tokens per length. Every model sees the same sequences
and positions.

A model that cannot run a length (BERT's learned position table ends at its
``max_position_embeddings``) gets that length recorded with its error instead of a figure.
The results go to a JSON file and a PNG curve beside it; ``--merge`` combines JSON files of
separate runs into one file and plot.

    neobert eval ppl --model runs/tiny-stage1 --model runs/tiny-extend --positions 64 --json ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neobert.cli import ArgumentParser
from neobert.data import DataConfig, prepare_corpus
from neobert.device import resolve_device
from neobert.errors import UserError
from neobert.models import resolve_model


# documents read from a hub dataset when --max-documents is not given: a hub source is
# streamed and needs a cap, and this many web documents hold enough long ones for --docs
HUB_DOCUMENTS = 10_000
# documents of each split listed from a prepared corpus (20 bytes each): plenty of long ones
PREPARED_DOCUMENTS = 1_000_000


@dataclass
class Sampling:
    """Which sequences and positions are scored (see the module docstring), and how many
    masked copies go through the model per forward pass."""

    docs: int
    min_doc_length: int
    split: str
    seed: int
    positions: int
    max_tokens: int
    batch_size: int
    batch_tokens: int


def model_dir(path: str) -> Path:
    """A model directory (config.json), or a run directory's final/."""
    resolved = Path(resolve_model(path))
    if not (resolved / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json in it or in its final/ (not a model or run directory)")
    return resolved


def trained_length(model: torch.nn.Module) -> int | None:
    """The context the model was trained at (NeoBERT's max_length; BERT's position table)."""
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def masked_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, positions, mask_id: int, batch_size: int) -> torch.Tensor:
    """``log p(x_i | x with x_i masked)`` for each ``i`` in ``positions`` of one sequence (L,).

    One masked copy per position, ``batch_size`` copies per forward pass; returns (P,) float64.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    out = []
    for chunk in torch.as_tensor(list(positions), dtype=torch.long, device=device).split(batch_size):
        rows = torch.arange(len(chunk), device=device)
        batch = ids.repeat(len(chunk), 1)
        batch[rows, chunk] = mask_id
        logits = masked_logits(model, batch, rows, chunk)  # (P, V): only the masked positions
        out.append(torch.log_softmax(logits.double(), dim=-1)[rows, ids[chunk]])
    return torch.cat(out).cpu()


def masked_logits(model: torch.nn.Module, batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (rows, cols) of a batch, without decoding every position where avoidable."""
    if getattr(model.config, "sparse_prediction", False):  # NeoBERT decodes only labelled positions
        labels = torch.full_like(batch, -100)
        labels[rows, cols] = batch[rows, cols]  # any id: only the selection matters
        return model(input_ids=batch, labels=labels).logits  # (P, V) in row order: one position per row
    head = getattr(model, "cls", None)  # BERT-style: encoder (model.base_model) + head (model.cls)
    if head is not None:
        hidden = model.base_model(input_ids=batch).last_hidden_state
        return head(hidden[rows, cols])
    return model(input_ids=batch).logits[rows, cols]


def sequence(doc: np.ndarray, length: int) -> torch.Tensor:
    """[CLS] + the first ``length - 2`` tokens of a framed document + its [SEP]."""
    return torch.from_numpy(np.concatenate([doc[: length - 1], doc[-1:]]).astype(np.int64))


def scored_positions(length: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Inner positions 1..length-2: all of them, or one drawn in each of ``k`` equal strata."""
    if k <= 0 or k >= length - 2:
        return np.arange(1, length - 1)
    edges = np.linspace(1, length - 1, k + 1).astype(np.int64)
    return np.array([rng.integers(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])], dtype=np.int64)


def default_lengths(trained: list[int | None]) -> list[int]:
    """Powers of two from 128 (or the shortest trained length, if shorter) to twice the longest."""
    known = [t for t in trained if t]
    if not known:
        return [128, 256, 512]
    start = min([128] + [1 << (t.bit_length() - 1) for t in known])
    top = 2 * max(known)
    return [1 << e for e in range(start.bit_length() - 1, top.bit_length()) if 1 << e <= top]


def pick_documents(train, heldout, length: int, min_doc_length: int, docs: int, split: str, seed: int):
    """(split name, corpus, document indices) for one length: held-out, or train where it has too few."""
    need = max(length, min_doc_length)
    if split == "train" or (split == "auto" and int((heldout.doc_lengths >= need).sum()) < docs):
        name, corpus = "train", train
    else:
        name, corpus = "heldout", heldout
    eligible = np.flatnonzero(corpus.doc_lengths >= need)
    return name, corpus, np.sort(np.random.default_rng(seed).permutation(eligible)[:docs])


def evaluate_model(model, train, heldout, lengths: list[int], sampling: Sampling, mask_id: int) -> list[dict]:
    """One result per length: pooled pseudo-perplexity, per-document spread, and by position band."""
    bands = sorted(set([0] + lengths))
    results = []
    for length in lengths:
        split, corpus, docs = pick_documents(train, heldout, length, sampling.min_doc_length, sampling.docs, sampling.split, sampling.seed)
        if len(docs) == 0:
            results.append({"length": length, "split": split, "error": f"no document has >= {max(length, sampling.min_doc_length)} tokens"})
            continue
        start = time.perf_counter()
        batch_size = sampling.batch_size or max(1, sampling.batch_tokens // length)
        nll_by_doc, all_nll, all_pos = [], [], []
        try:
            for doc in docs:
                ids = sequence(corpus.doc(int(doc)), length)
                positions = scored_positions(length, sampling.positions, np.random.default_rng([sampling.seed, int(doc), length]))
                if sampling.max_tokens:
                    positions = positions[: sampling.max_tokens - len(all_nll)]
                if len(positions) == 0:
                    break
                nll = -masked_log_probs(model, ids, positions, mask_id, batch_size).numpy()
                nll_by_doc.append(float(nll.mean()))
                all_nll.extend(nll.tolist())
                all_pos.extend(positions.tolist())
        except (RuntimeError, IndexError, ValueError) as e:  # e.g. a learned position table too short
            results.append({"length": length, "split": split, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            print(f"  length {length}: cannot run ({results[-1]['error']})", file=sys.stderr)
            continue
        nll, pos = np.array(all_nll), np.array(all_pos)
        by_position = [
            {"start": lo, "end": hi, "scored": int(sel.sum()), "ppl": float(np.exp(nll[sel].mean()))}
            for lo, hi in zip(bands[:-1], bands[1:])
            if (sel := (pos >= lo) & (pos < hi)).any()
        ]
        result = {
            "length": length,
            "split": split,
            "documents": len(nll_by_doc),
            "scored": len(nll),
            "nll": float(nll.mean()),
            "ppl": float(np.exp(nll.mean())),
            # spread of the per-document mean NLL: the documents, not the tokens, are the samples
            "nll_sem": float(np.std(nll_by_doc, ddof=1) / math.sqrt(len(nll_by_doc))) if len(nll_by_doc) > 1 else None,
            "by_position": by_position,
            "seconds": round(time.perf_counter() - start, 1),
        }
        results.append(result)
        print(f"  length {length:>5}: pseudo-perplexity {result['ppl']:9.2f} ({len(nll)} tokens of {len(nll_by_doc)} {split} documents, {result['seconds']} s)", file=sys.stderr)
    return results


def read_corpus(data: DataConfig, tokenizer):
    """(train, held-out) documents of ``data.source``. A prepared corpus (the built-in one too) is
    read from its shard files, listing at most its first ``PREPARED_DOCUMENTS`` documents of
    each split, so a corpus of any size is never loaded; other sources go through the cache."""
    from neobert.data.corpus import open_prepared_corpus, uses_prepared
    from neobert.data.sharded import SplitDocuments
    from neobert.data.shards import PreparedCorpus, is_prepared

    if not uses_prepared(data):
        return prepare_corpus(data, tokenizer)
    if is_prepared(data.source):  # its own held-out split, whatever fraction it was prepared with
        data.heldout_fraction = PreparedCorpus(data.source).manifest["heldout_fraction"]
    corpus = open_prepared_corpus(data, tokenizer)
    return tuple(SplitDocuments(corpus, split, PREPARED_DOCUMENTS) for split in ("train", "heldout"))


def plot(report: dict, png: Path) -> Path:
    """Pseudo-perplexity against length, one curve per model, its trained length dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(report["models"]):
        color = f"C{i}"
        ok = [r for r in m["results"] if "ppl" in r]
        failed = [r["length"] for r in m["results"] if "error" in r]
        label = m["label"] + (f" (cannot run {', '.join(map(str, failed))})" if failed else "")
        ax.plot([r["length"] for r in ok], [r["ppl"] for r in ok], "o-", color=color, label=label)
        if m.get("trained_length"):
            ax.axvline(m["trained_length"], color=color, linestyle=":", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["length"] for m in report["models"] for r in m["results"]})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length (tokens); dotted: trained length")
    ax.set_ylabel("pseudo-perplexity")
    ax.set_title(f"Pseudo-perplexity by length ({report['corpus']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    png = plot(report, path.with_suffix(".png"))
    print(f"wrote {path} and {png}", file=sys.stderr)


def merge(files: list[str]) -> dict:
    """One report holding the models of several JSON reports (the first one's settings)."""
    reports = []
    for f in files:
        try:
            reports.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--merge {f}: {e}") from None
    return dict(reports[0], models=[m for r in reports for m in r["models"]])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="neobert eval ppl", description="Pseudo-perplexity by sequence length.")
    parser.add_argument("--model", action="append", default=[], help="masked-LM directory or run directory (repeat to compare)")
    parser.add_argument("--label", action="append", default=[], help="curve label per --model (default: the path)")
    parser.add_argument("--data", default="builtin", help="corpus: builtin, files, hf:NAME[:CONFIG] or a prepared directory (as data.source)")
    parser.add_argument("--max-documents", type=int,
                        help=f"read only the first N documents (default: all; {HUB_DOCUMENTS} from a streamed hf: source)")
    parser.add_argument("--text-field", default=DataConfig.text_field, help="the column or JSONL field that holds the text")
    parser.add_argument("--split", choices=("auto", "heldout", "train"), default="auto", help="auto: held-out, or train where it has too few documents")
    parser.add_argument("--lengths", help="comma-separated lengths (default: 128, 256, ... up to 2x the longest trained length)")
    parser.add_argument("--min-doc-length", type=int, help="documents of at least this many tokens (default: the longest length)")
    parser.add_argument("--docs", type=int, default=8, help="documents per length")
    parser.add_argument("--positions", type=int, default=0, help="positions scored per sequence, stratified (0: every position)")
    parser.add_argument("--max-tokens", type=int, default=0, help="at most this many scored tokens per length (0: no cap)")
    parser.add_argument("--batch-size", type=int, default=0, help="masked copies per forward pass (default: batch-tokens // length)")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass when --batch-size is not given")
    parser.add_argument("--tokenizer", help="tokenizer for the corpus (default: the first model's)")
    parser.add_argument("--cache-dir", default=DataConfig.cache_dir, help="tokenized-corpus cache")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="ppl.json", help="output JSON; the PNG goes beside it")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine these reports into --json (and its PNG) instead of evaluating")
    args = parser.parse_args(argv)
    if not args.merge and not args.model:
        parser.error("give --model (one or more) or --merge")
    if args.label and len(args.label) != len(args.model):
        parser.error("give one --label per --model")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.merge:
        write(merge(args.merge), Path(args.json))
        return 0
    from transformers import AutoModelForMaskedLM

    import neobert  # noqa: F401  (registers NeoBERT with the Auto classes)
    from neobert.loading import strict_weights
    from neobert.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    dirs = [model_dir(m) for m in args.model]
    models = []
    for d in dirs:
        try:
            with strict_weights(str(d)):
                models.append(AutoModelForMaskedLM.from_pretrained(d).to(device).eval())
        except (OSError, ValueError) as e:
            raise UserError(f"--model {d}: cannot load a masked-LM ({str(e).splitlines()[0]})") from None
    tokenizer = load_tokenizer(args.tokenizer or (str(dirs[0]) if (dirs[0] / "tokenizer.json").is_file() else None))
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no [MASK] token")
    for d, m in zip(dirs, models):
        if m.config.vocab_size < len(tokenizer):
            raise UserError(f"--model {d}: vocab_size {m.config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    lengths = sorted(int(x) for x in args.lengths.split(",")) if args.lengths else default_lengths([trained_length(m) for m in models])
    if min(lengths) < 3:
        raise UserError(f"--lengths {lengths}: a sequence needs at least 3 tokens")
    sampling = Sampling(args.docs, args.min_doc_length or max(lengths), args.split, args.seed, args.positions,
                        args.max_tokens, args.batch_size, args.batch_tokens)
    max_documents = args.max_documents
    if max_documents is None and args.data.startswith("hf:"):
        max_documents = HUB_DOCUMENTS
    data = DataConfig(source=args.data, cache_dir=args.cache_dir, max_documents=max_documents, text_field=args.text_field)
    train, heldout = read_corpus(data, tokenizer)

    report = {
        "corpus": args.data,
        "max_documents": max_documents,
        "lengths": lengths,
        "docs": sampling.docs,
        "positions": sampling.positions or "all",
        "max_tokens": sampling.max_tokens or None,
        "min_doc_length": sampling.min_doc_length,
        "seed": sampling.seed,
        "models": [],
    }
    for i, (d, model) in enumerate(zip(dirs, models)):
        label = args.label[i] if args.label else str(args.model[i])
        print(f"{label}: {type(model).__name__}, trained length {trained_length(model)}", file=sys.stderr)
        with warnings.catch_warnings():  # NeoBERT's one warning past max_length: the point of this evaluation
            warnings.filterwarnings("ignore", message="sequence length .* exceeds max_length")
            results = evaluate_model(model, train, heldout, lengths, sampling, tokenizer.mask_token_id)
        report["models"].append(
            {"model": str(d), "label": label, "type": type(model).__name__, "trained_length": trained_length(model), "results": results}
        )
    write(report, Path(args.json))
    return 0

"""``neobert summary RUN_DIR``: what a pretraining run learned, in a few lines.

Held-out masked-token accuracy of the final model beside the accuracy of always
predicting the most frequent training token (on the same masked positions), fill-mask
predictions for a few sentences, and the curves (``curves.png``).

The held-out rows are the run's own (``pretrain.build_data``). On a prepared corpus they
are read from its shards and the most frequent token is counted over its first
``BASELINE_TOKENS`` training tokens, shard by shard, so the corpus is never loaded whole
(the built-in corpus, 3.4M tokens, is counted in full).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neobert.cli import ArgumentParser
from neobert.errors import UserError

BASELINE_TOKENS = 100_000_000  # training tokens counted for the most frequent one: plenty to find it

SENTENCES = [
    "the president of the united [MASK] spoke on tuesday.",
    "the company said its profits [MASK] by ten percent last year.",
    "she was born in [MASK] and moved to new york as a child.",
    "the [MASK] will be held in london next week.",
]


def most_frequent_token(counts: np.ndarray, special: set[int]) -> int:
    """The id with the highest count (``counts[id]``), special tokens aside."""
    counts = counts.copy()
    for t in special:
        if t < len(counts):
            counts[t] = 0
    return int(counts.argmax())


def train_token_counts(corpus, max_tokens: int, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """Counts of each token id over the training documents of a ``PreparedCorpus``, in shard
    order, until at least ``max_tokens`` are counted; read ``chunk_tokens`` at a time."""
    from neobert.data.shards import heldout_mask

    counts = np.zeros(1, dtype=np.int64)
    counted = 0
    for i in range(len(corpus)):
        if counted >= max_tokens:
            break
        shard = corpus.shard(i)
        offsets = np.asarray(shard.offsets)
        train = ~heldout_mask(shard.hashes, corpus.threshold)
        first = 0
        while first < len(shard) and counted < max_tokens:  # documents [first, last): about chunk_tokens
            last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + chunk_tokens, side="right")) - 1)
            last = min(last, len(shard))
            ids = shard.read(int(offsets[first]), int(offsets[last]))
            keep = np.repeat(train[first:last], np.diff(offsets[first : last + 1]))
            chunk = np.bincount(ids[keep], minlength=len(counts))
            counts = np.pad(counts, (0, len(chunk) - len(counts))) + chunk
            counted += int(keep.sum())
            first = last
    return counts


def summarize(run_dir: str | Path) -> dict:
    """Print the summary; returns the held-out figures (empty when the run held nothing out)."""
    from transformers import AutoModelForMaskedLM, pipeline

    from neobert.config import load_config
    from neobert.loading import check_vocab, strict_weights
    from neobert.train.plot import plot_run
    from neobert.train.pretrain import PretrainConfig

    run_dir = Path(run_dir)
    if not (run_dir / "final" / "config.json").exists():
        raise UserError(f"{run_dir}: no final/ model (has the run finished?)")
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    cfg.train.bf16 = False
    with strict_weights(str(run_dir / "final")):
        model = AutoModelForMaskedLM.from_pretrained(run_dir / "final").eval()
    fill = pipeline("fill-mask", model=str(run_dir / "final"), device="cpu")
    tokenizer = fill.tokenizer
    check_vocab(tokenizer, model.get_input_embeddings().num_embeddings, str(run_dir / "final"))
    rows, counts = heldout_rows_and_counts(cfg, tokenizer)
    result = {}
    if rows is None:
        print(f"no held-out documents (data.heldout_fraction={cfg.data.heldout_fraction}): no held-out accuracy")
    else:
        result = heldout_accuracy(model, rows, counts, tokenizer, cfg)
    for s in SENTENCES:
        with torch.no_grad():
            preds = fill(s, top_k=5)
        print(f"  {s}\n    -> " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))
    print(f"curves: {plot_run(run_dir)}")
    return result


def heldout_rows_and_counts(cfg, tokenizer):
    """The run's held-out rows (those ``pretrain.build_data`` evaluates; None if it held nothing
    out) and how often each token id occurs in training."""
    from neobert.data import PackedRows, prepare_corpus
    from neobert.data.corpus import open_prepared_corpus, uses_prepared
    from neobert.data.sharded import ShardedRows

    data = cfg.data
    if uses_prepared(data):
        corpus = open_prepared_corpus(data, tokenizer)
        if not corpus.manifest["heldout_tokens"]:
            return None, None
        return ShardedRows(corpus, data.max_length, data.packing, seed=0, split="heldout"), train_token_counts(corpus, BASELINE_TOKENS)
    train, heldout = prepare_corpus(data, tokenizer)
    if not heldout.num_tokens:
        return None, None
    return PackedRows(heldout, data.max_length, data.packing, seed=0), np.bincount(np.asarray(train.ids).astype(np.int64))


def heldout_accuracy(model, rows, counts: np.ndarray, tokenizer, cfg) -> dict:
    """The run's held-out evaluation of ``model`` beside always predicting the most frequent
    training token (``counts``: how often each id occurs in training)."""
    from neobert.data import MLMMasker
    from neobert.train.common import Dist
    from neobert.train.pretrain import evaluate, heldout_batches

    masker = MLMMasker(tokenizer, rate=cfg.data.mlm_rate, mask_80_10_10=cfg.data.mask_80_10_10)
    result = evaluate(model, rows, masker, cfg, Dist(), is_neobert=True)

    # the baseline on exactly the positions evaluate() scored
    top = most_frequent_token(counts, set(tokenizer.all_special_ids))
    hits = total = 0
    for batch in heldout_batches(rows, masker, cfg):
        target = batch["labels"][batch["labels"] != -100]
        hits += int((target == top).sum())
        total += target.numel()
    baseline = hits / max(total, 1)
    print(f"held-out masked-token accuracy: {result['eval_accuracy']:.2%} on {result['eval_tokens']:,} masked tokens "
          f"(always predicting '{tokenizer.convert_ids_to_tokens(top)}': {baseline:.2%}); held-out loss {result['eval_loss']:.3f}")
    return {**result, "baseline_accuracy": baseline, "baseline_token": tokenizer.convert_ids_to_tokens(top)}


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="neobert summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished pretraining run directory (with final/)")
    summarize(parser.parse_args(argv).run_dir)
    return 0

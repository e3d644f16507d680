"""``neobert summary RUN_DIR``: what a pretraining run learned, in a few lines.

Held-out masked-token accuracy of the final model beside the accuracy of always
predicting the most frequent training token (on the same masked positions), fill-mask
predictions for a few sentences, and the curves (``curves.png``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neobert.cli import ArgumentParser
from neobert.errors import UserError

SENTENCES = [
    "the president of the united [MASK] spoke on tuesday.",
    "the company said its profits [MASK] by ten percent last year.",
    "she was born in [MASK] and moved to new york as a child.",
    "the [MASK] will be held in london next week.",
]


def most_frequent_token(ids: np.ndarray, special: set[int]) -> int:
    counts = np.bincount(ids.astype(np.int64))
    for t in special:
        if t < len(counts):
            counts[t] = 0
    return int(counts.argmax())


def summarize(run_dir: str | Path) -> dict:
    """Print the summary; returns the held-out figures (empty when the run held nothing out)."""
    from transformers import AutoModelForMaskedLM, pipeline

    from neobert.config import load_config
    from neobert.data import prepare_corpus
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
    train, heldout = prepare_corpus(cfg.data, tokenizer)
    result = {}
    if heldout.num_tokens == 0:
        print(f"no held-out documents (data.heldout_fraction={cfg.data.heldout_fraction}): no held-out accuracy")
    else:
        result = heldout_accuracy(model, train, heldout, tokenizer, cfg)
    for s in SENTENCES:
        with torch.no_grad():
            preds = fill(s, top_k=5)
        print(f"  {s}\n    -> " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))
    print(f"curves: {plot_run(run_dir)}")
    return result


def heldout_accuracy(model, train, heldout, tokenizer, cfg) -> dict:
    """The run's held-out evaluation of ``model`` beside always predicting the most frequent training token."""
    from neobert.data import MLMMasker, PackedRows
    from neobert.train.common import Dist
    from neobert.train.pretrain import evaluate, heldout_batches

    masker = MLMMasker(tokenizer, rate=cfg.data.mlm_rate, mask_80_10_10=cfg.data.mask_80_10_10)
    rows = PackedRows(heldout, cfg.data.max_length, cfg.data.packing, seed=0)
    result = evaluate(model, rows, masker, cfg, Dist(), is_neobert=True)

    # the baseline on exactly the positions evaluate() scored
    top = most_frequent_token(np.asarray(train.ids), set(tokenizer.all_special_ids))
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

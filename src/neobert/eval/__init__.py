"""``neobert eval <task> ...``: evaluation commands, one module per task.

``SUBCOMMANDS`` maps a task to ``module:function`` and a line of help, as ``cli.COMMANDS``
does for commands; the function takes the remaining arguments. Add a task with one line.
"""

from __future__ import annotations

from neobert.cli import dispatch

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sts": ("neobert.eval.sts:main", "Spearman/Pearson of cosine similarity on a scored pair file: --model M --data FILE [--json OUT]"),
    "retrieval": ("neobert.eval.retrieval:main", "nDCG@10, MRR@10, Recall@k beside TF-IDF: --model M --data DIR|news [--json OUT]"),
    "ppl": ("neobert.eval.ppl:main", "pseudo-perplexity by sequence length, JSON + PNG: --model M [--model M2] [--positions K] [--json OUT]"),
}


def main(argv: list[str]) -> int:
    return dispatch(SUBCOMMANDS, argv, "neobert eval", "task")

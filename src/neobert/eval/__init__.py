"""``neobert eval <task> ...``: evaluation commands, one module per task.

``SUBCOMMANDS`` maps a task to ``module:function`` and a line of help, as ``cli.COMMANDS``
does for commands; the function takes the remaining arguments. Add a task with one line.
"""

from __future__ import annotations

import importlib

from neobert.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sts": ("neobert.eval.sts:main", "Spearman/Pearson of cosine similarity on a scored pair file: --model M --data FILE [--json OUT]"),
    "retrieval": ("neobert.eval.retrieval:main", "nDCG@10, MRR@10, Recall@k beside TF-IDF: --model M --data DIR|news [--json OUT]"),
    "ppl": ("neobert.eval.ppl:main", "pseudo-perplexity by sequence length, JSON + PNG: --model M [--model M2] [--positions K] [--json OUT]"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: neobert eval <task> [args]", "", "tasks:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    task, rest = argv[0], argv[1:]
    if task not in SUBCOMMANDS:
        raise UserError(f"unknown eval task {task!r}; valid tasks: {', '.join(SUBCOMMANDS)}")
    module_name, func_name = SUBCOMMANDS[task][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)

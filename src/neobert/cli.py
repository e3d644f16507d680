"""``neobert <command> ...``: the dispatch table of every command, and the pieces commands share.

``COMMANDS`` maps a command to ``module:function`` and a line of help; the function takes
the remaining arguments. ``neobert eval`` dispatches its tasks the same way through
:func:`dispatch`. Modules are imported on demand, and this module imports nothing from
the package at load time, so ``neobert --help`` stays fast (see ``neobert_cli``). Bad input
raises ``UserError``, printed here on one line (exit status 2) without a traceback;
:class:`ArgumentParser` turns argparse's own errors into ``UserError`` too.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # command: (module:function, one-line help)
    "pretrain": ("neobert.train.pretrain:main", "stage-1 masked-LM pretraining: neobert pretrain [CONFIG.yaml] [key=value ...]"),
    "prepare": ("neobert.data.prepare:main", "tokenize a source into a sharded prepared corpus, in parallel, resumable: neobert prepare [CONFIG.yaml] [key=value ...]"),
    "extend": ("neobert.train.extend:main", "stage 2, context extension from a stage-1 run: neobert extend [CONFIG.yaml] model.init_from=RUN [key=value ...]"),
    "embed": ("neobert.embeddings:embed_main", "sentence embeddings of texts (args, --input FILE, stdin) to .npy/.jsonl/.parquet: neobert embed --model M ..."),
    "export-st": ("neobert.embeddings:export_main", "write a sentence-transformers directory (loads with no custom code): neobert export-st --model M --output DIR"),
    "contrastive": ("neobert.train.contrastive:main", "sentence-embedding fine-tuning (InfoNCE): neobert contrastive [CONFIG.yaml] [key=value ...]"),
    "eval": ("neobert.eval:main", "evaluations: neobert eval {sts,retrieval,ppl} --model M ... (neobert eval --help)"),
    "finetune": ("neobert.train.finetune:main", "fine-tune on own labelled data (or a GLUE task): neobert finetune CONFIG.yaml [key=value ...]"),
    "glue": ("neobert.train.glue:main", "GLUE with the paper's protocol: neobert glue TASK|all --model M --data-dir DIR --output-dir OUT [--grid] [key=value ...]"),
    "serve": ("neobert.serve:main", "HTTP server: OpenAI-compatible /v1/embeddings, /fill-mask, /classify, /metrics: neobert serve --model M [--port 8000]"),
    "bench": ("neobert.bench:main", "throughput, FLOP rate, MFU, memory vs ModernBERT and BERT: neobert bench [--quick] [--models ...] [--json PATH] (neobert bench --help)"),
    "plot": ("neobert.train.plot:main", "PNG curves of a run directory: neobert plot RUN_DIR"),
    "summary": ("neobert.train.summary:main", "held-out accuracy vs baseline, fill-mask examples, curves: neobert summary RUN_DIR"),
    "export-onnx": ("neobert.export:main", "ONNX (+ int8) of a NeoBERT model for onnxruntime: neobert export-onnx --model M --task {embeddings,fill-mask,classification} [--int8] --output DIR"),
}


def usage(table: dict[str, tuple[str, str]], prog: str, kind: str) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} <{kind}> [args]", "", f"{kind}s:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in table.items()]
    return "\n".join(lines)


def dispatch(table: dict[str, tuple[str, str]], argv: list[str], prog: str, kind: str) -> int:
    """Run ``table[argv[0]]`` on the rest of ``argv``; print the table for no argument or ``--help``."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(table, prog, kind))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        from neobert.errors import UserError

        raise UserError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(table)}")
    module_name, func_name = table[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(COMMANDS, "neobert", "command"))
        return 0
    from neobert.errors import UserError  # the package (torch, transformers): every command needs it

    try:
        return dispatch(COMMANDS, argv, "neobert", "command")
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # a full disk, a quota or a read-only filesystem mid-write: one line naming the path
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _close_progress_bars()
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error starts a line of its own
    (an open bar would redraw itself after it when the process exits)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


# ---------------------------------------------------------------------------------------
# Pieces of the argparse-based commands


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors become UserError (one line, exit status 2 from the CLI)."""

    def error(self, message: str):
        from neobert.errors import UserError

        raise UserError(f"{self.prog}: {message}")


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that load an encoder (``embed``, ``export-st``, ``eval sts|retrieval``)."""
    parser.add_argument("--model", required=required, help="sentence-transformers dir or hub name, HF encoder dir, or neobert run dir")
    parser.add_argument("--pooling", choices=["mean", "cls"], help="for plain HF encoders (default mean)")
    parser.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

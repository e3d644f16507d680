"""``neobert <command> ...``: the dispatch table of every command.

Each entry maps a command to ``module:function``; the function takes the remaining
arguments. Modules are imported on demand so ``neobert --help`` stays fast. Bad input
raises ``UserError``, printed here on one line (exit status 2) without a traceback.
"""

from __future__ import annotations

import importlib
import sys

from neobert.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    # command: (module:function, one-line help)
    "pretrain": ("neobert.train.pretrain:main", "stage-1 masked-LM pretraining: neobert pretrain [CONFIG.yaml] [key=value ...]"),
    "extend": ("neobert.train.extend:main", "stage 2, context extension from a stage-1 run: neobert extend [CONFIG.yaml] model.init_from=RUN [key=value ...]"),
    "embed": ("neobert.embeddings:embed_main", "sentence embeddings of texts (args, --input FILE, stdin) to .npy/.jsonl/.parquet: neobert embed --model M ..."),
    "export-st": ("neobert.embeddings:export_main", "write a sentence-transformers directory (loads with no custom code): neobert export-st --model M --output DIR"),
    "contrastive": ("neobert.train.contrastive:main", "sentence-embedding fine-tuning (InfoNCE): neobert contrastive [CONFIG.yaml] [key=value ...]"),
    "eval": ("neobert.eval:main", "evaluations: neobert eval {sts,retrieval,ppl} --model M ... (neobert eval --help)"),
    "finetune": ("neobert.train.finetune:main", "fine-tune on own labelled data (or a GLUE task): neobert finetune CONFIG.yaml [key=value ...]"),
    "glue": ("neobert.eval.glue:main", "GLUE with the paper's protocol: neobert glue TASK|all --model M --data-dir DIR --output-dir OUT [--grid] [key=value ...]"),
    "serve": ("neobert.serve:main", "HTTP server: OpenAI-compatible /v1/embeddings, /fill-mask, /classify, /metrics: neobert serve --model M [--port 8000]"),
    "bench": ("neobert.bench:main", "throughput, FLOP rate, MFU, memory vs ModernBERT and BERT: neobert bench [--quick] [--models ...] [--json PATH] (neobert bench --help)"),
    "plot": ("neobert.train.plot:main", "PNG curves of a run directory: neobert plot RUN_DIR"),
    "summary": ("neobert.train.summary:main", "held-out accuracy vs baseline, fill-mask examples, curves: neobert summary RUN_DIR"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: neobert <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[command][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

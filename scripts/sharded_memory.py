"""Peak memory of reading rows from a prepared corpus, and of training on it, against its size (issue 11).

    python scripts/sharded_memory.py make /tmp/mem/10m --tokens 10e6
    python scripts/sharded_memory.py make /tmp/mem/1b --tokens 1e9
    python scripts/sharded_memory.py read /tmp/mem/10m
    python scripts/sharded_memory.py read /tmp/mem/1b
    python scripts/sharded_memory.py train /tmp/mem/10m [key=value ...]
    python scripts/sharded_memory.py train /tmp/mem/1b [key=value ...]

``make`` writes a synthetic prepared corpus (random token ids, documents of 50-2000
tokens, shards of about 100M tokens each) straight in the prepared-corpus format, marked
as tokenized by the packaged tokenizer so that training accepts it; ``read`` opens it in a
fresh process, builds ``ShardedRows`` (train and held-out, 1024-token rows) and reads
4,000 micro-batches of 8 rows spread over a whole epoch, in order, then prints the peak
resident memory of the process, and at the end its own (anonymous) memory apart from the
pages of the mapped shard files. ``train`` runs ``neobert pretrain configs/debug.yaml`` on
the corpus (20 steps, fp32, the overrides given after it) in a child process and prints
that process's peak resident memory (``ru_maxrss`` of the child) and wall time; with
``--extend`` it runs stage 2's length mixture instead (``data.bucket_thresholds``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make(out: Path, tokens: float, shard_tokens: float = 100e6) -> None:
    from neobert.data.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(0)
    shards = max(1, round(tokens / shard_tokens))
    per_shard = int(tokens // shards)
    for rank in range(shards):
        writer = ShardWriter(out, rank, "uint16")
        written = 0
        while written < per_shard:  # documents in batches, as the tokenizer step writes them
            lengths = rng.integers(50, 2000, size=1000)
            ids = rng.integers(1000, 30000, size=int(lengths.sum()), dtype=np.uint16)
            writer.add(np.split(ids, np.cumsum(lengths)[:-1]), rng.integers(-(2**63), 2**63 - 1, size=1000).tolist())
            written += int(lengths.sum())
        writer.commit({})
    from neobert.data.corpus import tokenizer_fingerprint
    from neobert.tokenizer import load_tokenizer

    recipe = {"tasks": shards, "heldout_fraction": 0.01, "source": "synthetic", "tokenizer": tokenizer_fingerprint(load_tokenizer()),
              "tokenizer_name": None, "max_documents": None, "dtype": "uint16"}
    manifest = write_manifest(out, recipe)
    print(f"{out}: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents, {shards} shard(s)")


def read(path: Path) -> None:
    from neobert.data.sharded import ShardedRows
    from neobert.data.shards import PreparedCorpus

    start = time.perf_counter()
    corpus = PreparedCorpus(path)
    rows = ShardedRows(corpus, 1024, "document", seed=0)
    heldout = ShardedRows(corpus, 1024, "document", seed=0, split="heldout")
    heldout.rows(range(64))
    for first in np.linspace(0, len(rows) - 8, 4000).astype(np.int64):
        rows.rows(range(first, first + 8))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    # RssFile: pages of the memory-mapped shards, shared and reclaimable; RssAnon: the process's own memory
    print(json.dumps({"corpus": str(path), "tokens": corpus.manifest["tokens"], "documents": corpus.manifest["documents"],
                      "shards": len(corpus), "rows_per_epoch": len(rows), "peak_rss_mb": round(peak_mb),
                      "rss_anon_mb": round(int(status["RssAnon"].split()[0]) / 1024), "rss_file_mb": round(int(status["RssFile"].split()[0]) / 1024),
                      "seconds": round(time.perf_counter() - start, 1)}))


def train(path: Path, overrides: list[str], extend: bool) -> None:
    corpus = json.loads((path / "manifest.json").read_text())
    config = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "neobert", "pretrain", str(config), f"data.source={path}", "data.max_documents=null",
               "data.heldout_fraction=0.01", f"train.output_dir={out}/run", "train.max_steps=20", "train.bf16=false",
               "train.save_every=10", "train.eval_every=10"]
        if extend:
            cmd += ["data.bucket_thresholds=[0,1024,1536]", "data.bucket_probabilities=[0.2,0.4,0.4]"]
        start = time.perf_counter()
        proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child: the training process
    print(json.dumps({"corpus": str(path), "tokens": corpus["tokens"], "documents": corpus["documents"], "shards": len(corpus["shards"]),
                      "mode": "extend (length mixture)" if extend else "pretrain", "overrides": overrides,
                      "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "read", "train"])
    parser.add_argument("path", type=Path)
    parser.add_argument("overrides", nargs="*", help="train: key=value overrides of configs/debug.yaml")
    parser.add_argument("--tokens", type=float, default=10e6)
    parser.add_argument("--extend", action="store_true", help="train: stage 2's length mixture instead of packed rows")
    args = parser.parse_intermixed_args()  # overrides may follow --extend
    if args.command == "make":
        make(args.path, args.tokens)
    elif args.command == "read":
        read(args.path)
    else:
        train(args.path, args.overrides, args.extend)


if __name__ == "__main__":
    main()

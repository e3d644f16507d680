"""Peak memory of reading rows from a prepared corpus, against its size (issue 11, item 2).

    python scripts/sharded_memory.py make /tmp/mem/10m --tokens 10e6
    python scripts/sharded_memory.py make /tmp/mem/1b --tokens 1e9
    python scripts/sharded_memory.py read /tmp/mem/10m
    python scripts/sharded_memory.py read /tmp/mem/1b

``make`` writes a synthetic prepared corpus (random token ids, documents of 50-2000
tokens, shards of about 100M tokens each) straight in the prepared-corpus format;
``read`` opens it in a fresh process, builds ``ShardedRows`` (train and held-out, 1024-token
rows) and reads 4,000 micro-batches of 8 rows spread over a whole epoch, in order, then
prints the peak resident memory of the process, and at the end its own (anonymous) memory
apart from the pages of the mapped shard files.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    recipe = {"tasks": shards, "heldout_fraction": 0.01, "source": "synthetic", "tokenizer": "none", "dtype": "uint16"}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "read"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--tokens", type=float, default=10e6)
    args = parser.parse_args()
    make(args.path, args.tokens) if args.command == "make" else read(args.path)


if __name__ == "__main__":
    main()

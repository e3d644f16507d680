"""Training rows of a prepared corpus read shard by shard (``ShardedRows``), memory bounded by a window.

``PackedRows`` draws each epoch's document order and row order as whole arrays: per rank,
memory that grows with the corpus (tens of GB for a billion documents). ``ShardedRows``
keeps its index-based contract (row ``i`` is a pure function of ``(seed, i)``, on any
rank and any number of ranks, so resume and sharding stay a matter of indices) but draws
its permutations per shard, in windows of ``window`` shards:

- each epoch, the shards are put in an order drawn from ``(seed, epoch)`` and taken
  ``window`` at a time; the rows of a window come before those of the next one;
- within a window, each shard's documents (its train or held-out ones) are shuffled and
  laid end to end and cut into rows as ``PackedRows`` does (``document`` / ``naive``),
  or made one row per document or piece (``none`` / ``split``); rows never cross shards;
- the window's rows are then shuffled together, so a batch mixes ``window`` shards.

Memory per process is the plan of at most two windows (20 bytes per document and 4 per
row of ``window`` shards) plus a few numbers per shard, whatever the size of the corpus;
the token ids, offsets and hashes stay memory-mapped.

A corpus in a single window (the built-in corpus is one shard) draws from ``(seed,
epoch)`` exactly as ``PackedRows``, so it gives the very same rows.

``SplitDocuments`` lists one split's documents of a prepared corpus (its first shards, up to
a cap) and reads each from the shard files on demand, for ``neobert eval ppl``.
"""

from __future__ import annotations

import numpy as np

from neobert.data.packing import EpochRows, Row, check_row_options, document_row, stream_row
from neobert.data.shards import PreparedCorpus, heldout_mask

SPLITS = ("train", "heldout")


class ShardedRows(EpochRows):
    """Deterministic rows of a prepared corpus's ``split``: ``rows(indices)`` -> [(token ids, doc ids)]."""

    def __init__(self, corpus: PreparedCorpus, max_length: int, packing: str, seed: int, split: str = "train", window: int = 8):
        check_row_options(packing, max_length)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self.corpus, self.max_length, self.packing, self.seed, self.split = corpus, max_length, packing, seed, split
        self.shard_rows = np.array([self._count_rows(i) for i in range(len(corpus))], dtype=np.int64)
        self._num_rows = int(self.shard_rows.sum())
        if self._num_rows == 0:
            raise ValueError(f"cannot make rows from an empty corpus ({split} split of {corpus.path})")
        self.window = min(window, len(corpus))
        corpus.open_shards = max(corpus.open_shards, 2 * self.window)  # the shards of two windows
        self.num_windows = -(-len(corpus) // self.window)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], tuple] = {}

    @property
    def num_documents(self) -> int:
        held = sum(s["heldout_documents"] for s in self.corpus.manifest["shards"])
        return held if self.split == "heldout" else self.corpus.manifest["documents"] - held

    def _row_at(self, epoch: int, position: int) -> Row:
        shard_order, window_starts = self._epoch(epoch)
        w = int(np.searchsorted(window_starts, position, side="right")) - 1
        shards, row_starts, row_order = self._window(epoch, w, shard_order)
        slot = int(row_order[position - window_starts[w]])
        j = int(np.searchsorted(row_starts, slot, side="right")) - 1
        return self._row(shards[j], slot - int(row_starts[j]))

    # -----------------------------------------------------------------------------------

    def _docs(self, i: int) -> np.ndarray:
        """Indices, within shard ``i``, of its documents in this split, in the shard's order."""
        held = heldout_mask(self.corpus.shard(i).hashes, self.corpus.threshold)
        return np.flatnonzero(held if self.split == "heldout" else ~held)

    def _count_rows(self, i: int) -> int:
        entry = self.corpus.manifest["shards"][i]
        held = self.split == "heldout"
        if self.packing in ("document", "naive"):
            tokens = entry["heldout_tokens"] if held else entry["tokens"] - entry["heldout_tokens"]
            return -(-tokens // self.max_length)
        if self.packing == "none":
            return entry["heldout_documents"] if held else entry["documents"] - entry["heldout_documents"]
        return int(self._pieces(np.diff(self.corpus.shard(i).offsets)[self._docs(i)]).sum())  # split: needs the lengths

    def _pieces(self, lengths: np.ndarray) -> np.ndarray:
        if self.packing == "split":
            return np.maximum(1, -(-(lengths - 2) // (self.max_length - 2)))  # ceil division
        return np.ones(len(lengths), dtype=np.int64)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the first row of each window."""
        if epoch not in self._epochs:
            order = shard_order(self.seed, epoch, len(self.corpus), self.num_windows)
            rows = self.shard_rows[order]
            ends = np.add.reduceat(rows, np.arange(0, len(order), self.window))
            if len(self._epochs) >= 2:  # indices arrive in order: at most two epochs are in use at once
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = (order, np.concatenate([[0], np.cumsum(ends)[:-1]]))
        return self._epochs[epoch]

    def _window(self, epoch: int, w: int, shard_order: np.ndarray) -> tuple:
        """Window ``w`` of ``epoch``: a plan per shard, the first row of each shard, the row order."""
        key = (epoch, w)
        if key not in self._windows:
            if len(self._windows) >= 2:  # indices arrive in order: at most two windows are in use at once
                del self._windows[min(self._windows)]
            # a single window draws from (seed, epoch) exactly as PackedRows does
            rng = np.random.default_rng([self.seed, epoch] if self.num_windows == 1 else [self.seed, epoch, w])
            shards = []
            for i in shard_order[w * self.window : (w + 1) * self.window]:
                docs = self._docs(int(i))
                lengths = np.diff(self.corpus.shard(int(i)).offsets)[docs].astype(np.int32)  # a document < 2^31 tokens
                doc_order = _permutation(rng, len(docs))
                plan = {"shard": int(i), "docs": docs.astype(np.int32), "lengths": lengths}
                if self.packing in ("document", "naive"):
                    plan.update(doc_order=doc_order, doc_ends=np.cumsum(lengths[doc_order], dtype=np.int64))
                else:
                    pieces = self._pieces(lengths)
                    plan.update(piece_doc=np.repeat(np.arange(len(docs)), pieces), piece_start=np.cumsum(pieces) - pieces)
                shards.append(plan)
            counts = np.array([self.shard_rows[p["shard"]] for p in shards], dtype=np.int64)
            row_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            row_order = _permutation(rng, int(counts.sum()))
            self._windows[key] = (shards, row_starts, row_order)
        return self._windows[key]

    def _row(self, plan: dict, slot: int) -> Row:
        shard = self.corpus.shard(plan["shard"])
        docs, lengths = plan["docs"], plan["lengths"]
        if self.packing in ("none", "split"):
            k = int(plan["piece_doc"][slot])
            doc = int(docs[k])
            ids = shard.read(int(shard.offsets[doc]), int(shard.offsets[doc + 1]))
            return document_row(ids, self.max_length, (slot - int(plan["piece_start"][k])) * (self.max_length - 2))
        def read(doc: int, lo: int, hi: int) -> np.ndarray:
            first = int(shard.offsets[int(docs[doc])])
            return shard.read(first + lo, first + hi)

        return stream_row(slot, self.max_length, plan["doc_order"], plan["doc_ends"], lengths, read)


def shard_order(seed: int, epoch: int, num_shards: int, num_windows: int) -> np.ndarray:
    """The order in which epoch ``epoch`` takes the shards: as they are in one window, else
    drawn from ``(seed, epoch, num_shards)`` (the last seed word is never a window number: a
    stream of its own). ``ShardedMixtureRows`` takes the shards in the same order."""
    if num_windows == 1:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, num_shards]).permutation(num_shards)


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """``rng.permutation(n)`` (the very same order: it shuffles ``arange(n)`` as this does) in
    int32 when ``n`` allows: half the memory of a window's row order (12.5M rows of 64 tokens
    for 8 shards of 100M tokens: 50 MB instead of 100)."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)
    return order


class SplitDocuments:
    """The documents of one split of a prepared corpus, read from its shard files on demand:
    ``len()``, ``doc_lengths`` and ``doc(i)``, as a ``TokenCorpus`` offers them.

    Memory is 20 bytes per document listed; ``max_documents`` bounds it by listing whole
    shards, in order, only until that many documents of the split are listed (all of them
    when the corpus has fewer).
    """

    def __init__(self, corpus: PreparedCorpus, split: str, max_documents: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.corpus = corpus
        shards, docs, lengths = [], [], []
        for i in range(len(corpus)):
            if max_documents is not None and sum(map(len, docs)) >= max_documents:
                break
            train, heldout = corpus.split(i)
            d = heldout if split == "heldout" else train
            shards.append(np.full(len(d), i, dtype=np.int32))
            docs.append(d)
            lengths.append(np.diff(corpus.shard(i).offsets)[d])
        self._shard = np.concatenate(shards) if shards else np.zeros(0, np.int32)
        self._doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        self.doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._doc)

    def doc(self, i: int) -> np.ndarray:
        shard = self.corpus.shard(int(self._shard[i]))
        d = int(self._doc[i])
        return shard.read(int(shard.offsets[d]), int(shard.offsets[d + 1]))

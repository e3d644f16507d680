"""Training rows drawn from a mixture of document-length buckets: stage 2.

The paper extends the context by training on rows whose documents come from all
documents, from those of at least 1024 tokens, or from those of at least 2048 tokens,
with probabilities 0.2 / 0.4 / 0.4. Bucket ``k`` holds the documents of at least
``thresholds[k]`` tokens ([CLS] and [SEP] included); the buckets nest, so a long document
belongs to every bucket whose threshold it reaches.

Row ``i`` is drawn from its own random generator, seeded with ``(seed, i)``: first its
bucket, then documents of that bucket, uniformly and with replacement, until the row is
full. Each document contributes one contiguous window of its tokens, as long as the room
left in the row allows, at a random offset (so the long documents are read throughout,
not only their openings). The row then looks like a ``PackedRows`` row of the same
packing:

- ``document`` / ``naive``: exactly ``max_length`` tokens, each carrying its window's
  number (1, 2, ...) within the row as document id;
- ``none``: one document per row; a document longer than the row keeps its first
  ``max_length - 2`` inner tokens framed with its own first and last tokens (the released
  stage 2 read documents tokenized with truncation at 4096);
- ``split``: the same, but the window of ``max_length - 2`` inner tokens starts at a random
  offset, so long documents are read throughout.

Nothing depends on the order rows are read in, so any index can be read on any rank and
the same index always gives the same row: resume and sharding work as with ``PackedRows``.
An empty bucket (no document reaches its threshold) is an error at construction, naming
the longest document, rather than a silent change of the mixture.

Two classes draw rows this way:

- ``LengthMixtureRows`` over a ``TokenCorpus`` (in memory or the single-file cache): the
  buckets are index arrays over the whole corpus.
- ``ShardedMixtureRows`` over a prepared corpus, with memory that does not grow with the
  corpus. As ``ShardedRows`` does, each epoch (``len()`` rows) puts the shards in an order
  drawn from ``(seed, epoch)`` and takes them ``window`` at a time; each window owns a run
  of the epoch's row positions in proportion to its training tokens, and a row draws its
  documents from its window's buckets. Memory is the bucket arrays of at most two windows
  plus a few numbers per shard. When a window happens to hold no document of a row's
  bucket, that row draws from the whole corpus's bucket instead (a shard weighted by its
  count of such documents, then a document of it), so the mixture stays as configured. A
  corpus in a single window (the built-in one is one shard) draws exactly as
  ``LengthMixtureRows`` over the same documents, row for row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neobert.data.corpus import TokenCorpus
from neobert.data.packing import Row, check_row_options, document_row, packed_row
from neobert.data.shards import PreparedCorpus, heldout_mask
from neobert.data.sharded import shard_order
from neobert.errors import UserError


class _Mixture:
    """What both samplers share: the options, the per-row generator and bucket, and how a row
    is assembled from drawn documents."""

    def __init__(self, max_length: int, packing: str, seed: int, thresholds: list[int], probabilities: list[float]):
        check_row_options(packing, max_length)
        if len(thresholds) != len(probabilities) or not thresholds:
            raise ValueError("thresholds and probabilities must be non-empty lists of the same length")
        self.max_length, self.packing, self.seed = max_length, packing, seed
        self.thresholds = [int(t) for t in thresholds]
        self.probabilities = np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities)
        self._num_rows = 1

    def __len__(self) -> int:
        return self._num_rows

    def bucket_of(self, index: int) -> int:
        """The bucket row ``index`` draws its documents from."""
        return self._bucket(self._rng(index))

    def rows(self, indices) -> list[Row]:
        """(token ids, document ids 1..k) of each row index; any index >= 0."""
        return [self._row(int(index)) for index in indices]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _bucket(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.thresholds), p=self.probabilities))

    def _check_buckets(self, sizes, longest: int) -> None:
        for t, p, size in zip(self.thresholds, self.probabilities, sizes):
            if p > 0 and size == 0:
                raise UserError(
                    f"data.bucket_thresholds: no document has >= {t} tokens (the longest has {longest}); "
                    "lower that threshold or give its bucket probability 0"
                )

    def _row(self, index: int) -> Row:
        raise NotImplementedError

    def _assemble(self, rng: np.random.Generator, draw, read) -> Row:
        """A row from documents ``draw()`` gives as (key, length); ``read(key, lo, hi)`` reads tokens lo:hi."""
        if self.packing in ("none", "split"):
            key, n = draw()
            long = n > self.max_length
            start = int(rng.integers(n - self.max_length + 1)) if long and self.packing == "split" else 0
            return document_row(read(key, 0, n), self.max_length, start)
        pieces, room = [], self.max_length
        while room > 0:
            key, n = draw()
            take = min(n, room)
            start = int(rng.integers(n - take + 1))
            pieces.append(read(key, start, start + take))
            room -= take
        return packed_row(pieces)


class LengthMixtureRows(_Mixture):
    """Rows of ``corpus`` whose documents come from a length bucket drawn per row.

    The ``Rows`` protocol, as ``PackedRows``: ``len()`` is the number of rows that cover the
    corpus's tokens once (an "epoch", for reporting), and ``rows(indices)`` returns
    ``[(token ids, document ids 1..k)]``, a pure function of ``(seed, index)``.
    """

    def __init__(
        self, corpus: TokenCorpus, max_length: int, packing: str, seed: int, thresholds: list[int], probabilities: list[float]
    ):
        super().__init__(max_length, packing, seed, thresholds, probabilities)
        self.corpus = corpus
        self._lengths = corpus.doc_lengths
        self.buckets = [np.flatnonzero(self._lengths >= t) for t in self.thresholds]
        self._check_buckets([len(b) for b in self.buckets], int(self._lengths.max()) if len(corpus) else 0)
        self._num_rows = max(1, -(-corpus.num_tokens // max_length))

    def _row(self, index: int) -> Row:
        rng = self._rng(index)
        bucket = self.buckets[self._bucket(rng)]

        def draw():
            doc = int(bucket[rng.integers(len(bucket))])
            return doc, int(self._lengths[doc])

        return self._assemble(rng, draw, lambda doc, lo, hi: self.corpus.doc(doc)[lo:hi])


@dataclass
class _Pool:
    """Training documents of some shards: where each lies (shard, first token) and its length,
    and per bucket the positions (in these arrays) of the documents that reach its threshold."""

    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    buckets: list[np.ndarray]


class ShardedMixtureRows(_Mixture):
    """``LengthMixtureRows`` over a prepared corpus's training split, read window by window."""

    def __init__(self, corpus: PreparedCorpus, max_length: int, packing: str, seed: int, thresholds: list[int],
                 probabilities: list[float], window: int = 8):
        super().__init__(max_length, packing, seed, thresholds, probabilities)
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self.corpus = corpus
        n = len(corpus)
        self.window = min(window, n)
        self.num_windows = -(-n // self.window)
        corpus.open_shards = max(corpus.open_shards, 2 * self.window + 1)  # two windows and a fallback shard
        # one pass over the offsets and hashes: each shard's count of training documents per bucket
        self.bucket_counts = np.zeros((n, len(self.thresholds)), dtype=np.int64)
        longest = 0
        for i in range(n):
            _, lengths = self._train_documents(i)
            self.bucket_counts[i] = [int((lengths >= t).sum()) for t in self.thresholds]
            longest = max(longest, int(lengths.max()) if len(lengths) else 0)
        self._check_buckets(self.bucket_counts.sum(axis=0), longest)
        self.shard_tokens = [e["tokens"] - e["heldout_tokens"] for e in corpus.manifest["shards"]]
        self._num_rows = max(1, -(-sum(self.shard_tokens) // max_length))
        self._epochs: dict[int, tuple[np.ndarray, list[int]]] = {}
        self._pools: dict[tuple, _Pool] = {}
        self._fallback: dict[int, _Pool] = {}

    @property
    def num_documents(self) -> int:
        return self.corpus.manifest["documents"] - self.corpus.manifest["heldout_documents"]

    def window_of(self, index: int) -> tuple[int, np.ndarray]:
        """(window number, its shards) that row ``index`` draws its documents from."""
        epoch, position = divmod(index, self._num_rows)
        order, starts = self._epoch(epoch)
        w = int(np.searchsorted(starts, position, side="right")) - 1
        return w, order[w * self.window : (w + 1) * self.window]

    # -----------------------------------------------------------------------------------

    def _train_documents(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (within shard ``i``) and lengths of its training documents, in the shard's order."""
        shard = self.corpus.shard(i)
        docs = np.flatnonzero(~heldout_mask(shard.hashes, self.corpus.threshold))
        return docs, np.diff(shard.offsets)[docs]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """The epoch's shard order and the first row position of each window."""
        if epoch not in self._epochs:
            n = len(self.corpus)
            order = shard_order(self.seed, epoch, n, self.num_windows)
            tokens = [sum(self.shard_tokens[int(i)] for i in order[s : s + self.window]) for s in range(0, n, self.window)]
            total, before, starts = max(sum(tokens), 1), 0, []
            for t in tokens:  # Python integers: tokens x rows overflows int64 at the paper's scale
                starts.append(before * self._num_rows // total)
                before += t
            if len(self._epochs) >= 2:  # indices arrive in order: at most two epochs are in use at once
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def _pool(self, shards) -> _Pool:
        parts = [(int(i), *self._train_documents(int(i))) for i in shards]
        length = np.concatenate([lengths for _, _, lengths in parts])
        return _Pool(
            shard=np.concatenate([np.full(len(docs), i, dtype=np.int32) for i, docs, _ in parts]),
            start=np.concatenate([self.corpus.shard(i).offsets[docs] for i, docs, _ in parts]).astype(np.int64),
            length=length,
            buckets=[np.flatnonzero(length >= t).astype(np.int32) for t in self.thresholds],
        )

    def _window_pool(self, index: int) -> _Pool:
        w, shards = self.window_of(index)
        key = (index // self._num_rows, w)
        if key not in self._pools:
            if len(self._pools) >= 2:  # indices arrive in order: at most two windows are in use at once
                del self._pools[min(self._pools)]
            self._pools[key] = self._pool(shards)
        return self._pools[key]

    def _shard_pool(self, i: int) -> _Pool:
        if i not in self._fallback:
            if len(self._fallback) >= 2:
                self._fallback.pop(next(iter(self._fallback)))
            self._fallback[i] = self._pool([i])
        return self._fallback[i]

    def _row(self, index: int) -> Row:
        rng = self._rng(index)
        k = self._bucket(rng)
        pool = self._window_pool(index)

        def draw():
            if len(pool.buckets[k]):
                source = pool
            else:  # no document of bucket k in this window: one of the whole corpus's, uniformly
                counts = self.bucket_counts[:, k]
                source = self._shard_pool(int(rng.choice(len(counts), p=counts / counts.sum())))
            j = int(source.buckets[k][rng.integers(len(source.buckets[k]))])
            return (source, j), int(source.length[j])

        def read(key, lo: int, hi: int) -> np.ndarray:
            source, j = key
            first = int(source.start[j])
            return self.corpus.shard(int(source.shard[j])).read(first + lo, first + hi)

        return self._assemble(rng, draw, read)

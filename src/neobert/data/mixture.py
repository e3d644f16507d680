"""Training rows drawn from a mixture of document-length buckets (``LengthMixtureRows``): stage 2.

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

Nothing is precomputed per epoch, so any index can be read in any order on any rank and
the same index always gives the same row: resume and sharding work as with ``PackedRows``.
An empty bucket (no document reaches its threshold) is an error at construction, naming
the longest document, rather than a silent change of the mixture.
"""

from __future__ import annotations

import numpy as np

from neobert.data.corpus import TokenCorpus
from neobert.data.packing import Row, check_row_options, document_row, packed_row
from neobert.errors import UserError


class LengthMixtureRows:
    """Rows of ``corpus`` whose documents come from a length bucket drawn per row.

    The ``Rows`` protocol, as ``PackedRows``: ``len()`` is the number of rows that cover the
    corpus's tokens once (an "epoch", for reporting), and ``rows(indices)`` returns
    ``[(token ids, document ids 1..k)]``, a pure function of ``(seed, index)``.
    """

    def __init__(
        self, corpus: TokenCorpus, max_length: int, packing: str, seed: int, thresholds: list[int], probabilities: list[float]
    ):
        check_row_options(packing, max_length)
        if len(thresholds) != len(probabilities) or not thresholds:
            raise ValueError("thresholds and probabilities must be non-empty lists of the same length")
        self.corpus, self.max_length, self.packing, self.seed = corpus, max_length, packing, seed
        self.thresholds = [int(t) for t in thresholds]
        self.probabilities = np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities)
        self._lengths = corpus.doc_lengths
        self.buckets = [np.flatnonzero(self._lengths >= t) for t in self.thresholds]
        longest = int(self._lengths.max()) if len(corpus) else 0
        for t, p, docs in zip(self.thresholds, self.probabilities, self.buckets):
            if p > 0 and len(docs) == 0:
                raise UserError(
                    f"data.bucket_thresholds: no document has >= {t} tokens (the longest has {longest}); "
                    "lower that threshold or give its bucket probability 0"
                )
        self._num_rows = max(1, -(-corpus.num_tokens // max_length))

    def __len__(self) -> int:
        return self._num_rows

    def bucket_of(self, index: int) -> int:
        """The bucket row ``index`` draws its documents from."""
        return int(self._rng(index).choice(len(self.buckets), p=self.probabilities))

    def rows(self, indices) -> list[Row]:
        """(token ids, document ids 1..k) of each row index; any index >= 0."""
        return [self._row(int(index)) for index in indices]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _row(self, index: int) -> Row:
        rng = self._rng(index)
        bucket = self.buckets[int(rng.choice(len(self.buckets), p=self.probabilities))]  # the draw bucket_of repeats
        if self.packing in ("none", "split"):
            doc = self.corpus.doc(int(bucket[rng.integers(len(bucket))]))
            long = len(doc) > self.max_length
            start = int(rng.integers(len(doc) - self.max_length + 1)) if long and self.packing == "split" else 0
            return document_row(doc, self.max_length, start)
        pieces, room = [], self.max_length
        while room > 0:
            doc = self.corpus.doc(int(bucket[rng.integers(len(bucket))]))
            take = min(len(doc), room)
            start = int(rng.integers(len(doc) - take + 1))
            pieces.append(doc[start : start + take])
            room -= take
        return packed_row(pieces)

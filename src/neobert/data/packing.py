"""Training rows from a token corpus (``PackedRows``) and batches of rows as tensors (``collate``).

Packing modes:

- ``document``: each epoch, the documents in a shuffled order are laid end to end and cut
  into rows of exactly ``max_length`` tokens (only the epoch's last row is shorter). A
  document that crosses a row boundary is split there, its second part continuing in
  another row as a document of its own. Each token carries the number (1, 2, ...) of its
  document within the row: the model's attention stays inside a document and positions
  restart at each document start.
- ``naive``: the same rows, with attention across documents and positions 0..L-1 (the
  paper's ablation of packing without cross-document masking).
- ``none``: one document per row, as the paper and its released code trained stage 1: a
  document longer than a row keeps its first ``max_length - 2`` inner tokens, framed with
  its own first and last tokens (``[CLS]`` and ``[SEP]``), which is what the released
  preprocessing's truncating tokenizer gives; the rest of the document is never read.
- ``split``: one document per row, but a longer document is cut into pieces of
  ``max_length - 2`` inner tokens, each framed the same way and each a row of its own, so
  every token is trained on.

Rows are numbered 0, 1, 2, ... past the end of an epoch: row ``i`` belongs to epoch
``i // len(rows)``, and each epoch has its own document order and row order, both drawn
from ``(seed, epoch)``. The row order is shuffled as well so that the pieces of one long
document do not land in the same batch. The same index gives the same row on any
machine, which makes resuming and sharding across ranks a matter of indices.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from neobert.data.config import PACKINGS
from neobert.data.corpus import TokenCorpus
from neobert.modeling_neobert import document_positions

Row = tuple[np.ndarray, np.ndarray]  # token ids, and the document id (1, 2, ...) of each token


class Rows(Protocol):
    """What a trainer reads rows from: ``PackedRows`` and ``LengthMixtureRows``.

    ``len()`` is the number of rows that cover the corpus's tokens once (an epoch); ``rows``
    returns the rows of any indices >= 0, a pure function of (seed, index).
    """

    def __len__(self) -> int: ...

    def rows(self, indices) -> list[Row]: ...


def check_row_options(packing: str, max_length: int) -> None:
    """ValueError for a packing mode or row length no row source can serve."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room inside [CLS] ... [SEP]")


def packed_row(pieces: list[np.ndarray]) -> Row:
    """A row from consecutive pieces of documents: their tokens, each piece a document of its own."""
    ids = np.concatenate(pieces).astype(np.int64)
    return ids, np.repeat(np.arange(1, len(pieces) + 1), [len(p) for p in pieces])


def stream_row(slot: int, max_length: int, doc_order: np.ndarray, doc_ends: np.ndarray, lengths: np.ndarray, read) -> Row:
    """Row ``slot`` of the token stream made of the documents in ``doc_order`` (``doc_ends``: where
    each ends in the stream), cut into rows of ``max_length``; ``read(doc, lo, hi)`` gives tokens
    ``lo:hi`` of document ``doc``."""
    start = slot * max_length
    stop = min(start + max_length, int(doc_ends[-1]))
    pieces = []
    k = int(np.searchsorted(doc_ends, start, side="right"))  # the document holding token `start`
    position = start
    while position < stop:
        doc = int(doc_order[k])
        doc_start = int(doc_ends[k]) - int(lengths[doc])
        end = min(stop, int(doc_ends[k]))
        if end > position:
            pieces.append(read(doc, position - doc_start, end - doc_start))
        position, k = end, k + 1
    return packed_row(pieces)


def document_row(doc: np.ndarray, max_length: int, start: int = 0) -> Row:
    """One document as a row: whole when it fits, else ``max_length - 2`` of its inner tokens
    from ``start`` on, framed again with its own first and last tokens ([CLS] and [SEP])."""
    doc = doc.astype(np.int64)
    if len(doc) > max_length:
        inner = max_length - 2
        doc = np.concatenate([doc[:1], doc[1:-1][start : start + inner], doc[-1:]])
    return doc, np.ones(len(doc), dtype=np.int64)


class EpochRows:
    """The index arithmetic that ``PackedRows`` and ``ShardedRows`` share: ``len()`` rows make
    an epoch, and row ``index`` is row ``index % len()`` of epoch ``index // len()``, which a
    subclass's ``_row_at(epoch, position)`` makes."""

    _num_rows: int

    def __len__(self) -> int:
        return self._num_rows

    def rows(self, indices) -> list[Row]:
        """(token ids, document ids 1..k) of each row index; any index >= 0, epochs repeating."""
        return [self._row_at(*divmod(int(index), self._num_rows)) for index in indices]

    def _row_at(self, epoch: int, position: int) -> Row:
        raise NotImplementedError


class PackedRows(EpochRows):
    """Deterministic training rows of ``corpus``: ``rows(indices)`` -> [(token ids, doc ids)]."""

    def __init__(self, corpus: TokenCorpus, max_length: int, packing: str, seed: int):
        check_row_options(packing, max_length)
        if len(corpus) == 0 or corpus.num_tokens == 0:
            raise ValueError("cannot make rows from an empty corpus")
        self.corpus, self.max_length, self.packing, self.seed = corpus, max_length, packing, seed
        self._lengths = corpus.doc_lengths
        if packing in ("none", "split"):
            if packing == "split":
                pieces = np.maximum(1, -(-(self._lengths - 2) // (max_length - 2)))  # ceil division
            else:
                pieces = np.ones(len(corpus), dtype=np.int64)  # the first piece only
            self._piece_doc = np.repeat(np.arange(len(corpus)), pieces)
            self._piece_index = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            self._num_rows = int(pieces.sum())
        else:
            self._num_rows = -(-corpus.num_tokens // max_length)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _row_at(self, epoch: int, position: int) -> Row:
        doc_order, doc_ends, row_order = self._plan(epoch)
        slot = int(row_order[position])
        if self.packing in ("none", "split"):
            return self._document_piece(slot)
        return self._packed_row(slot, doc_order, doc_ends)

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's document order, where each document ends in the token stream, and row order."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            doc_order = rng.permutation(len(self.corpus))
            doc_ends = np.cumsum(self._lengths[doc_order])
            row_order = rng.permutation(self._num_rows)
            if len(self._plans) >= 2:  # indices arrive in order: at most two epochs are in use at once
                del self._plans[min(self._plans)]
            self._plans[epoch] = (doc_order, doc_ends, row_order)
        return self._plans[epoch]

    def _packed_row(self, slot: int, doc_order: np.ndarray, doc_ends: np.ndarray) -> Row:
        return stream_row(slot, self.max_length, doc_order, doc_ends, self._lengths, lambda doc, lo, hi: self.corpus.doc(doc)[lo:hi])

    def _document_piece(self, slot: int) -> Row:
        doc = self.corpus.doc(int(self._piece_doc[slot]))
        return document_row(doc, self.max_length, int(self._piece_index[slot]) * (self.max_length - 2))


def collate(rows, packing: str, max_length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad rows into ``input_ids``, ``attention_mask`` and ``position_ids``, each (B, L) long,
    and describe their padding-free layout (computed here, on the host, so that the model
    never has to read it back from the device):

    - ``indices`` (N,) long: where the N real tokens are in the flattened (B * L) batch;
    - ``cu_seqlens`` (S + 1,) int32: where each segment of those N tokens starts, then N; a
      segment is a document of a row (``document``) or a row's real tokens (``none``,
      ``split``, ``naive``), exactly the runs the model derives from ``attention_mask``;
    - ``max_seqlen`` (int): the longest segment (0 for a batch without a real token).

    ``attention_mask`` holds the document ids for ``document`` packing and 0/1 otherwise.
    ``document`` and ``naive`` batches are ``max_length`` wide; ``none`` and ``split`` batches
    are as wide as their longest row rounded up to a multiple of 8 (at most ``max_length``).
    :func:`flatten` turns a (masked) batch into the model's flattened inputs.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    longest = max(len(ids) for ids, _ in rows)
    if longest > max_length:
        raise ValueError(f"a row of {longest} tokens is longer than max_length={max_length}")
    width = min(-(-longest // 8) * 8, max_length) if packing in ("none", "split") else max_length
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    doc_ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, (ids, docs) in enumerate(rows):
        input_ids[b, : len(ids)] = ids
        doc_ids[b, : len(ids)] = docs
    if packing == "document":  # the rule the model applies to a document-id mask given no positions
        attention_mask = torch.from_numpy(doc_ids)
        position_ids = document_positions(attention_mask)
    else:
        doc_ids = (doc_ids > 0).astype(np.int64)
        attention_mask = torch.from_numpy(doc_ids)
        position_ids = torch.arange(width).repeat(len(rows), 1)
    indices, cu_seqlens = segment_layout(doc_ids)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": attention_mask, "position_ids": position_ids,
            "indices": torch.from_numpy(indices), "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(np.diff(cu_seqlens).max(initial=0))}


def segment_layout(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The real tokens of a (B, L) document-id or 0/1 mask: their flat indices (N,) int64 and
    the int32 offsets (S + 1,) of their segments, the runs of equal ids within a row (the
    segments ``modeling_neobert.real_token_segments`` finds on the device)."""
    flat = doc_ids.reshape(-1)
    indices = np.flatnonzero(flat > 0)
    key = (indices // doc_ids.shape[1]) * (int(flat.max(initial=0)) + 1) + flat[indices]  # (row, document) as one number
    starts = np.flatnonzero(np.diff(key)) + 1
    cu_seqlens = np.concatenate([[0], starts, [len(indices)]]) if len(indices) else np.zeros(1)
    return indices.astype(np.int64), cu_seqlens.astype(np.int32)


def flatten(batch: dict) -> dict:
    """A collated (and masked) batch as NeoBERT's flattened inputs, transformers' padding-free
    convention: ``input_ids``, ``position_ids`` and ``labels`` (1, N) of the real tokens end
    to end, ``cu_seq_lens_q`` / ``max_length_q`` their segments, and ``label_positions`` the
    indices of the N tokens whose label is not -100 (so that no device has to find them)."""
    indices = batch["indices"]
    inputs = {key: batch[key].flatten()[indices][None] for key in ("input_ids", "position_ids", "labels") if key in batch}
    inputs.update(cu_seq_lens_q=batch["cu_seqlens"], max_length_q=batch["max_seqlen"])
    if "labels" in inputs:
        inputs["label_positions"] = (inputs["labels"][0] != -100).nonzero().squeeze(1)
    return inputs

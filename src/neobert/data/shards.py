"""A prepared corpus on disk: shards of memory-mapped token ids, their manifest, and reading them.

``neobert prepare`` (``neobert.data.prepare``) writes a directory::

    recipe.json            what is prepared (source, tokenizer, tasks); a rerun must match it
    shards/00000/          one directory per task, renamed into place only once complete:
        ids.bin            the shard's documents' token ids end to end, raw uint16 or uint32
        offsets.npy        int64, documents + 1: document i is ids[offsets[i]:offsets[i + 1]]
        hashes.npy         int64, the text hash of each document (the held-out split)
        meta.json          documents, tokens, empty documents skipped, dtype, seconds
    shards/.tmp-00000-*    a shard being written: never read, replaced when its task reruns
    manifest.json          written last, once every shard exists: the corpus is complete
    logs/                  the engine's (datatrove's) task logs, stats and completion markers

A reader opens only corpora with a manifest, so a half-written shard is never seen: a
task writes into a temporary directory and renames it into place (atomic on one file
system, the shared one included), and the manifest lists the shards and their counts.

Held out are the ``ceil(fraction * n)`` documents whose text hash is lowest, as in the
single-file cache (``neobert.data.corpus``): the manifest records the threshold, the
hash of the last held-out document, and a document is held out when its hash is at most
that. The threshold is found in two passes over the shards' hash files (a histogram of
the top 16 bits, then the one bucket that holds it), so finding it takes memory for
65,536 counters and one bucket, not for every hash. Copies of one text share a hash, so
they always land on the same side of the split.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neobert.errors import UserError

FORMAT = 1  # bump when the layout of a shard or the manifest changes
MANIFEST = "manifest.json"
RECIPE = "recipe.json"


def shard_name(rank: int) -> str:
    return f"{rank:05d}"


def shard_dir(root: Path, rank: int) -> Path:
    return Path(root) / "shards" / shard_name(rank)


# ---------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes one shard into a temporary directory; ``commit`` renames it into place.

    Documents arrive in batches of token-id lists (already framed ``[CLS] ... [SEP]``); the
    ids go to disk as they come, so memory holds one batch plus 16 bytes per document.
    """

    def __init__(self, root: Path, rank: int, dtype: str):
        self.final = shard_dir(root, rank)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".tmp-{shard_name(rank)}-*"):  # a killed attempt at this task
            shutil.rmtree(stale, ignore_errors=True)
        self.work = self.final.parent / f".tmp-{shard_name(rank)}-{uuid.uuid4().hex[:8]}"
        self.work.mkdir()
        self.dtype = np.dtype(dtype)
        self._ids = open(self.work / "ids.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self._hashes: list[int] = []
        self.tokens = 0

    def add(self, docs: list[list[int]], hashes: list[int]) -> None:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        if len(docs):
            np.concatenate([np.asarray(d, dtype=self.dtype) for d in docs]).tofile(self._ids)
        self._lengths.append(lengths)
        self._hashes.extend(hashes)
        self.tokens += int(lengths.sum())

    @property
    def documents(self) -> int:
        return len(self._hashes)

    def commit(self, meta: dict) -> None:
        """Finish the files and rename the shard into place (a finished copy already there wins)."""
        self._ids.flush()
        os.fsync(self._ids.fileno())
        self._ids.close()
        lengths = np.concatenate([np.zeros(1, np.int64), *self._lengths])
        np.save(self.work / "offsets.npy", np.cumsum(lengths))
        np.save(self.work / "hashes.npy", np.asarray(self._hashes, dtype=np.int64))
        meta = {"format": FORMAT, "documents": self.documents, "tokens": self.tokens, "dtype": self.dtype.name, **meta}
        (self.work / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(self.work, self.final)
        except OSError:  # another machine or an orphaned worker finished the same task: same content
            if not (self.final / "meta.json").is_file():
                raise
            shutil.rmtree(self.work, ignore_errors=True)

    def abort(self) -> None:
        self._ids.close()
        shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Reading


@dataclass
class Shard:
    """One shard, memory-mapped: ``ids`` (flat), ``offsets`` and ``hashes`` per document."""

    path: Path
    ids: np.ndarray
    offsets: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Token ids ``start:stop`` read from the file, not through the mapping.

        Reading rows at random places through the mapping maps the pages around each read
        too (the kernel's fault-around): over an epoch a process's resident memory would
        fill with the whole shard. A read leaves nothing mapped.
        """
        if not hasattr(self, "_file"):
            self._file = open(self.path / "ids.bin", "rb", buffering=0)  # closed when the shard is dropped
        size = self.ids.dtype.itemsize
        return np.frombuffer(os.pread(self._file.fileno(), (stop - start) * size, start * size), dtype=self.ids.dtype)


def read_shard(path: Path) -> Shard:
    """Map a finished shard directory; a UserError if its files disagree."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        offsets = np.load(path / "offsets.npy", mmap_mode="r")
        hashes = np.load(path / "hashes.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt prepared shard {path}: {e}") from None
    # np.memmap cannot map an empty file (a task that got no documents)
    ids = np.memmap(path / "ids.bin", dtype=meta["dtype"], mode="r") if offsets[-1] else np.zeros(0, meta["dtype"])
    if len(ids) != offsets[-1] or len(hashes) != len(offsets) - 1 or meta["documents"] != len(hashes):
        raise UserError(f"corrupt prepared shard {path}: {len(ids)} tokens and {len(hashes)} hashes for {len(offsets) - 1} documents; prepare it again")
    return Shard(path, ids, offsets, hashes)


def heldout_threshold(shards: list[Path], fraction: float) -> int | None:
    """The hash of the ``ceil(fraction * n)``-th lowest document over all shards (None: none held out)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    total = 0
    for path in shards:
        hashes = np.load(path / "hashes.npy", mmap_mode="r")
        counts += np.bincount(_top16(hashes), minlength=1 << 16)
        total += len(hashes)
    k = math.ceil(round(fraction * total, 6))  # round: 0.07 * 100 is 7.000000000000001
    if k == 0:
        return None
    cumulative = np.cumsum(counts)
    bucket = int(np.searchsorted(cumulative, k))  # the bucket holding the k-th lowest hash
    before = int(cumulative[bucket - 1]) if bucket else 0
    candidates = []
    for path in shards:
        hashes = np.load(path / "hashes.npy", mmap_mode="r")
        candidates.append(np.asarray(hashes[_top16(hashes) == bucket]))
    return int(np.sort(np.concatenate(candidates))[k - before - 1])


def _top16(hashes: np.ndarray) -> np.ndarray:
    """The top 16 bits of signed hashes, offset so that their order is the hashes' order."""
    return ((np.asarray(hashes) >> 48) + (1 << 15)).astype(np.int64)


def finished_shards(root: Path, tasks: int) -> list[int]:
    return [rank for rank in range(tasks) if (shard_dir(root, rank) / "meta.json").is_file()]


def write_manifest(root: Path, recipe: dict) -> dict:
    """Write ``manifest.json`` of a corpus whose shards are all finished; returns it.

    Its content depends only on the shards, so concurrent writers write the same file.
    """
    root = Path(root)
    tasks = recipe["tasks"]
    paths = [shard_dir(root, rank) for rank in range(tasks)]
    threshold = heldout_threshold(paths, recipe["heldout_fraction"])
    entries = []
    for path in paths:
        shard = read_shard(path)
        meta = json.loads((path / "meta.json").read_text())
        held = heldout_mask(shard.hashes, threshold)
        held_tokens = int(np.diff(shard.offsets)[held].sum())
        entries.append({
            "name": path.name,
            "documents": len(shard),
            "tokens": shard.num_tokens,
            "heldout_documents": int(held.sum()),
            "heldout_tokens": held_tokens,
            "skipped": meta.get("skipped", 0),
        })
    manifest = {
        "format": FORMAT,
        "source": recipe["source"],
        "tokenizer": recipe["tokenizer"],
        "dtype": recipe["dtype"],
        "heldout_fraction": recipe["heldout_fraction"],
        "heldout_threshold": threshold,
        "documents": sum(e["documents"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "heldout_documents": sum(e["heldout_documents"] for e in entries),
        "heldout_tokens": sum(e["heldout_tokens"] for e in entries),
        "skipped": sum(e["skipped"] for e in entries),
        "recipe": recipe,
        "shards": entries,
    }
    if manifest["documents"] == 0:
        raise UserError(f"empty corpus: {recipe['source']} has no non-empty documents")
    if manifest["heldout_documents"] == manifest["documents"]:
        raise UserError(f"{recipe['source']}: {manifest['documents']} document(s) are too few for data.heldout_fraction={recipe['heldout_fraction']}")
    temporary = root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, root / MANIFEST)
    return manifest


def heldout_mask(hashes: np.ndarray, threshold: int | None) -> np.ndarray:
    """True for the documents held out (hash at most the manifest's threshold)."""
    if threshold is None:
        return np.zeros(len(hashes), dtype=bool)
    return np.asarray(hashes) <= threshold


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a prepared-corpus directory (complete or not)."""
    path = Path(path).expanduser()
    return (path / RECIPE).is_file() or (path / MANIFEST).is_file()


class PreparedCorpus:
    """A complete prepared corpus: its manifest and its shards, mapped on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if (self.path / RECIPE).is_file():
                recipe = json.loads((self.path / RECIPE).read_text())
                done = len(finished_shards(self.path, recipe["tasks"]))
                raise UserError(f"{self.path} is not completely prepared ({done} of {recipe['tasks']} shards): run neobert prepare again")
            raise UserError(f"{self.path} is not a prepared corpus (no {MANIFEST})")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.path} was prepared in format {self.manifest.get('format')}, this version reads {FORMAT}: prepare it again")
        self._shards: collections.OrderedDict[int, Shard] = collections.OrderedDict()
        self.open_shards = 16  # shards kept mapped at once (a reader in windows of 8 uses 16); more grow memory with the corpus

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    @property
    def threshold(self) -> int | None:
        return self.manifest["heldout_threshold"]

    def shard(self, i: int) -> Shard:
        """Shard ``i``, mapped; the ``open_shards`` most recently used stay mapped."""
        if i in self._shards:
            self._shards.move_to_end(i)
            return self._shards[i]
        shard = read_shard(self.path / "shards" / self.manifest["shards"][i]["name"])
        if len(shard) != self.manifest["shards"][i]["documents"]:
            raise UserError(f"{shard.path} does not match {self.path / MANIFEST}; prepare the corpus again")
        self._shards[i] = shard
        if len(self._shards) > self.open_shards:
            self._shards.popitem(last=False)
        return shard

    def split(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) document indices of shard ``i``, each in the shard's order."""
        held = heldout_mask(self.shard(i).hashes, self.threshold)
        return np.flatnonzero(~held), np.flatnonzero(held)

    def token_corpora(self):
        """(train, held-out) ``TokenCorpus`` in memory, documents in shard order.

        For corpora that fit in memory (the built-in one, a few GB of ids): the ids are
        copied out of the shards, held-out documents removed.
        """
        from neobert.data.corpus import TokenCorpus

        dtype = np.dtype(self.manifest["dtype"])
        parts = {"train": ([], []), "heldout": ([], [])}
        for i in range(len(self)):
            shard = self.shard(i)
            lengths = np.diff(shard.offsets)
            held = heldout_mask(shard.hashes, self.threshold)
            held_tokens = np.repeat(held, lengths)
            for name, docs, tokens in (("train", ~held, ~held_tokens), ("heldout", held, held_tokens)):
                parts[name][0].append(lengths[docs])
                parts[name][1].append(np.asarray(shard.ids[tokens], dtype=dtype))
        corpora = []
        for lengths, ids in parts.values():
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
            corpora.append(TokenCorpus(np.concatenate(ids), offsets))
        return tuple(corpora)

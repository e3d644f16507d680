"""Tokenize a corpus once, split it by document, and cache it on disk as memory-mapped token ids.

A cached corpus is a directory ``corpus-<name>-<key>`` under the cache directory, where
the key hashes the recipe: the source's identity (file paths, sizes and modification
times, or the hub name), the tokenizer, the held-out fraction and the document cap. It
holds, for ``train`` and ``heldout``, the flat token ids (``.ids``, raw uint16 or uint32)
and the document offsets (``.offsets.npy``, int64, one more than documents), plus
``meta.json``. It is built in a temporary directory beside it and renamed into place
once complete (``atomic_dir``), so an interrupted build never looks complete and a second run only maps
the files; the temporary directory of a build whose process died is removed by the next
run, and the tokenizer worker processes die with the process that started them.

The held-out documents are the ``ceil(fraction * n)`` ones whose text hashes lowest: the
same whatever the seed, the file order or the machine, and an exact share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from neobert import rundir
from neobert.data.config import DataConfig
from neobert.data.sources import describe_source, load_documents
from neobert.errors import UserError
from neobert.files import atomic_dir

FORMAT = 1  # bump when the cache layout or the way documents are made changes
SPLITS = ("train", "heldout")


@dataclass
class TokenCorpus:
    """Documents as token ids: ``ids`` (flat, usually a read-only np.memmap) and ``offsets``.

    Document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``, already framed ``[CLS] ... [SEP]``.
    """

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_documents(cls, docs: list, dtype=np.uint16) -> TokenCorpus:
        """An in-memory corpus from token-id sequences (each already framed)."""
        lengths = [len(d) for d in docs]
        ids = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.zeros(0, dtype)
        return cls(ids, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


def prepare_corpus(cfg: DataConfig, tokenizer, verbose: bool = True) -> tuple[TokenCorpus, TokenCorpus]:
    """(train, held-out) token corpora of ``cfg.source``, built once and then read from the cache.

    ``tokenizer`` is a fast tokenizer that frames each text as ``[CLS] ... [SEP]``.
    ``verbose`` shows the progress bars and a one-line summary on stderr. The built-in
    corpus and prepared-corpus directories go through ``neobert prepare``'s shards.
    """
    if uses_prepared(cfg):
        return open_prepared(cfg, tokenizer, verbose)
    recipe = {
        "format": FORMAT,
        "source": describe_source(cfg),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "heldout_fraction": cfg.heldout_fraction,
        "max_documents": cfg.max_documents,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.source.removeprefix("hf:")).name or "corpus")[:40]
    directory = cfg.resolved_cache_dir() / f"corpus-{name}-{key}"
    remove_stale_builds(directory.parent)
    if not (directory / "meta.json").is_file():
        build_corpus(cfg, tokenizer, recipe, directory, verbose)
    current = directory / "meta.json"
    try:
        meta = json.loads(current.read_text())
        splits = []
        for split in SPLITS:
            current = directory / f"{split}.offsets.npy"
            splits.append(load_split(directory, split, meta["dtype"]))
        train, heldout = splits
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # np.load and json raise ValueError
        # numpy's own words for a damaged .npy suggest loading it with pickle: say what it is instead
        reason = "not an array of offsets" if current.suffix == ".npy" else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"corrupt corpus cache {directory}: {current.name} cannot be read ({reason}); delete the directory to rebuild it") from None
    if verbose:
        built = f"built in {meta['seconds']:.1f} s" + (f", {meta['skipped']} empty documents skipped" if meta["skipped"] else "")
        print(
            f"corpus {cfg.source}: {len(train):,} train + {len(heldout):,} held-out documents, "
            f"{train.num_tokens:,} + {heldout.num_tokens:,} tokens ({built}; cached in {directory})",
            file=sys.stderr,
        )
    return train, heldout


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's full JSON definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast tokenizer (needs tokenizer.json)")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def build_corpus(cfg: DataConfig, tokenizer, recipe: dict, directory: Path, verbose: bool) -> None:
    """Read, tokenize, split and write the corpus into ``directory``, atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    # a second rank may finish the same corpus first: then its copy is kept
    with atomic_dir(directory, replace=False) as work, _workers_follow_this_process():
        start = time.perf_counter()
        with _progress_bars(verbose):
            docs = load_documents(cfg, work / "datasets")
            if cfg.max_documents is not None and len(docs) > cfg.max_documents:
                docs = docs.select(range(cfg.max_documents))
            dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"
            tokens = docs.map(
                tokenize_batch,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer},
                remove_columns=docs.column_names,
                features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype)), "hash": datasets.Value("int64")}),
                num_proc=min(cfg.num_proc, len(docs)) if cfg.num_proc > 1 and len(docs) > 1 else None,
                cache_file_name=str(work / "datasets" / "tokens.arrow"),
                new_fingerprint=directory.name,  # saves hashing the tokenizer; the work dir is new anyway
                desc=f"tokenizing {cfg.source}",
            )
        if len(tokens) == 0:
            raise UserError(f"empty corpus: {cfg.source} has no non-empty documents")
        heldout = heldout_mask(tokens.data.column("hash").to_numpy(), cfg.heldout_fraction)
        if heldout.all():
            raise UserError(f"{cfg.source}: {len(tokens)} document(s) are too few for data.heldout_fraction={cfg.heldout_fraction}")
        _write_splits(tokens, heldout, work, np.dtype(dtype))
        meta = {
            "source": cfg.source,
            "recipe": recipe,
            "dtype": dtype,
            "documents": len(docs),
            "skipped": len(docs) - len(tokens),
            "seconds": round(time.perf_counter() - start, 2),
        }
        del docs, tokens  # their Arrow files live in the work dir, removed below
        shutil.rmtree(work / "datasets")
        (work / "meta.json").write_text(json.dumps(meta, indent=1))


def remove_stale_builds(cache_dir: Path) -> list[Path]:
    """Remove the temporary directories of corpus builds whose process is dead."""
    removed = rundir.remove_stale_temporaries(cache_dir)
    if removed:
        print(f"removed {len(removed)} unfinished corpus build(s) of dead processes in {cache_dir}", file=sys.stderr)
    return removed


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when ``parent_pid`` (this process's parent) dies (Linux).

    A tokenizer worker of a killed run would otherwise wait forever on the pool's queue:
    it holds the queue's write end itself, so it never sees end-of-file.
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request: follow it now
        os._exit(1)


_BUILDER_PID: int | None = None  # set while this process forks tokenizer workers


def _after_fork_in_child() -> None:
    global _BUILDER_PID
    if _BUILDER_PID is not None and sys.platform.startswith("linux"):
        parent, _BUILDER_PID = _BUILDER_PID, None  # a worker's own children are not concerned
        _die_with_parent(parent)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _workers_follow_this_process():
    """Within the block, processes forked from this one (the tokenizer pool) die with it."""
    global _BUILDER_PID
    _BUILDER_PID = os.getpid()
    try:
        yield
    finally:
        _BUILDER_PID = None


def tokenize_batch(batch: dict, tokenizer) -> dict:
    """Token ids (framed [CLS] ... [SEP]) and a text hash per non-empty document of a batch."""
    texts = [t for t in batch["text"] if t and not t.isspace()]
    if not texts:  # the tokenizer fails on an empty batch
        return {"input_ids": [], "hash": []}
    ids = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    return {"input_ids": ids, "hash": [text_hash(t) for t in texts]}


def text_hash(text: str) -> int:
    """A signed 64-bit hash of a document's text (Arrow stores it as int64)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def heldout_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True for the ``ceil(fraction * n)`` documents with the lowest text hashes."""
    mask = np.zeros(len(hashes), dtype=bool)
    count = math.ceil(round(fraction * len(hashes), 6))  # round: 0.07 * 100 is 7.000000000000001
    mask[np.argsort(hashes, kind="stable")[:count]] = True
    return mask


def _write_splits(tokens: datasets.Dataset, heldout: np.ndarray, work: Path, dtype: np.dtype) -> None:
    """Stream the token lists, chunk by chunk, into the two flat id files and their offsets."""
    column = tokens.data.column("input_ids")
    lengths = np.concatenate([chunk.value_lengths().to_numpy() for chunk in column.chunks]).astype(np.int64)
    with open(work / "train.ids", "wb") as train_file, open(work / "heldout.ids", "wb") as heldout_file:
        first = 0
        for chunk in column.chunks:
            values = chunk.flatten().to_numpy().astype(dtype, copy=False)
            token_heldout = np.repeat(heldout[first : first + len(chunk)], lengths[first : first + len(chunk)])
            values[~token_heldout].tofile(train_file)
            values[token_heldout].tofile(heldout_file)
            first += len(chunk)
    for split, keep in (("train", ~heldout), ("heldout", heldout)):
        np.save(work / f"{split}.offsets.npy", np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64))


def load_split(directory: Path, split: str, dtype: str) -> TokenCorpus:
    offsets = np.load(directory / f"{split}.offsets.npy")
    path = directory / f"{split}.ids"
    # np.memmap cannot map an empty file (no held-out split)
    ids = np.memmap(path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    if len(ids) != offsets[-1]:
        raise UserError(f"corrupt corpus cache {directory}: {path.name} has {len(ids)} tokens, not {offsets[-1]}; delete it")
    return TokenCorpus(ids, offsets)


@contextlib.contextmanager
def _progress_bars(show: bool):
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def uses_prepared(cfg: DataConfig) -> bool:
    """Whether ``data.source`` is read as a prepared corpus: the built-in corpus or a prepared directory."""
    from neobert.data.shards import is_prepared

    return cfg.source == "builtin" or is_prepared(cfg.source)


def open_prepared_corpus(cfg: DataConfig, tokenizer, verbose: bool = True):
    """The ``PreparedCorpus`` of ``data.source``: a prepared directory, checked against this run's
    settings, or the built-in corpus prepared into the cache on first use.

    Processes that open the built-in corpus at once (the ranks of a ``torchrun`` job) take the
    cache directory's file lock in turn: the first prepares it, the others wait on the lock,
    not in a collective with a timeout, then find it prepared. Ranks on several machines with
    node-local caches each prepare their own copy, which is the same.
    """
    from neobert.data.prepare import PrepareArgs, PrepareConfig, prepare
    from neobert.data.shards import PreparedCorpus, is_prepared

    if not is_prepared(cfg.source):
        with _cache_lock(cfg.resolved_cache_dir()):
            corpus = PreparedCorpus(prepare(PrepareConfig(cfg, PrepareArgs(progress=verbose)), tokenizer))
    else:
        corpus = PreparedCorpus(cfg.source)
        made = corpus.manifest["recipe"]
        if corpus.manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise UserError(f"{cfg.source} was prepared with another tokenizer ({made['tokenizer_name'] or 'bert-base-uncased'}); set data.tokenizer to it or prepare again")
        if cfg.max_documents is not None or cfg.heldout_fraction != made["heldout_fraction"]:
            raise UserError(f"{cfg.source} is prepared (data.heldout_fraction={made['heldout_fraction']}, data.max_documents={made['max_documents']}): "
                            "these are set when preparing, not when reading")
    if verbose:
        m = corpus.manifest
        print(f"corpus {cfg.source}: {m['documents'] - m['heldout_documents']:,} train + {m['heldout_documents']:,} held-out documents, "
              f"{m['tokens'] - m['heldout_tokens']:,} + {m['heldout_tokens']:,} tokens in {len(corpus)} shard(s) (prepared in {corpus.path})",
              file=sys.stderr)
    return corpus


@contextlib.contextmanager
def _cache_lock(cache_dir: Path):
    """An exclusive ``flock`` on ``cache_dir/.prepare.lock``, released when the block ends (or the process dies)."""
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".prepare.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def open_prepared(cfg: DataConfig, tokenizer, verbose: bool = True):
    """(train, held-out) ``TokenCorpus`` of a prepared corpus, in memory (see ``PreparedCorpus.token_corpora``)."""
    return open_prepared_corpus(cfg, tokenizer, verbose).token_corpora()

"""Directories that appear whole or not at all: ``atomic_dir``.

Checkpoints, a run's ``final/`` model, a sentence-transformers export and a tokenized
corpus are each written into a temporary directory beside their destination and renamed
into place once complete, so a reader (a resumed run, a second rank, a user) never sees
a half-written one and an interrupted writer leaves only a temporary directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from neobert import rundir


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True, sync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``final``.

    ``replace``: an existing ``final`` is removed first (only if neobert made it:
    :func:`neobert.rundir.safe_rmtree`); otherwise an existing ``final`` (another process
    finished the same content first) is kept and the new copy dropped. ``sync``: the files
    are flushed to disk before the rename makes them visible. The temporary directory is
    named after its writer and marked as neobert's, so a later run removes it if the writer
    died (:func:`neobert.rundir.remove_stale_temporaries`), and so is ``final``. On an
    exception the temporary directory is removed and ``final`` is left untouched; a write
    that failed for want of space is one line naming the file.
    """
    final = Path(final)
    tmp = rundir.make_temp_dir(final, final.name)
    try:
        try:
            yield tmp
        except (OSError, RuntimeError, SafetensorError) as e:
            if not _is_write_failure(e):
                raise
            written = max((p for p in tmp.rglob("*") if p.is_file() and p.name != rundir.OWNED), key=lambda p: p.stat().st_mtime, default=None)
            raise rundir.write_failure(final / written.relative_to(tmp) if written else final, e) from None
        if sync:
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
        if final.exists() and replace:
            rundir.safe_rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # a non-empty final appeared meanwhile: another writer's, kept when not replacing
            if replace or not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_write_failure(error: BaseException) -> bool:
    """A full disk, a quota, a size limit or a read-only filesystem, however the writer words it
    (torch.save: "unexpected pos ..."; safetensors: an I/O error)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
    text = str(error)
    return "unexpected pos" in text or "write failed" in text or "No space left" in text or isinstance(error, SafetensorError)

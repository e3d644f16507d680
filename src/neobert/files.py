"""Directories that appear whole or not at all: ``atomic_dir``.

Checkpoints, a run's ``final/`` model, a sentence-transformers export and a tokenized
corpus are each written into a temporary directory beside their destination and renamed
into place once complete, so a reader (a resumed run, a second rank, a user) never sees
a half-written one and an interrupted writer leaves only a temporary directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True, sync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``final``.

    ``replace``: an existing ``final`` is removed first; otherwise an existing ``final``
    (another process finished the same content first) is kept and the new copy dropped.
    ``sync``: the files are flushed to disk before the rename makes them visible.
    On an exception the temporary directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"  # unique per writer
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if sync:
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
        if final.exists() and replace:
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # a non-empty final appeared meanwhile: another writer's, kept when not replacing
            if replace or not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

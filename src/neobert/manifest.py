"""Checkpoints that verify themselves: a manifest of every file's size and SHA-256.

A checkpoint directory is complete only when its ``manifest.json`` is there: the writer
adds it last, after every other file is written and flushed, and the manifest lists each
file with its size and checksum, plus the run id of the run that wrote it. :func:`verify`
re-reads the files and names the first thing that is wrong (a file missing, truncated or
with changed bytes; the manifest itself damaged). :func:`newest_intact` walks a run's
checkpoints from the newest and returns the first that verifies, with one line per
damaged one skipped, so a resumed run falls back to the previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed(directory: Path) -> list[Path]:
    """The files a manifest covers: every regular file below ``directory`` except the
    manifest (and its temporary) and neobert's ownership markers. Other dot-files are
    content: a sharded checkpoint's index is ``dcp/.metadata``."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp") and not p.name.startswith(".neobert")
    )


def write_manifest(directory: str | Path, **fields) -> dict:
    """Flush every file of ``directory`` to disk, then write its manifest (atomically, last).

    ``fields`` (the run id, the step) are stored beside the file list.
    """
    directory = Path(directory)
    files = {}
    for path in _listed(directory):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    manifest = {"format": FORMAT, **fields, "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of ``directory``, or None when it has none or it is unreadable."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify(directory: str | Path) -> str | None:
    """None if every file listed in ``directory``'s manifest has its size and checksum;
    otherwise what is wrong, in a few words (the first problem found)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return f"no {MANIFEST} (the write did not finish)"
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST} is damaged"
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if file_digest(path) != entry.get("sha256"):
            return f"{name} has changed bytes (checksum mismatch)"
    return None


def newest_intact(checkpoints: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest of ``checkpoints`` (oldest first) that verifies, and the (path, problem)
    of each newer one that did not."""
    damaged = []
    for path in reversed(checkpoints):
        problem = verify(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged

"""Run directories that never lose or mix work: ownership, a lock, and safe removal.

- **Ownership.** A run directory holds a marker, ``.neobert-run.json``, naming the command
  and the run (a random id) that made it; every directory neobert creates and may later
  remove (a checkpoint, ``final/``, a temporary directory, a fine-tuning run) holds an
  ``.neobert-owned`` file. :func:`safe_rmtree` removes a directory only when that file is in
  it, so a user's ``final/thesis.txt`` or ``sst2/notes.txt`` is never deleted.
- **Claiming** (:func:`claim`): a new or empty directory becomes this run's; a directory of
  the same command's run is resumed (``resume=auto``); anything else, an earlier run under
  ``resume=none`` included, is refused unless ``overwrite=True``, which removes only the
  entries neobert made and still refuses when a name neobert writes is taken by a user's
  file.
- **Lock.** :func:`claim` holds an exclusive ``fcntl`` lock on ``.neobert.lock`` for the life
  of the process (the kernel drops it when the process ends, however it ends); a second
  run on the directory gets a one-line error naming the PID that holds it.
- **Temporaries.** Atomic writers name their temporary directories ``...tmp-<host>-<pid>...``
  (:func:`temp_name`); :func:`remove_stale_temporaries` deletes those whose writer is dead.
- **Writes that fail** (a full disk, a read-only directory): :func:`write_failure` turns
  the ``OSError`` (or torch's ``RuntimeError`` from a failed write) into one line naming
  the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from neobert.errors import UserError

MARKER = ".neobert-run.json"
OWNED = ".neobert-owned"
LOCK = ".neobert.lock"
HOST = socket.gethostname()
# ``<anything>.tmp-<host>-<pid>[-<suffix>]`` or ``.tmp-<anything>-<host>-<pid>``: see temp_name
_TEMP = re.compile(r"(?:^\.tmp-.*|\.tmp)-(?P<host>[^/]+?)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")


def mark_owned(directory: Path, what: str = "") -> None:
    """Record that neobert created ``directory`` (so :func:`safe_rmtree` may remove it)."""
    (Path(directory) / OWNED).write_text(json.dumps({"what": what, "pid": os.getpid(), "host": HOST}) + "\n")


def is_owned(directory: Path) -> bool:
    directory = Path(directory)
    return directory.is_dir() and not directory.is_symlink() and (directory / OWNED).is_file()


def safe_rmtree(directory: str | Path) -> None:
    """Remove ``directory`` if neobert created it; refuse (one line) if it did not.

    A missing directory is fine. A symlink, a file, or a directory without the
    ``.neobert-owned`` file is never removed.
    """
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if not is_owned(directory):
        raise UserError(f"refusing to remove {directory}: neobert did not create it (no {OWNED} in it); move it away or choose another directory")
    shutil.rmtree(directory)


def temp_name(final: Path) -> Path:
    """The temporary sibling an atomic writer fills before renaming it to ``final``:
    unique per writer, and naming the writer so a later run can tell when it is dead."""
    return final.parent / f".tmp-{final.name}-{HOST}-{os.getpid()}"


def make_temp_dir(final: Path, what: str) -> Path:
    """A fresh, owned temporary directory for ``final`` (see :func:`temp_name`)."""
    tmp = temp_name(final)
    if tmp.exists():
        safe_rmtree(tmp)
    tmp.mkdir(parents=True)
    mark_owned(tmp, what)
    return tmp


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete the temporary directories in ``parent`` whose writer (on this host) is dead.

    Only directories named by :func:`temp_name` (or the corpus builder's
    ``NAME.tmp-<host>-<pid>-...``) and holding ``.neobert-owned`` are candidates; a live
    writer's, another host's or a user's directory is left alone. Returns what was removed.
    """
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TEMP.search(entry.name)
        if match is None or match["host"] != HOST or not is_owned(entry):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def write_failure(path: str | Path, error: BaseException) -> UserError:
    """One line for a write that failed: which path, and why (a full disk said plainly)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
    if not full:  # torch.save reports a short write as "unexpected pos ..." or "file write failed"
        try:
            full = shutil.disk_usage(_existing_parent(Path(path))).free < 1 << 20
        except OSError:
            pass
    if full:
        reason = "no space left on device"
    elif "unexpected pos" in text or "write failed" in text:  # torch.save's words for a short write
        reason = f"the write was cut short ({text.split('. ')[-1].strip()}: a file-size limit, a quota?)"
    else:
        reason = text
    return UserError(f"cannot write {path}: {reason}; the partial write was removed")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---------------------------------------------------------------------------------------
# Claiming a run directory


@dataclass
class RunDir:
    """A claimed run directory: ``path``, the run id of its marker, and the open lock."""

    path: Path
    run_id: str
    command: str
    resumable: bool  # the directory held this command's run (resume=auto may continue it)
    lock_fd: int | None = None

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    def __del__(self):  # the run's function returned (or raised): a later run in this process may claim it
        self.release()


def check_output_dir(output_dir: str, key: str = "train.output_dir") -> Path:
    """``output_dir`` as a path, refused (one line) when empty, a file, or not writable:
    checked before any data is read."""
    if output_dir is None or not str(output_dir).strip():
        raise UserError(f"{key} is empty: name a run directory (e.g. {key}=runs/my-run)")
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={output_dir} is a file, not a directory")
    existing = _existing_parent(path.absolute())
    if not existing.is_dir():
        raise UserError(f"{key}={output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={output_dir}: {existing} is not writable")
    return path


def acquire_lock(directory: Path) -> int:
    """Hold an exclusive advisory lock on ``directory`` for the life of the process; raise a
    one-line error naming the holder's PID if another process holds it."""
    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot lock {directory}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 and holder[1] != HOST else "") if holder else "another process"
        raise UserError(f"{directory} is in use by another neobert run ({who}); wait for it to end or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {HOST}\n".encode(), 0)
    return fd


def read_marker(directory: Path) -> dict | None:
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker, dict) or "run_id" not in marker:
            raise ValueError("no run_id")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); move the directory away or choose another one") from None
    return marker


def _write_marker(directory: Path, command: str) -> str:
    run_id = uuid.uuid4().hex[:12]
    marker = {"run_id": run_id, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": HOST, "pid": os.getpid()}
    tmp = Path(directory) / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, Path(directory) / MARKER)
    return run_id


def _removable(path: Path, marked: bool) -> bool:
    """Whether an entry at a name neobert writes is neobert's: an owned directory, or a
    file in a directory marked as a run."""
    if path.is_dir() and not path.is_symlink():
        return is_owned(path)
    return marked


def _remove_owned(directory: Path, entries: tuple[str, ...]) -> None:
    """Remove the ``entries`` of a run directory (each checked by :func:`_removable`)."""
    for name in entries:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            safe_rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def claim(
    output_dir: str,
    command: str,
    entries: tuple[str, ...],
    resume: str = "auto",
    overwrite: bool = False,
    main: bool = True,
    key: str = "train.output_dir",
    replace_own: bool = False,
) -> RunDir:
    """Make ``output_dir`` this run's, or refuse with one line; see the module docstring.

    ``entries`` are the names the command writes at the top of its run directory (all of
    them are neobert's once the directory is a marked run). ``resume``: ``auto`` continues
    the directory's run of the same command; ``none`` wants a fresh directory; a path
    resumes from that checkpoint (the directory must be fresh or this run's).
    ``replace_own``: an earlier run of the same command is replaced (its files removed, a
    new run id) instead of refused: for commands that always start over. ``main``:
    only rank 0 creates, locks and marks; the other ranks read the marker after a barrier.
    """
    path = check_output_dir(output_dir, key)
    if not main:
        marker = read_marker(path) or {}
        return RunDir(path, marker.get("run_id", ""), command, resumable=resume != "none")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}={output_dir}: cannot create it ({e.strerror})") from None
    lock_was_there = (path / LOCK).exists()
    fd = acquire_lock(path)
    try:
        removed = remove_stale_temporaries(path) + remove_stale_temporaries(path / "checkpoints")
        if removed:
            print(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} of interrupted writers: {', '.join(p.name for p in removed)}")
        marker = read_marker(path)
        others = sorted(p.name for p in path.iterdir() if p.name not in (LOCK, MARKER))
        same = marker is not None and marker.get("command") == command
        if same and resume != "none" and not replace_own:
            return RunDir(path, marker["run_id"], command, resumable=True, lock_fd=fd)
        overwrite = overwrite or (same and replace_own)
        if not others:  # empty, or a marked run that wrote nothing yet: nothing to lose
            return RunDir(path, _write_marker(path, command), command, resumable=False, lock_fd=fd)
        if not overwrite:
            if marker is None:
                listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                why = f"holds files neobert did not write ({listed})"
            elif marker.get("command") != command:
                why = f"holds a `neobert {marker.get('command')}` run"
            else:
                why = "holds an earlier run and train.resume=none would mix the two"
            raise UserError(f"{key}={output_dir} {why}: choose another directory, or set {key.split('.')[0]}.overwrite=true to replace neobert's files in it")
        taken = [n for n in entries if (path / n).exists() and not _removable(path / n, marker is not None)]
        if taken:
            raise UserError(f"{key}={output_dir}: {', '.join(taken)} in it was not written by neobert, and overwrite replaces only neobert's files: move it away")
        _remove_owned(path, entries)
        return RunDir(path, _write_marker(path, command), command, resumable=False, lock_fd=fd)
    except BaseException:
        if not lock_was_there and not (path / MARKER).exists():  # refused: leave the user's directory as it was
            (path / LOCK).unlink(missing_ok=True)
        os.close(fd)
        raise


def ensure_owned_dir(directory: Path, what: str) -> Path:
    """Create ``directory`` as neobert's (marked owned); an existing one is kept as it is."""
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(parents=True)
        mark_owned(directory, what)
    return directory


# ---------------------------------------------------------------------------------------
# metrics.jsonl


def read_jsonl_records(path: str | Path, warn: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file whose last line may be torn.

    A write cut short (a full disk, a kill mid-append) leaves a partial last line: it is
    dropped, with a one-line warning when ``warn``. A damaged line elsewhere is an error
    naming the file and line.
    """
    import sys

    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            if all(not rest.strip() for rest in lines[n:]):
                if warn:
                    print(f"warning: {path}: dropped a torn last line ({len(line)} bytes)", file=sys.stderr)
                break
            raise UserError(f"{path} line {n}: not a JSON object; fix or remove that line") from None
        records.append(record)
    return records

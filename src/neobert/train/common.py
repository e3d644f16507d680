"""Pieces the training commands share: processes, seeds, checkpoints and the final export.

- ``setup_distributed`` / ``Dist``: torchrun environment (DDP or FSDP2 on gloo or NCCL), with
  the process-group timeout of ``train.dist_timeout_minutes``; rank 0 (``Dist.is_main``) logs
  and writes.
- Run directories: ``open_run`` claims ``train.output_dir`` for this run (ownership marker
  and lock: :mod:`neobert.rundir`) before any data is read.
- Checkpoints: ``save_checkpoint`` writes ``checkpoints/step-N`` through ``atomic_dir``,
  with a manifest of every file's size and checksum added last (:mod:`neobert.manifest`),
  so a ``step-N`` with a manifest is complete; ``resolve_resume`` picks the newest that
  verifies (setting damaged ones aside with a warning) on rank 0 and broadcasts its choice,
  and ``load_checkpoint`` restores it. One process and DDP write the whole model
  (model.safetensors, optimizer.pt); FSDP2 writes each rank's shards through
  ``torch.distributed.checkpoint`` (``dcp/``), never gathered on one rank. Either kind
  resumes on any number of processes, sharded or not. Each rank saves its own RNG states
  (``rng-RANK.pt``).
- ``export_final``: the Hugging Face directory (model + tokenizer) that ends a run.

The optimizer and schedule are in :mod:`neobert.train.optim`, the loop, its logger and
its counters in :mod:`neobert.train.loop`, devices and bf16 in :mod:`neobert.device`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from neobert import manifest, rundir
from neobert.device import resolve_device
from neobert.errors import UserError
from neobert.files import atomic_dir


# ---------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value), on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]



def setup_distributed(device: str = "auto", timeout_minutes: float | None = None) -> Dist:
    """Read torchrun's environment; init the process group when WORLD_SIZE > 1.

    ``timeout_minutes`` (``train.dist_timeout_minutes``) bounds every collective, barriers
    included: how long a process waits for the others (e.g. while rank 0 writes a large
    checkpoint) before the run fails; None keeps PyTorch's default.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # one GPU per process: this rank's
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world > 1 and not torch_dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank, world, local_rank, device)


def teardown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Checkpoints


# The names a training run writes at the top of its directory (all neobert's in a marked run).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard", "curves.png")


def open_run(output_dir: str, command: str, resume: str, overwrite: bool, dist: Dist) -> rundir.RunDir:
    """Claim the run directory (rank 0 creates, marks and locks it; the others read its
    marker after a barrier): one line, and no work done, when it is not this run's to write."""
    run = rundir.claim(output_dir, command, RUN_ENTRIES, resume=resume, overwrite=overwrite) if dist.is_main else None
    dist.barrier()
    return run if dist.is_main else rundir.claim(output_dir, command, RUN_ENTRIES, resume=resume, main=False)


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _step_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)), key=_step_of)


def checkpoint_dirs(output_dir: Path, run_id: str | None = None) -> list[Path]:
    """Checkpoints with a manifest (it is written last), oldest first; temporary and
    set-aside directories are ignored. ``run_id``: only those that run wrote."""
    found = [p for p in _step_dirs(output_dir) if (p / manifest.MANIFEST).is_file()]
    if run_id is not None:
        found = [p for p in found if (manifest.read_manifest(p) or {}).get("run_id") == run_id]
    return found


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, run: rundir.RunDir, dist: Dist) -> Path | None:
    """The checkpoint to resume from: ``auto``, the newest of this run's that verifies
    (each damaged newer one set aside as ``damaged-step-N`` with a one-line warning; none
    intact is an error, never a silent restart); ``none``, nothing; else that path,
    verified.

    Rank 0 decides and broadcasts its choice (or its error, so every process stops with the
    same line): a checkpoint of the run directory as its name in ``checkpoints/``, which
    each process finds under its own ``train.output_dir``, an explicit ``train.resume``
    as that setting, which each process reads as given to it. Every process then checks
    that it sees the checkpoint; if one does not (a node-local directory), all stop together.
    """
    if dist.world == 1:
        return _choose_checkpoint(resume, run)
    choice = None
    if dist.is_main:
        try:
            chosen = _choose_checkpoint(resume, run)
            choice = ("ok", None if chosen is None else (chosen.name if resume == "auto" else None))
        except UserError as e:
            choice = ("error", str(e))
    kind, value = dist.broadcast(choice)
    if kind == "error":
        raise UserError(value)
    if resume == "none" or (resume == "auto" and value is None):
        return None
    path = run.path / "checkpoints" / value if resume == "auto" else Path(resume)
    blind = int(dist.all_sum(0.0 if (path / "state.json").is_file() else 1.0))
    if blind:
        named = f"checkpoints/{value} of train.output_dir" if resume == "auto" else f"train.resume={resume}"
        raise UserError(f"{blind} of {dist.world} processes cannot read {named}, which rank 0 resumes from: "
                        "the run directory (and train.resume) must be on a filesystem every node sees")
    return path


def _choose_checkpoint(resume: str, run: rundir.RunDir) -> Path | None:
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume={resume}: no such checkpoint directory")
        if not (path / manifest.MANIFEST).is_file() and (path / "state.json").is_file():
            print(f"warning: {path} has no manifest (written by an older neobert): resuming from it unverified", file=sys.stderr)
            return path
        problem = manifest.verify(path)
        if problem:
            raise UserError(f"train.resume={resume}: the checkpoint is damaged ({problem})")
        return path
    if not run.resumable:
        return None
    # this run's checkpoints, and those whose manifest is too damaged to say whose they are
    candidates = [p for p in _step_dirs(run.path) if (manifest.read_manifest(p) or {}).get("run_id", run.run_id) == run.run_id]
    chosen, damaged = manifest.newest_intact(candidates)
    if chosen is None and damaged:
        listed = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise UserError(f"no intact checkpoint in {run.path / 'checkpoints'} ({listed}); set train.overwrite=true to start the run over")
    for path, problem in damaged:  # kept for inspection, out of the way of resuming and pruning
        aside = path.with_name(f"damaged-{path.name}")
        rundir.safe_rmtree(aside)
        os.replace(path, aside)
        print(f"warning: checkpoint {path.name} is damaged ({problem}): set aside as {aside.name}; resuming from {chosen.name}", file=sys.stderr)
    return chosen


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def is_sharded(model: torch.nn.Module) -> bool:
    """The model is sharded by FSDP2 (``fully_shard``) over several processes."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule) and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


@contextlib.contextmanager
def shared_atomic_dir(final: Path, dist: Dist, complete: Callable[[Path], object]) -> Iterator[Path]:
    """:func:`neobert.files.atomic_dir` written by every process: rank 0 makes the temporary
    directory and tells the others its name; the body runs on every process and writes its
    files into it; once all have (a failure on any process fails all of them together, one
    line on those that did not fail), rank 0 calls ``complete(tmp)`` (which writes the
    manifest) and renames it into place."""
    if dist.world == 1:
        with atomic_dir(final) as tmp:
            yield tmp
            complete(tmp)
        return
    if dist.is_main:
        with atomic_dir(final) as tmp:
            dist.broadcast(str(tmp))
            yield from _all_or_none(tmp, final, dist)
            complete(tmp)
    else:
        yield from _all_or_none(Path(dist.broadcast(None)), final, dist)
    dist.barrier()  # renamed: every process sees the checkpoint from here


def _all_or_none(tmp: Path, final: Path, dist: Dist) -> Iterator[Path]:
    error = None
    try:
        yield tmp
    except Exception as e:  # noqa: BLE001 (every process learns of it first, then it is raised here)
        error = e
    failed = int(dist.all_sum(1.0 if error is not None else 0.0))
    if error is not None:
        raise error
    if failed:
        raise UserError(f"{failed} other process(es) could not write {final} (their error is above)")


def save_checkpoint(
    output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int, dist: Dist,
    run_id: str | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temporary directory renamed when complete.

    Holds the weights and AdamW state, ``rng-RANK.pt`` (each process's RNG states),
    state.json (step, data position, counters, resolved config) and, written last by rank
    0 once every process is done, manifest.json (every file's size and SHA-256, ``run_id``,
    the number of processes); keeps this run's newest ``keep``. The weights and AdamW
    state are model.safetensors and optimizer.pt (whole, written by rank 0), or under
    FSDP2 ``dcp/``: a ``torch.distributed.checkpoint`` of every rank's shards, which
    loads onto any number of processes.
    """
    sharded = is_sharded(model)
    if not sharded:
        model_sd, optim_sd = _full_state(model, optimizer)  # gathered on rank 0 (collective)
    final = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    if dist.is_main:
        rundir.ensure_owned_dir(final.parent, "checkpoints")
    # flushes every file first; last: complete from here
    complete = lambda tmp: manifest.write_manifest(tmp, run_id=run_id, step=step, world_size=dist.world, sharded=sharded)  # noqa: E731
    with shared_atomic_dir(final, dist, complete) as tmp:
        if sharded:
            import torch.distributed.checkpoint as dcp

            model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
        elif dist.is_main:
            save_file(unshared(model_sd), str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(rng_state(dist.device), tmp / f"rng-{dist.rank}.pt")
        if dist.is_main:
            (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
    if dist.is_main:
        # this run's checkpoints only: an earlier run's, or a damaged one set aside, is never pruned into
        for old in checkpoint_dirs(output_dir, run_id)[:-keep] if keep > 0 else []:
            rundir.safe_rmtree(old)
    return final  # every process already waited for the rename (shared_atomic_dir)


def unshared(state_dict: dict) -> dict:
    """Contiguous tensors with no storage shared: safetensors refuses tied weights (BERT's
    decoder is its word embedding), so the second name of a tied tensor gets a copy; loading
    writes the same values into the one parameter twice."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def has_optimizer_state(path: Path) -> bool:
    """``path`` holds AdamW state: optimizer.pt, or a sharded (``dcp/``) checkpoint."""
    return (Path(path) / "optimizer.pt").is_file() or (Path(path) / "dcp" / ".metadata").is_file()


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dist: Dist | None = None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; return its state.json.

    A whole-model checkpoint loads into one process, DDP or FSDP2 (each rank keeps its
    shard); a sharded one (``dcp/``) is resharded by ``torch.distributed.checkpoint`` for
    the processes there are now, so a run resumes on another number of processes. RNG
    states: see :func:`restore_rng`. A checkpoint without optimizer state cannot continue
    a run (AdamW would restart from zero moments): that, a tensor of another shape, or an
    unreadable file is one line.
    """
    path = Path(path)
    dist = dist or Dist()
    sharded = (path / "dcp").is_dir()
    if optimizer is not None and not has_optimizer_state(path):
        raise UserError(f"{path}: optimizer.pt is missing; continuing without it would reset AdamW")
    current = path / "state.json"
    try:
        state = json.loads(current.read_text())
        current = path / ("dcp" if sharded else "model.safetensors")
        if sharded:
            _load_sharded(current, model, optimizer)
        else:
            model_sd = load_file(str(current))
            _check_shapes(path, model, model_sd)
            opts = StateDictOptions(full_state_dict=True)
            if optimizer is not None:
                current = path / "optimizer.pt"
                optim_sd = torch.load(current, weights_only=True, map_location="cpu")
                set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
            else:
                set_model_state_dict(model, model_sd, options=opts)
        current = path
        restore_rng(path, state, dist)
        return state
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot resume from {current}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read a ``torch.distributed.checkpoint`` into this process's model (and optimizer),
    whatever the number of processes that wrote it: each reads the pieces of its shards
    (everything when the model is not sharded)."""
    import torch.distributed.checkpoint as dcp

    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=directory)
        set_model_state_dict(model, model_sd)
        return
    # get_state_dict initialises AdamW's moments (zeros) so that there are tensors to read into
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _check_shapes(path: Path, model: torch.nn.Module, state_dict: dict) -> None:
    """A checkpoint of another model (another size) is one line naming a tensor."""
    own = unwrap(model).state_dict()
    for name, tensor in state_dict.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f"{path} holds a model of another shape ({name}: {tuple(tensor.shape)} there, {tuple(own[name].shape)} here)")


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states: torch's CPU generator, the CUDA generator of ``device``
    (when it is a GPU), numpy's and Python's."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(s: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]), 0, 0.0))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in s and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def restore_rng(path: Path, state: dict, dist: Dist) -> None:
    """Each process continues its own RNG streams: rank R restores ``rng-R.pt`` when the
    checkpoint was written by as many processes as there are now (a checkpoint of an older
    neobert: its single ``rng.pt``, rank 0's, on every process, as it was written for).

    On another number of processes the saved streams do not map onto the new ranks, so
    every process draws fresh ones from (``train.seed``, step, rank) instead: still
    reproducible (the same resume gives the same streams) and distinct per rank. The
    training data and masks do not depend on them (they are functions of the seed and the
    step), so this changes only what draws from the global generators (dropout, if any).
    """
    path = Path(path)
    saved_world = (manifest.read_manifest(path) or {}).get("world_size")
    own = path / f"rng-{dist.rank}.pt"
    if saved_world == dist.world and own.is_file():
        set_rng_state(torch.load(own, weights_only=True), dist.device)
    elif saved_world is None and (path / "rng.pt").is_file():
        set_rng_state(torch.load(path / "rng.pt", weights_only=True), dist.device)
    else:
        seed = state.get("config", {}).get("train", {}).get("seed", 0)
        fresh = np.random.SeedSequence([int(seed) % 2**32, int(state["step"]), dist.rank]).generate_state(1)[0]
        seed_everything(int(fresh))
        if dist.device.type == "cuda":
            torch.cuda.manual_seed(int(fresh))


# ---------------------------------------------------------------------------------------
# Logging and export


def export_final(model: torch.nn.Module, tokenizer, path: Path, dist: Dist) -> None:
    """Save a Hugging Face directory (config, model.safetensors, tokenizer) atomically."""
    model_sd, _ = _full_state(model, None)
    if dist.is_main:
        plain = unwrap(model)
        # fully_shard turned the model's class into FSDP<class>: saved as it is, transformers
        # would copy torch's FSDP sources beside the model and point auto_map at them
        sharded_class = type(plain)
        from torch.distributed.fsdp import FSDPModule

        if isinstance(plain, FSDPModule):
            plain.__class__ = next(b for b in sharded_class.__bases__ if not issubclass(b, FSDPModule))
        # a model trained with the sparse masked-LM head is shared with full logits, what a
        # transformers user (Trainer metrics, pipelines) expects
        sparse = getattr(plain.config, "sparse_prediction", False)
        if sparse:
            plain.config.sparse_prediction = False
        try:
            with atomic_dir(path) as tmp:
                plain.save_pretrained(tmp, state_dict=model_sd)
                tokenizer.save_pretrained(tmp)
        finally:
            plain.__class__ = sharded_class
            if sparse:
                plain.config.sparse_prediction = True
    dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model



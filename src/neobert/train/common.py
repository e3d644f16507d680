"""Pieces the training commands share: processes, seeds, checkpoints and the final export.

- ``setup_distributed`` / ``Dist``: torchrun environment (DDP on gloo or NCCL); rank 0
  (``Dist.is_main``) logs and writes.
- Run directories: ``open_run`` claims ``train.output_dir`` for this run (ownership marker
  and lock: :mod:`neobert.rundir`) before any data is read.
- Checkpoints: ``save_checkpoint`` writes ``checkpoints/step-N`` through ``atomic_dir``,
  with a manifest of every file's size and checksum added last (:mod:`neobert.manifest`),
  so a ``step-N`` with a manifest is complete; ``resolve_resume`` picks the newest that
  verifies (setting damaged ones aside with a warning) and ``load_checkpoint`` restores
  it. Full (unsharded) state dicts, so DDP, FSDP2 and one process read each other's
  checkpoints.
- ``export_final``: the Hugging Face directory (model + tokenizer) that ends a run.

The optimizer and schedule are in :mod:`neobert.train.optim`, the loop, its logger and
its counters in :mod:`neobert.train.loop`, devices and bf16 in :mod:`neobert.device`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from neobert import manifest, rundir
from neobert.device import resolve_device
from neobert.errors import UserError
from neobert.files import atomic_dir

T = TypeVar("T")

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

    def main_first(self, make: Callable[[bool], T]) -> T:
        """``make(is_main)`` on rank 0, then, after a barrier, on the other processes: rank 0
        builds (or finds) a cache that the others then only read."""
        if self.is_main:
            result = make(True)
        self.barrier()
        if not self.is_main:
            result = make(False)
        return result


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # one GPU per process: this rank's
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
    verified. Rank 0 decides; the others follow its choice."""
    chosen = _choose_checkpoint(resume, run) if dist.is_main else None
    if dist.world == 1:
        return chosen
    step = int(dist.all_sum(_step_of(chosen) + 1 if chosen is not None else 0))  # rank 0's choice, on every rank
    if step == 0 or dist.is_main:
        return chosen
    return Path(resume) if resume not in ("auto", "none") else run.path / "checkpoints" / f"step-{step - 1:08d}"


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
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def save_checkpoint(
    output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int, dist: Dist,
    run_id: str | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temporary directory renamed when complete.

    Holds model.safetensors, optimizer.pt, rng.pt (this process's RNG states), state.json
    (step, data position, counters, resolved config) and, written last, manifest.json
    (every file's size and SHA-256, and ``run_id``); keeps this run's newest ``keep``.
    """
    model_sd, optim_sd = _full_state(model, optimizer)  # collective under FSDP: every rank calls it
    final = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    if dist.is_main:
        rundir.ensure_owned_dir(final.parent, "checkpoints")
        with atomic_dir(final) as tmp:
            save_file(unshared(model_sd), str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
            manifest.write_manifest(tmp, run_id=run_id, step=step)  # flushes every file first; last: complete from here
        # this run's checkpoints only: an earlier run's, or a damaged one set aside, is never pruned into
        for old in checkpoint_dirs(output_dir, run_id)[:-keep] if keep > 0 else []:
            rundir.safe_rmtree(old)
    dist.barrier()
    return final


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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; return its state.json.

    A checkpoint without optimizer state cannot continue a run (AdamW would restart from
    zero moments): that, a tensor of another shape, or an unreadable file is one line.
    """
    path = Path(path)
    if optimizer is not None and not (path / "optimizer.pt").is_file():
        raise UserError(f"{path}: optimizer.pt is missing; continuing without it would reset AdamW")
    current = path / "model.safetensors"
    try:
        model_sd = load_file(str(current))
        _check_shapes(path, model, model_sd)
        opts = StateDictOptions(full_state_dict=True)
        if optimizer is not None:
            current = path / "optimizer.pt"
            optim_sd = torch.load(current, weights_only=True, map_location="cpu")
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
        else:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, model_sd, options=opts)
        current = path / "rng.pt"
        if current.exists():
            set_rng_state(torch.load(current, weights_only=True))
        current = path / "state.json"
        return json.loads(current.read_text())
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot resume from {current}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _check_shapes(path: Path, model: torch.nn.Module, state_dict: dict) -> None:
    """A checkpoint of another model (another size) is one line naming a tensor."""
    own = unwrap(model).state_dict()
    for name, tensor in state_dict.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f"{path} holds a model of another shape ({name}: {tuple(tensor.shape)} there, {tuple(own[name].shape)} here)")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]), 0, 0.0))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------
# Logging and export


def export_final(model: torch.nn.Module, tokenizer, path: Path, dist: Dist) -> None:
    """Save a Hugging Face directory (config, model.safetensors, tokenizer) atomically."""
    model_sd, _ = _full_state(model, None)
    if dist.is_main:
        plain = unwrap(model)
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
            if sparse:
                plain.config.sparse_prediction = True
    dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model



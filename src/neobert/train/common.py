"""Pieces the training commands share: processes, seeds, checkpoints and the final export.

- ``setup_distributed`` / ``Dist``: torchrun environment (DDP on gloo or NCCL); rank 0
  (``Dist.is_main``) logs and writes.
- Checkpoints: ``save_checkpoint`` writes ``checkpoints/step-N`` through ``atomic_dir``, so
  a directory named ``step-N`` is always complete; ``latest_checkpoint`` / ``load_checkpoint``
  resume from it. Full (unsharded) state dicts, so DDP, FSDP2 and one process read each
  other's checkpoints.
- ``export_final``: the Hugging Face directory (model + tokenizer) that ends a run.

The optimizer and schedule are in :mod:`neobert.train.optim`, the loop, its logger and
its counters in :mod:`neobert.train.loop`, devices and bf16 in :mod:`neobert.device`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

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


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """``auto``: newest complete checkpoint in output_dir (or none); ``none``: start fresh; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "state.json").exists():
        raise UserError(f"train.resume={resume}: not a complete checkpoint directory (no state.json)")
    return path


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def save_checkpoint(
    output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int, dist: Dist
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temporary directory renamed when complete.

    Holds model.safetensors, optimizer.pt, rng.pt (this process's RNG states) and
    state.json (step, data position, counters, resolved config); keeps the newest ``keep``.
    """
    model_sd, optim_sd = _full_state(model, optimizer)  # collective under FSDP: every rank calls it
    final = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    if dist.is_main:
        with atomic_dir(final, sync=True) as tmp:
            save_file(unshared(model_sd), str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
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
    """Restore model (and optimizer, RNG) from ``path``; return its state.json."""
    model_sd = load_file(str(path / "model.safetensors"))
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is not None and (path / "optimizer.pt").exists():
        optim_sd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_sd, options=opts)
    if (path / "rng.pt").exists():
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


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
        with atomic_dir(path) as tmp:
            unwrap(model).save_pretrained(tmp, state_dict=model_sd)
            tokenizer.save_pretrained(tmp)
    dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model



"""Pieces every training command shares, as plain functions.

- ``setup_distributed`` / ``Dist``: torchrun environment (DDP on gloo or NCCL), rank 0 logs.
- ``build_optimizer`` and ``lr_at``: AdamW without decay on norms and biases;
  linear warmup, cosine decay to a floor over a fraction of the run, then constant.
- Run directories: ``open_run`` claims ``train.output_dir`` for this run (ownership marker
  and lock: :mod:`neobert.rundir`) before any data is read.
- Checkpoints: ``save_checkpoint`` writes into a temporary directory, adds a manifest of
  every file's size and checksum last (:mod:`neobert.manifest`) and renames it, so a
  directory named ``step-N`` with a manifest is complete; ``resolve_resume`` picks the
  newest that verifies (falling back past damaged ones with a warning) and
  ``load_checkpoint`` restores it. Full (unsharded) state dicts, so DDP, FSDP2 and one
  process read each other's checkpoints.
- ``MetricsLogger``: ``metrics.jsonl`` plus TensorBoard, rank 0 only.
- ``export_final``: the Hugging Face directory (model + tokenizer) that ends a run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from neobert import manifest, rundir
from neobert.errors import UserError

# ---------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere torch
    emulates bf16 matmuls, measured 40x slower than fp32 on an AVX2-only EPYC. Cached:
    ``autocast`` asks on every micro-batch."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(option: bool | None, device: torch.device | None = None) -> bool:
    """A ``train.bf16`` option resolved: None means on where bf16 is native (a CUDA device
    that supports it, a CPU with AVX512-BF16 or AMX), off elsewhere."""
    if option is not None:
        return option
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast(device: torch.device, bf16: bool | None):
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(bf16, device) else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW as in the released recipe: weight decay on matrices (linear and embedding), not on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # matrices decay; norm weights and biases (1-D) do not
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_at(step: int, peak: float, warmup: int, total: int, decay_fraction: float = 0.9, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup`` steps to ``peak``; cosine decay from ``peak`` to
    ``min_ratio * peak`` ending at ``decay_fraction * total``; constant afterwards.
    ``decay_fraction=0`` or ``min_ratio=1`` gives a constant rate after warmup.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    end = max(int(decay_fraction * total), warmup + 1)
    if step >= end:
        return peak * min_ratio
    progress = (step - warmup) / (end - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------
# Checkpoints


def open_run(output_dir: str, command: str, resume: str, overwrite: bool, d: Dist) -> rundir.RunDir:
    """Claim the run directory (rank 0 creates, marks and locks it; the others read its
    marker after a barrier): one line and no work when it is not this run's to write."""
    run = rundir.claim(output_dir, command, RUN_ENTRIES, resume=resume, overwrite=overwrite, main=d.main) if d.main else None
    d.barrier()
    return run if d.main else rundir.claim(output_dir, command, RUN_ENTRIES, resume=resume, main=False)


# The names a training run writes at the top of its directory (all neobert's in a marked run).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard", "curves.png")


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoint_dirs(output_dir: Path, run_id: str | None = None) -> list[Path]:
    """Checkpoints with a manifest (complete when written), oldest first; temporary and
    set-aside directories are ignored. ``run_id``: only those that run wrote."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and (p / manifest.MANIFEST).is_file()]
    if run_id is not None:
        found = [p for p in found if (manifest.read_manifest(p) or {}).get("run_id") == run_id]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, run: rundir.RunDir, d: Dist) -> Path | None:
    """The checkpoint to resume from: ``auto``, the newest of this run's that verifies
    (each damaged newer one is set aside as ``damaged-step-N`` with a one-line warning; none
    intact is an error, never a silent restart); ``none``, nothing; else that path, verified.
    Rank 0 decides; the others follow its choice."""
    chosen = _choose_checkpoint(resume, run) if d.main else None
    if d.world == 1:
        return chosen
    step = int(d.all_sum(_step_of(chosen) + 1 if chosen is not None else 0))  # rank 0's choice, on every rank
    if step == 0:
        return None
    return chosen if d.main else (Path(resume) if resume not in ("auto", "none") else run.path / "checkpoints" / f"step-{step - 1:08d}")


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
    root = run.path / "checkpoints"
    candidates = sorted((p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and p.is_dir()), key=_step_of) if root.is_dir() else []
    candidates = [p for p in candidates if (manifest.read_manifest(p) or {}).get("run_id", run.run_id) == run.run_id]
    chosen, damaged = manifest.newest_intact(candidates)
    if chosen is None and damaged:
        listed = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise UserError(f"no intact checkpoint in {root} ({listed}); set train.overwrite=true to start the run over")
    for path, problem in damaged:
        aside = path.with_name(f"damaged-{path.name}")
        if aside.exists():
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
    output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int, d: Dist,
    run_id: str | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temporary directory renamed when complete.

    Holds model.safetensors, optimizer.pt, rng.pt (this process's RNG states), state.json
    (step, data position, counters, resolved config) and, written last, manifest.json
    (every file's size and SHA-256, and ``run_id``); keeps this run's newest ``keep``. A
    failed write (a full disk) removes the temporary directory and raises one line.
    """
    model_sd, optim_sd = _full_state(model, optimizer)  # collective under FSDP: every rank calls it
    final = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    if d.main:
        rundir.ensure_owned_dir(final.parent, "checkpoints")
        tmp = rundir.make_temp_dir(final, "checkpoint")
        current = tmp
        try:
            current = tmp / "model.safetensors"
            save_file(unshared(model_sd), str(current))
            current = tmp / "optimizer.pt"
            torch.save(optim_sd, current)
            current = tmp / "rng.pt"
            torch.save(rng_state(), current)
            current = tmp / "state.json"
            current.write_text(json.dumps(dict(state, step=step), indent=1))
            current = tmp / manifest.MANIFEST
            manifest.write_manifest(tmp, run_id=run_id, step=step)  # last: the checkpoint is complete from here
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch says "unexpected pos ..."
            error = rundir.write_failure(final / current.relative_to(tmp), e)  # before the space is freed again
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        if final.exists():
            rundir.safe_rmtree(final)
        os.replace(tmp, final)
        # this run's checkpoints only: an older run's (or a set-aside damaged one) is never pruned into
        for old in checkpoint_dirs(output_dir, run_id)[:-keep] if keep > 0 else []:
            rundir.safe_rmtree(old)
    d.barrier()
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
    own = {k.replace("_orig_mod.", "").replace("module.", "", 1): v for k, v in unwrap(model).state_dict().items()}
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


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors numbers to TensorBoard.

    On resume, entries past the resumed step are dropped first so the file reads as if the
    run had never stopped.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # a torn last line (a write cut short) is dropped with a warning
            kept = [r for r in rundir.read_jsonl_records(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(rundir.ensure_owned_dir(Path(output_dir) / "tensorboard", "tensorboard")), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise rundir.write_failure(self.path, e) from None
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def export_final(model: torch.nn.Module, tokenizer, path: Path, d: Dist) -> None:
    """Save a Hugging Face directory (config, model.safetensors, tokenizer) atomically."""
    model_sd, _ = _full_state(model, None)
    if d.main:
        path = Path(path)
        tmp = rundir.make_temp_dir(path, "final")
        try:
            unwrap(model).save_pretrained(tmp, state_dict=model_sd)
            tokenizer.save_pretrained(tmp)
        except (OSError, RuntimeError, SafetensorError) as e:
            error = rundir.write_failure(path, e)
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        if path.exists():
            rundir.safe_rmtree(path)
        os.replace(tmp, path)
    d.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r


GPU_PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU); None where unknown (CPU: see neobert bench)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)

"""Where a command runs and in which precision: the device resolver and the bf16 policy.

``resolve_device("auto")`` is CUDA when available, else the CPU; every command that takes a
device (training, evaluation, embeddings, bench) resolves it here. ``use_bf16(None)`` turns
bf16 autocast on only where bf16 is native: a CUDA device that supports it, or a CPU with
AVX512-BF16 or AMX. Elsewhere torch emulates bf16 matmuls, measured 40x slower than fp32 on
an AVX2-only EPYC.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path

import torch

from neobert.errors import UserError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): ``cuda`` when available, else ``cpu``; any other name as given."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: no CUDA device is available")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Cached: ``autocast``
    asks on every micro-batch."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(option: bool | None, device: torch.device | None = None) -> bool:
    """A ``bf16`` option resolved: None means on where bf16 is native (a CUDA device that
    supports it, a CPU with AVX512-BF16 or AMX), off elsewhere."""
    if option is not None:
        return option
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast(device: torch.device, bf16: bool | None):
    """bf16 autocast on ``device`` when :func:`use_bf16` says so, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(bf16, device) else nullcontext()

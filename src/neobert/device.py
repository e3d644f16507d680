"""Where a command runs and in which precision: the device resolver and the bf16 policy.

``resolve_device("auto")`` is CUDA when available, else the CPU; every command that takes a
device (training, evaluation, embeddings, bench) resolves it here. ``use_bf16(None)`` turns
bf16 autocast on only where bf16 is native: a CUDA device that supports it, or a CPU with
AVX512-BF16 or AMX. Elsewhere torch emulates bf16 matmuls, measured 40x slower than fp32 on
an AVX2-only EPYC. ``attention_implementation`` picks flash-attn's kernels where they run
(``neobert pretrain`` and ``neobert bench``). ``PeakMemory`` measures the peak memory a block of code adds on either
(``neobert bench``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from collections.abc import Callable
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


def flash_attn_available() -> bool:
    """Whether ``flash_attn`` 2 is installed and usable (transformers' own check: the package,
    its version and a CUDA device), which ``attn_implementation="flash_attention_2"`` needs."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def attention_implementation(device: torch.device, bf16: bool) -> str:
    """``flash_attention_2`` on CUDA when flash_attn is installed and the activations are bf16
    (its kernels take fp16/bf16 only), else ``sdpa``: NeoBERT's own padding-free path, which on
    CUDA without flash_attn runs PyTorch's variable-length attention."""
    if device.type == "cuda" and bf16 and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _cpu_bytes_in_use() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out (glibc's mallinfo2: heap in use + mmapped), which
    torch's CPU tensors come from; unlike the resident set it drops as soon as memory is freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Peak memory a block of code adds, in MiB: the CUDA allocator's peak, or on CPU the
    C allocator's bytes in use sampled every millisecond (NaN where glibc is absent)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, math.nan
        self._in_use = _cpu_bytes_in_use() if device.type == "cpu" else None

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._in_use())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._in_use is not None:
            self._base = self._peak = self._in_use()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._in_use is not None:
            self._stop.set()
            self._thread.join()
            self.mb = (max(self._peak, self._in_use()) - self._base) / 2**20

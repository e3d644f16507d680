"""Checks for numeric and device config values, called from the ``__post_init__`` of the
config dataclasses so a bad value is a one-line error before any work starts.

Each check names the key (``section.field``) and the value, and says what is allowed.
"""

from __future__ import annotations

import math

from neobert.errors import UserError


def positive(key: str, value: float | int | None, allow_none: bool = False) -> None:
    """``value`` > 0 (and finite)."""
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value} must be a positive number")


def non_negative(key: str, value: float | int | None, allow_none: bool = False) -> None:
    """``value`` >= 0 (and finite)."""
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < 0:
        raise UserError(f"{key}={value} must be zero or a positive number")


def in_range(key: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """``low <= value <= high`` (a bound excluded when its ``*_open``)."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise UserError(f"{key}={value} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def device(key: str, name: str) -> None:
    """``auto``, ``cpu``, or a CUDA device that this machine has."""
    if name in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name}: no CUDA device is available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        if dev.type == "mps" and torch.backends.mps.is_available():
            return
        raise UserError(f"{key}={name!r}: device type {dev.type} is not available here (use auto, cpu or cuda)")

"""The training-loop skeleton that ``pretrain`` (and so ``extend``) and ``contrastive`` share.

A command brings its model, optimizer and one function, ``train_step(step)``, that runs
the forward and backward passes of one optimizer step (all its micro-batches) and returns
a :class:`StepResult`. The skeleton does the rest, the same way for every command:

- :func:`claim`: make ``train.output_dir`` this run's (ownership marker, lock, leftovers of
  dead writers removed; :mod:`neobert.rundir`), first thing, before any data is read;
- :func:`start`: resume from ``train.resume`` (the newest checkpoint that verifies, of this
  run, with the same model) or start fresh, write ``config.yaml``, open the metrics log;
- :func:`run_loop`: per step, set the scheduled learning rate, run ``train_step``, clip,
  step and zero the gradients, then log / evaluate / checkpoint on the cadence of
  ``LoopArgs.should_log/should_eval/should_save`` (the last step always does all three).
  SIGTERM or SIGUSR1 (a Slurm preemption, a ``scancel --signal``) stops the run at the
  next step boundary: every process stops at the same step (they agree by an all-reduce,
  whichever of them got the signal, and whenever), the step is checkpointed, one line
  says so and the process exits with status 0; the same command resumes it exactly;
- :func:`finish`: close the log, say where the model is, leave the process group.

Also here: ``MetricsLogger`` (``metrics.jsonl`` plus TensorBoard, rank 0 only),
``Throughput`` (tokens/s between log lines) and ``read_metrics``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neobert import rundir
from neobert.config import save_config
from neobert.errors import UserError
from neobert.train.args import LoopArgs
from neobert.train.common import Dist, load_checkpoint, open_run, resolve_resume, teardown_distributed


@dataclass
class StepResult:
    """What one optimizer step reports: its loss and tokens over every process, the run's
    counters after it (e.g. ``tokens`` or ``pairs``, logged and checkpointed) and any more
    fields for its metrics line."""

    loss: float
    tokens: int
    counters: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


def claim(args: LoopArgs, dist: Dist, command: str) -> rundir.RunDir:
    """Claim ``args.output_dir`` for this run, or refuse in one line; see :func:`neobert.rundir.claim`."""
    return open_run(args.output_dir, command, args.resume, args.overwrite, dist)


def start(cfg: Any, args: LoopArgs, dist: Dist, model: torch.nn.Module, optimizer, counters: dict[str, int], run: rundir.RunDir):
    """Resume (``args.resume``) or start with ``counters``; write config.yaml; open the metrics log.

    ``run`` is what :func:`claim` returned. Returns ``(state, resumed_from, logger)``:
    ``state`` holds ``step`` and the counters (and, when resumed, the rest of the
    checkpoint's state.json).
    """
    out = run.path
    resumed_from = resolve_resume(args.resume, run, dist)
    state = {"step": 0, **counters}
    if resumed_from is not None:
        check_same_model(resumed_from, cfg)
        state = load_checkpoint(resumed_from, model, optimizer, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out, dist.is_main, resume_step=state["step"] if resumed_from else None)
    return state, resumed_from, logger


def check_same_model(checkpoint: Path, cfg: Any) -> None:
    """Resuming needs the model the checkpoint holds: name every ``model.*`` key that differs
    (where it starts from, ``init_from``, aside)."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("config", {}).get("model", {})
    except (OSError, ValueError):
        return  # load_checkpoint names the unreadable file
    now = dataclasses.asdict(cfg.model)
    keys = [k for k in now if k not in ("init_from", "init_optimizer") and k in saved and saved[k] != now[k]]
    if keys:
        changes = ", ".join(f"model.{k}={saved[k]} there, {now[k]} now" for k in keys)
        raise UserError(f"{checkpoint} holds another model ({changes}): resume with its config, or use another train.output_dir (or train.overwrite=true)")


def run_loop(
    args: LoopArgs,
    dist: Dist,
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    first_step: int,
    train_step: Callable[[int], StepResult],
    evaluate: Callable[[int], tuple[dict, str] | None],
    save: Callable[[int, StepResult], None],
    logger: MetricsLogger,
    desc: str,
    flops_per_token: float | None = None,
) -> int:
    """Steps ``first_step`` .. ``args.max_steps - 1``; see the module docstring.

    ``evaluate(step)`` returns ``(metrics, message)`` or None (nothing to evaluate);
    ``save(step, result)`` writes the checkpoint; ``flops_per_token`` (training FLOPs per
    token) adds ``tflops`` and, on known GPUs, ``mfu`` to the metrics lines. Returns the
    step reached; raises ``SystemExit(0)`` after a stop signal (once checkpointed).
    """
    with StopSignals() as stop:
        return _steps(args, dist, optimizer, list(params), first_step, train_step, evaluate, save, logger, desc, flops_per_token, stop)


def _steps(args, dist, optimizer, params, first_step, train_step, evaluate, save, logger, desc, flops_per_token, stop) -> int:
    peak = peak_flops(dist.device)
    bar = tqdm(total=args.max_steps, initial=first_step, disable=not dist.is_main, desc=desc, dynamic_ncols=True)
    speed = Throughput()
    for step in range(first_step + 1, args.max_steps + 1):  # numbered by the steps done after it
        lr = args.lr_at(step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = train_step(step - 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_norm())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speed.add(result.tokens)
        bar.update(1)
        if args.should_log(step):
            tps = speed.rate()
            record = {"step": step, "loss": result.loss, "lr": lr, **result.counters, "tokens_per_s": tps, "grad_norm": float(grad_norm)}
            if flops_per_token:
                record["tflops"] = tps * flops_per_token / 1e12
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * dist.world)
            logger.log(record | result.extra)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if args.should_eval(step):
            evaluation = evaluate(step)
            if evaluation is not None:
                metrics, message = evaluation
                logger.log({"step": step, **metrics})
                if dist.is_main:
                    bar.write(f"step {step}: {message}")
        if args.should_save(step):
            save(step, result)
        signalled = stop.agreed(dist) if not args.is_last(step) else 0
        if signalled:
            if not args.should_save(step):
                save(step, result)
            bar.close()
            logger.close()
            if dist.is_main:
                print(f"stopped by {stop.name or 'a signal to another process'} ({signalled} of {dist.world} processes signalled): "
                      f"checkpoint of step {step} written; run the same command to resume", flush=True)
            teardown_distributed()
            raise SystemExit(0)
    bar.close()
    return max(first_step, args.max_steps)


class StopSignals:
    """SIGTERM and SIGUSR1 handlers that only record the signal, for :func:`run_loop` to stop
    at a step boundary; the previous handlers come back on exit. Handlers can only be set
    from the main thread: elsewhere (a run started from a worker thread) signals keep their
    previous handling."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    def agreed(self, dist: Dist) -> int:
        """How many processes have been signalled (the same answer on every process): one
        that got the signal a step later than another still stops at the same step."""
        return int(dist.all_sum(1.0 if self.received else 0.0))


def finish(logger: MetricsLogger, dist: Dist, message: str) -> None:
    """Close the metrics log, print ``message`` on rank 0 and leave the process group."""
    logger.close()
    if dist.is_main:
        print(message)
    teardown_distributed()


# ---------------------------------------------------------------------------------------
# Metrics

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
        elif self.path.exists():  # a torn last line (an append cut short) is dropped with a warning
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
                f.write(json.dumps(json_safe(record)) + "\n")
        except OSError as e:
            raise rundir.write_failure(self.path, e) from None
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with non-finite floats as None: json.dumps would write NaN / Infinity, which
    is not JSON (a diverged loss must not make metrics.jsonl unreadable for other tools)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


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


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line is dropped with a warning)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    return rundir.read_jsonl_records(path)

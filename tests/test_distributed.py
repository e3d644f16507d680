"""Distributed training that survives (issue 11, item 3): preemption signals, per-rank RNG,
FSDP2 accumulation and sharded checkpoints that resume on another number of processes,
the process-group timeout.

End-to-end checks run ``neobert pretrain`` on configs/debug.yaml (a 2 x 64 model) in
subprocesses, under ``torchrun`` with 2 CPU processes (gloo) where they need several;
the FSDP2 internals run in 2 processes started with ``torch.multiprocessing``.

The runs here turn gradient clipping off (``train.grad_clip=0``): FSDP2 computes the
clipping norm from each rank's shard, summed in another order than one process does, so
the clipping factor, and after Adam a few rarely-seen embedding rows, differ in the last
bits (about 1e-3 after 10 steps). Without clipping one process, DDP and FSDP2 give
bitwise the same weights, which is what these tests require of an interrupted run.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
STEPS = ("train.max_steps=10", "train.save_every=100", "train.eval_every=0", "train.grad_clip=0")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pretrain_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-m", "neobert", "pretrain", str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache}", *STEPS, *extra]


def one_process(args: list[str]) -> list[str]:
    return [sys.executable, *args]


def two_processes(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def workers_of(pid: int) -> dict[int, int]:
    """The processes torchrun ``pid`` started, by their RANK."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(stat.parent.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def interrupt(cmd: list[str], out: Path, signum: int, ranks: tuple[int, ...] | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``cmd``; once step 2 is logged, send ``signum`` to the run (``ranks``: only
    those torchrun workers). Returns the finished process (stdout) and the step it stopped at."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    try:
        while not (out / "metrics.jsonl").exists() or len(train_steps(out)) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended before step 2"
            time.sleep(0.02)
        targets = [proc.pid] if ranks is None else [workers_of(proc.pid)[r] for r in ranks]
        for pid in targets:
            os.kill(pid, signum)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return done, train_steps(out)[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    """10 uninterrupted steps in one process."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    run_ok(one_process(pretrain_args(out, cache_dir)))
    return out


def assert_stopped_cleanly(out: Path, stdout: str, step: int, world: int) -> None:
    """One line on stdout, a complete checkpoint of exactly the stop step, no final/."""
    from neobert import manifest
    from neobert.train import common

    lines = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and f"checkpoint of step {step} written" in lines[0], stdout
    assert step < 10 and not (out / "final").exists()
    ckpt = common.latest_checkpoint(out)
    assert ckpt.name == f"step-{step:08d}" and manifest.verify(ckpt) is None
    listed = manifest.read_manifest(ckpt)["files"]
    assert {f"rng-{r}.pt" for r in range(world)} <= listed.keys()


def test_sigterm_one_process_checkpoints_exits_0_and_resumes_bitwise(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    cmd = one_process(pretrain_args(out, cache_dir))
    stopped, step = interrupt(cmd, out, signal.SIGTERM)
    assert_stopped_cleanly(out, stopped.stdout, step, world=1)
    assert "resumed from" in run_ok(cmd).stdout
    assert (out / "final" / "model.safetensors").read_bytes() == (reference / "final" / "model.safetensors").read_bytes()
    assert train_steps(out) == list(range(1, 11))


def test_signal_to_one_rank_stops_both_at_the_same_step_ddp(reference, tmp_path, cache_dir):
    """SIGUSR1 to rank 1 only: both ranks agree (an all-reduce of the flag), checkpoint the
    same step and exit 0; the same command resumes to the one-process weights, bitwise."""
    out = tmp_path / "run"
    cmd = two_processes(pretrain_args(out, cache_dir))
    stopped, step = interrupt(cmd, out, signal.SIGUSR1, ranks=(1,))
    assert_stopped_cleanly(out, stopped.stdout, step, world=2)
    assert "1 of 2 processes signalled" in stopped.stdout
    assert "resumed from" in run_ok(cmd).stdout
    assert (out / "final" / "model.safetensors").read_bytes() == (reference / "final" / "model.safetensors").read_bytes()


def test_fsdp2_sharded_checkpoint_resumes_on_one_process(reference, tmp_path, cache_dir):
    """FSDP2 on 2 processes, SIGTERM to both: each rank writes its shards (dcp/, no whole
    model.safetensors); one process resumes from them and ends with the weights of the
    uninterrupted run (within 1e-6; here they are bitwise equal)."""
    out = tmp_path / "run"
    stopped, step = interrupt(two_processes(pretrain_args(out, cache_dir, "train.fsdp=true")), out, signal.SIGTERM, ranks=(0, 1))
    assert_stopped_cleanly(out, stopped.stdout, step, world=2)
    from neobert.train import common

    ckpt = common.latest_checkpoint(out)
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert "resumed from" in run_ok(one_process(pretrain_args(out, cache_dir, "train.fsdp=true"))).stdout
    ref, got = weights(reference), weights(out)
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6


# --------------------------------------------------------------------------------------
# FSDP2 internals and per-rank RNG, in 2 processes (torch.multiprocessing, gloo)


def _tiny_model():
    from neobert import NeoBERTConfig, NeoBERTForMaskedLM

    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=16)
    return NeoBERTForMaskedLM(config)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 100, (2, 16), generator=g)
        labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]  # at least one masked token per micro-batch
        out.append({"input_ids": ids, "labels": labels})
    return out


def _fsdp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import random

    import numpy as np

    from neobert.train import common, pretrain
    from neobert.train.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = common.setup_distributed("cpu", timeout_minutes=2)
    args = pretrain.TrainArgs(fsdp=True, bf16=False)
    model = pretrain.wrap_model(_tiny_model(), args, dist)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    batches = _batches(4)[rank * 2 : rank * 2 + 2]  # 2 micro-batches per rank
    results = {}

    # accumulation: the first micro-batch's gradient stays local (no reduce-scatter: no sharded .grad yet)
    with pretrain.no_sync(model, True):
        model(**batches[0]).loss.backward()
    results["grads_after_skipped_sync"] = sum(p.grad is not None for p in model.parameters())
    with pretrain.no_sync(model, False):
        model(**batches[1]).loss.backward()
    full = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in ((n, p.grad) for n, p in model.named_parameters())}
    results["grads"] = {n: g * world for n, g in full.items()}  # FSDP averages over ranks: the sum of the 4 micro-batches' gradients / 2
    optimizer.step()
    optimizer.zero_grad()

    # per-rank RNG: distinct streams, each saved and restored by its own rank
    common.seed_everything(100 + rank)
    common.save_checkpoint(Path(tmp), 1, model, optimizer, {"config": {"train": {"seed": 7}}}, keep=2, dist=dist, run_id="t")
    results["draws"] = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    results["full"], results["optim"] = common._full_state(model, optimizer)
    torch.rand(10), np.random.rand(10), random.random()  # move on, then come back
    common.load_checkpoint(Path(tmp) / "checkpoints" / "step-00000001", model, optimizer, dist)
    results["draws_restored"] = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    class NoTokenizer:
        def save_pretrained(self, directory):
            pass

    common.export_final(model, NoTokenizer(), Path(tmp) / "final", dist)

    # bf16: the MixedPrecisionPolicy computes in bf16 (logits), the loss is fp32, master weights and gradients fp32
    from neobert.device import autocast

    bf16 = pretrain.wrap_model(_tiny_model(), pretrain.TrainArgs(fsdp=True, bf16=True), dist)
    with autocast(dist.device, True):
        out = bf16(**batches[0])
    out.loss.backward()
    results["bf16"] = (out.logits.dtype, out.loss.dtype, float(out.loss), {p.dtype for p in bf16.parameters()}, {p.grad.dtype for p in bf16.parameters()})
    results["fp32_loss"] = float(_tiny_model()(**batches[0]).loss)
    if rank == 0:
        torch.save(results, Path(tmp) / "results.pt")
    common.teardown_distributed()


def test_fsdp2_accumulation_sharded_checkpoint_and_per_rank_rng(tmp_path):
    """Under FSDP2 ``no_sync`` keeps the first micro-batch's gradients local
    (set_requires_gradient_sync(False)), and the last one reduces the sum: the gradients of
    one process on all 4 micro-batches. The checkpoint is sharded (DCP) with one RNG file
    per rank; each rank gets its own RNG streams back; one process reads the shards into
    the whole model, with RNG streams drawn from (seed, step, rank) as documented. With
    bf16, the MixedPrecisionPolicy gives bf16 logits, an fp32 loss and fp32 master weights."""
    import socket

    import numpy as np

    from neobert import manifest
    from neobert.train import common

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    results = torch.load(tmp_path / "results.pt", weights_only=False)

    logits, loss, value, params, grads = results["bf16"]
    assert logits == torch.bfloat16 and loss == torch.float32 and params == grads == {torch.float32}
    assert value != results["fp32_loss"] and value == pytest.approx(results["fp32_loss"], rel=1e-2)
    assert results["grads_after_skipped_sync"] == 0
    model = _tiny_model()
    for batch in _batches(4):
        model(**batch).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(results["grads"][name], p.grad, rtol=1e-5, atol=1e-7)

    # final/ of a sharded model is the plain transformers directory, not one of FSDP's classes
    final = tmp_path / "final"
    assert sorted(p.name for p in final.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors", "modeling_neobert.py"]
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"] == "modeling_neobert.NeoBERTForMaskedLM"
    from safetensors.torch import load_file

    exported = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in results["full"].items() if k in exported)

    ckpt = tmp_path / "checkpoints" / "step-00000001"
    listed = manifest.read_manifest(ckpt)["files"]
    assert {"rng-0.pt", "rng-1.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= listed.keys()
    assert manifest.read_manifest(ckpt)["world_size"] == 2 and manifest.verify(ckpt) is None
    saved = results["draws"]
    for a, b in zip(saved, results["draws_restored"]):  # rank 0's streams came back
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rank1 = torch.load(ckpt / "rng-1.pt", weights_only=True)  # rank 1's own state, not rank 0's
    assert not torch.equal(rank1["torch"], torch.load(ckpt / "rng-0.pt", weights_only=True)["torch"])
    torch.manual_seed(101)
    assert torch.equal(common.rng_state()["torch"], rank1["torch"])

    # one process: the whole model from the two shards; fresh RNG streams from (seed 7, step 1, rank 0)
    from neobert.train.optim import build_optimizer

    single = _tiny_model()
    optimizer = build_optimizer(single, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    common.load_checkpoint(ckpt, single, optimizer)
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, results["full"][name]), name
    _, optim = common._full_state(single, optimizer)  # AdamW's moments too
    for name, moments in results["optim"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optim["state"][name][key], moments[key]), name
    first = torch.rand(3)
    common.load_checkpoint(ckpt, single, optimizer)
    assert torch.equal(torch.rand(3), first) and not torch.equal(first, saved[0])


def _resume_worker(rank: int, world: int, port: int, tmp: str) -> None:
    from neobert import manifest, rundir
    from neobert.errors import UserError
    from neobert.train import common

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist = common.setup_distributed("cpu", timeout_minutes=2)
    outcomes = []
    for case in ("shared", "node-local", "explicit-missing"):
        # "node-local": each rank has its own run directory; only rank 0's holds the checkpoint
        own = Path(tmp) / case / (f"node{rank}" if case == "node-local" else "run")
        if rank == 0 or case != "node-local":
            ckpt = own / "checkpoints" / "step-00000003"
            if rank == 0:
                ckpt.mkdir(parents=True)
                (ckpt / "state.json").write_text("{}")
                manifest.write_manifest(ckpt, run_id="r", step=3)
        dist.barrier()
        run = rundir.RunDir(path=own, run_id="r", command="pretrain", resumable=True)
        try:
            chosen = common.resolve_resume("/no/such/checkpoint" if case == "explicit-missing" else "auto", run, dist)
            outcomes.append(("ok", str(chosen.relative_to(own))))
        except UserError as e:
            outcomes.append(("error", str(e)))
    torch.save(outcomes, Path(tmp) / f"resume-{rank}.pt")
    common.teardown_distributed()


def test_rank_0_chooses_the_checkpoint_and_every_rank_agrees_or_fails_together(tmp_path):
    """Rank 0's choice reaches every rank, as a checkpoint name each finds under its own
    train.output_dir; a rank that cannot see it, or rank 0's refusal of train.resume, stops
    every rank with the same one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_resume_worker, args=(2, port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"resume-{r}.pt", weights_only=False) for r in range(2))
    assert rank0[0] == rank1[0] == ("ok", "checkpoints/step-00000003")
    assert rank0[1] == rank1[1] and rank0[1][0] == "error" and "1 of 2 processes cannot read" in rank0[1][1]
    assert rank0[2] == rank1[2] and rank0[2][0] == "error" and "no such checkpoint directory" in rank0[2][1]


# --------------------------------------------------------------------------------------
# Process-group timeout


def test_dist_timeout_minutes_reaches_init_process_group(monkeypatch, tmp_path, capsys):
    """train.dist_timeout_minutes is the process group's timeout; a bad value is one line."""
    from neobert import cli
    from neobert.train import common

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, timeout=None, **kw):
        seen.update(backend=backend, timeout=timeout)
        raise Stop

    monkeypatch.setattr(common.torch_dist, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Stop):
        cli.main(["pretrain", str(DEBUG), f"train.output_dir={tmp_path / 'x'}", "train.dist_timeout_minutes=90", "train.device=cpu"])
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    assert cli.main(["pretrain", str(DEBUG), f"train.output_dir={tmp_path / 'x'}", "train.dist_timeout_minutes=0"]) == 2
    assert "train.dist_timeout_minutes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The loop's stop signals, in this process


def _loop(signal_at: int | None, signum: int = signal.SIGTERM):
    """run_loop over 6 steps of a one-parameter model; ``train_step`` signals this process
    during step ``signal_at`` (0-based). Returns (saved steps, steps run, SystemExit or None)."""
    from neobert.train import loop
    from neobert.train.args import LoopArgs
    from neobert.train.common import Dist

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    args = LoopArgs(max_steps=6, save_every=4, log_every=1, eval_every=0, warmup_steps=0)
    ran, saved = [], []

    def train_step(step):
        ran.append(step)
        param.sum().backward()
        if step == signal_at:
            os.kill(os.getpid(), signum)
        return loop.StepResult(1.0, 1, {})

    logger = loop.MetricsLogger(Path("."), enabled=False)
    try:
        loop.run_loop(args, Dist(), optimizer, [param], 0, train_step, lambda s: None, lambda s, r: saved.append(s), logger, "t")
    except SystemExit as e:
        return saved, ran, e
    return saved, ran, None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_the_step_and_exits_0_restoring_handlers(signum, capsys):
    before = signal.getsignal(signum)
    saved, ran, stop = _loop(signal_at=1, signum=signum)  # during the 2nd step: it finishes, is saved, nothing more runs
    assert stop is not None and stop.code == 0
    assert ran == [0, 1] and saved == [2]
    assert f"stopped by {signal.Signals(signum).name} (1 of 1 processes signalled): checkpoint of step 2 written" in capsys.readouterr().out
    assert signal.getsignal(signum) is before
    saved, ran, stop = _loop(signal_at=3)  # step 4 is a checkpoint step anyway: written once
    assert stop.code == 0 and saved == [4] and ran == [0, 1, 2, 3]
    saved, ran, stop = _loop(signal_at=None)  # no signal: the schedule's checkpoints, and the handlers back
    assert stop is None and saved == [4, 6] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

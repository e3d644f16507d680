"""Simulated multi-node training on one machine: two torchrun launchers as two "nodes".

Runs on a CPU in a few minutes (configs/debug.yaml, a 2 x 64 model; gloo; fp32), from a
prepared corpus, each launcher with its own node-local ``data.cache_dir``:

1. ``neobert prepare`` the built-in corpus (300 documents) into WORK/corpus.
2. One process, 10 steps: the reference (global batch 16 rows of 64 tokens).
3. DDP, 2 launchers x 2 processes (c10d rendezvous on localhost), 10 steps with the same
   global batch (4 rows per process, 2 micro-batches of 2): its losses against (2).
4. The same, with one launcher SIGKILLed (its whole process group: a node lost) after the
   checkpoint of step 5; both launchers restarted with the same command
   (``train.resume=auto``): its final weights against (3), bitwise.
5. FSDP2 (``train.fsdp=true``), 2 launchers x 2 processes: losses against (2); then a run
   with one launcher SIGKILLed after step 5, resumed by ONE launcher of 2 processes (another
   number of processes, from the sharded DCP checkpoint): its final weights against the
   uninterrupted FSDP2 run. The resharded checkpoint loads exactly (tests/test_distributed.py),
   but 2 processes sum a step's 8 micro-batch gradients in another grouping than 4 do,
   so the weights after 5 more steps differ in low bits, as 4 processes and 1 do (reported).
6. FSDP2, 2 launchers x 1 process, one micro-batch each, one launcher SIGKILLed after
   step 5, resumed by one process (2 -> 1, from the sharded checkpoint): the gradient sums
   group the same way, so the final weights must equal the uninterrupted run within 1e-6.

Gradient clipping is off in the FSDP2 part (``train.grad_clip=0``, the references too):
FSDP2 sums the clipping norm over shards in another order than one process does, which
moves the clipping factor in its last bits and, through Adam, a few rarely-seen embedding
rows by about 1e-3 after 10 steps; the script reports that figure as well.

    PYTHONPATH=src python scripts/multinode_check.py --work /tmp/multinode
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
PY = sys.executable
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")


def train_args(work: Path, out: str, cache: str, *extra: str) -> list[str]:
    return [
        "-m", "neobert", "pretrain", str(DEBUG), f"data.source={work / 'corpus'}", "data.max_documents=null", f"train.output_dir={work / out}",
        f"data.cache_dir={work / cache}", f"train.max_steps={STEPS}", "train.batch_tokens=1024", "train.micro_batch_size=2",
        "train.save_every=5", "train.eval_every=0", "train.bf16=false", "train.log_every=1", *extra,
    ]


def launcher(port: int, nnodes: int, rdzv_id: str, nproc: int = 2) -> list[str]:
    return [PY, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id={rdzv_id}"]


def start_nodes(work: Path, out: str, port: int, *extra: str, nodes: int = 2, nproc: int = 2) -> list[subprocess.Popen]:
    """``nodes`` torchrun launchers of ``nproc`` processes, each logging to WORK/OUT-nodeN.log."""
    procs = []
    for n in range(nodes):
        cmd = launcher(port, nodes, out, nproc) + train_args(work, out, f"cache-node{n}", *extra)
        log = open(work / f"{out}-node{n}.log", "a")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], what: str, timeout: float = 900) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(1, deadline - time.time())))
    return codes


def run_nodes(work: Path, out: str, *extra: str, nodes: int = 2, port: int | None = None, nproc: int = 2) -> float:
    t = time.time()
    codes = wait_all(start_nodes(work, out, port or free_port(), *extra, nodes=nodes, nproc=nproc), out)
    if any(codes):
        sys.exit(f"{out}: launchers exited with {codes}; see {work}/{out}-node*.log")
    return time.time() - t


def run_single(work: Path, out: str, *extra: str) -> float:
    t = time.time()
    with open(work / f"{out}.log", "w") as log:
        code = subprocess.call([PY, *train_args(work, out, "cache-single", *extra)], stdout=log, stderr=subprocess.STDOUT, env=env())
    if code:
        sys.exit(f"{out}: exit {code}; see {work}/{out}.log")
    return time.time() - t


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def last_step(run: Path) -> int:
    try:
        steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    except (OSError, ValueError):
        return 0
    return steps[-1] if steps else 0


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def kill_one_node_after_step_5(work: Path, out: str, *extra: str, nproc: int = 2) -> tuple[int, float, int]:
    """Start 2 launchers; once step 6 is logged (after the checkpoint of step 5), SIGKILL
    node 1's launcher and its workers at once (a node lost); wait for node 0 to fail. Returns (step reached,
    seconds, the rendezvous port, for the restart with the same command)."""
    t = time.time()
    port = free_port()
    procs = start_nodes(work, out, port, *extra, nproc=nproc)
    deadline = time.time() + 900
    while last_step(work / out) < 6:
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            sys.exit(f"{out}: a launcher ended before step 6; see {work}/{out}-node*.log")
        time.sleep(0.02)
    for pid in [procs[1].pid, *descendants(procs[1].pid)]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    reached = last_step(work / out)
    procs[1].wait()
    try:
        code = procs[0].wait(timeout=300)  # its workers' next collective fails
    except subprocess.TimeoutExpired:
        for pid in [procs[0].pid, *descendants(procs[0].pid)]:
            os.kill(pid, signal.SIGKILL)
        code = procs[0].wait()
    if (work / out / "final").exists():
        sys.exit(f"{out}: the run finished before the kill")
    print(f"  {out}: node 1 SIGKILLed at step {reached}; node 0's launcher exited with {code}", flush=True)
    return reached, round(time.time() - t, 1), port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/neobert-multinode", help="scratch directory (emptied first)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict = {}

    t = time.time()
    subprocess.check_call([PY, "-m", "neobert", "prepare", "data.source=builtin", "data.max_documents=300", "data.max_length=64",
                           f"prepare.output={work / 'corpus'}", "prepare.tasks=2", "prepare.progress=false", f"data.cache_dir={work / 'cache-prepare'}"], env=env())
    report["prepare_s"] = round(time.time() - t, 1)

    print("DDP", flush=True)
    report["single_s"] = round(run_single(work, "single"), 1)
    report["ddp_2x2_s"] = round(run_nodes(work, "ddp"), 1)
    l1, l4 = losses(work / "single"), losses(work / "ddp")
    assert len(l1) == len(l4) == STEPS
    report["ddp_max_loss_diff_vs_single"] = max(abs(a - b) for a, b in zip(l1, l4))
    report["ddp_killed_at_step"], report["ddp_killed_s"], port = kill_one_node_after_step_5(work, "ddp-killed")
    report["ddp_restart_s"] = round(run_nodes(work, "ddp-killed", port=port), 1)  # the same commands, both nodes
    report["ddp_resumed_bitwise_equal"] = (work / "ddp" / "final" / "model.safetensors").read_bytes() == (
        work / "ddp-killed" / "final" / "model.safetensors").read_bytes()
    report["ddp_resumed_max_weight_diff"] = max_diff(work / "ddp", work / "ddp-killed")
    report["ddp_vs_single_max_weight_diff"] = max_diff(work / "ddp", work / "single")

    print("FSDP2", flush=True)
    fsdp = ("train.fsdp=true", "train.grad_clip=0")
    report["single_noclip_s"] = round(run_single(work, "single-noclip", "train.grad_clip=0"), 1)
    report["fsdp_2x2_s"] = round(run_nodes(work, "fsdp", *fsdp), 1)
    l1, l4 = losses(work / "single-noclip"), losses(work / "fsdp")
    report["fsdp_max_loss_diff_vs_single"] = max(abs(a - b) for a, b in zip(l1, l4))
    report["fsdp_vs_single_max_weight_diff"] = max_diff(work / "fsdp", work / "single-noclip")
    report["fsdp_killed_at_step"], report["fsdp_killed_s"], _ = kill_one_node_after_step_5(work, "fsdp-killed", *fsdp)
    # resumed by one launcher of 2 processes: the DCP shards of 4 processes resharded over 2
    report["fsdp_restart_1x2_s"] = round(run_nodes(work, "fsdp-killed", *fsdp, nodes=1), 1)
    report["fsdp_resumed_on_2_of_4_max_weight_diff"] = max_diff(work / "fsdp", work / "fsdp-killed")
    l4, l2 = losses(work / "fsdp"), losses(work / "fsdp-killed")
    report["fsdp_resumed_on_2_of_4_max_loss_diff"] = max(abs(a - b) for a, b in zip(l4, l2))
    # the resharding itself: the 4-process step-5 checkpoint read by 1 and by 2 processes (0 more steps), exported whole
    step5 = ("train.fsdp=true", "train.max_steps=5", f"train.resume={work / 'fsdp' / 'checkpoints' / 'step-00000005'}")
    run_single(work, "reshard-1", *step5)
    run_nodes(work, "reshard-2", *step5, nodes=1)
    report["fsdp_step5_read_by_1_vs_2_processes_max_weight_diff"] = max_diff(work / "reshard-1", work / "reshard-2")
    resumed = [line for line in (work / "fsdp-killed-node0.log").read_text().splitlines() if "resumed from" in line]
    report["fsdp_resumed_from"] = resumed[-1].split("resumed from ")[-1] if resumed else None

    # 2 launchers x 1 process, one micro-batch of 8 rows each, killed, resumed by ONE process:
    # a step's gradient is the sum of the same two micro-batch gradients either way (one
    # all-reduce of two, or two accumulated in one process), so no summation order changes
    one = (*fsdp, "train.micro_batch_size=8")
    report["fsdp_2x1_s"] = round(run_nodes(work, "fsdp-2x1", *one, nproc=1), 1)
    report["fsdp_2x1_killed_at_step"], _, _ = kill_one_node_after_step_5(work, "fsdp-2x1-killed", *one, nproc=1)
    report["fsdp_restart_1x1_s"] = round(run_single(work, "fsdp-2x1-killed", *one), 1)
    report["fsdp_resumed_on_1_of_2_max_weight_diff"] = max_diff(work / "fsdp-2x1", work / "fsdp-2x1-killed")

    print("FSDP2 with gradient clipping (train.grad_clip=1.0), for the record", flush=True)
    report["fsdp_clip_2x2_s"] = round(run_nodes(work, "fsdp-clip", "train.fsdp=true"), 1)
    l1, l4 = losses(work / "single"), losses(work / "fsdp-clip")
    report["fsdp_clip_max_loss_diff_vs_single"] = max(abs(a - b) for a, b in zip(l1, l4))
    report["fsdp_clip_vs_single_max_weight_diff"] = max_diff(work / "fsdp-clip", work / "single")

    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    checks = {
        "DDP 2x2 losses = 1 process (1e-5)": report["ddp_max_loss_diff_vs_single"] <= 1e-5,
        "DDP 2x2 killed + restarted = uninterrupted, bitwise": report["ddp_resumed_bitwise_equal"],
        "FSDP2 2x2 losses = 1 process (1e-5)": report["fsdp_max_loss_diff_vs_single"] <= 1e-5,
        "FSDP2 4-process checkpoint read by 1 and by 2 processes: the same weights, bitwise": report["fsdp_step5_read_by_1_vs_2_processes_max_weight_diff"] == 0,
        "FSDP2 2x2 killed, resumed on 1x2: losses = uninterrupted (1e-5)": report["fsdp_resumed_on_2_of_4_max_loss_diff"] <= 1e-5,
        "FSDP2 2x1 killed, resumed on 1 process: weights = uninterrupted (1e-6)": report["fsdp_resumed_on_1_of_2_max_weight_diff"] <= 1e-6,
    }
    # 4 -> 2 processes regroups the sum of a step's 8 micro-batch gradients (4 + 4 instead of
    # 2 + 2 + 2 + 2): fp32 rounding that Adam carries into the weights, as between any two
    # process counts; reported, not a pass/fail criterion
    print(f"note  FSDP2 2x2 killed, resumed on 1x2: weights {report['fsdp_resumed_on_2_of_4_max_weight_diff']:.1e} from uninterrupted "
          f"(uninterrupted 2x2 vs 1 process: {report['fsdp_vs_single_max_weight_diff']:.1e})")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()

"""Compare the engines for ``neobert prepare`` on this machine: datatrove, Ray Data, the bare tokenizer.

    python scripts/bench_prepare.py corpus /tmp/bench/src --mb 300 --files 16
    python scripts/bench_prepare.py run /tmp/bench/src --json docs/scale/prepare-bench.json

``corpus`` writes the built-in corpus, repeated, as parquet files (a ``text`` column).
``run`` measures, each in its own process and in turn (so that load from other users of
the machine hits them alike), over the same files:

- ``tokenizer``: the fast tokenizer's own ``encode_batch_fast`` on batches of 1000 texts,
  one thread and all threads: the ceiling for any engine (reading parquet included);
- ``datatrove``: ``neobert prepare`` (datatrove's local executor, one process per core);
- ``ray``: Ray Data, ``read_parquet`` then ``map_batches`` with one tokenizer actor per
  core writing the same shard files (needs ``pip install "ray[data]"``, not a dependency);
- ``kill``: ``neobert prepare`` killed (SIGKILL, whole process group) once about half the
  tokens are written, then run again: total wall time against an uninterrupted run.

Needs ``psutil`` (to watch the process trees) beside the package; ``ray`` only for its line.
Each line of the JSON output is one measurement: tokens, seconds, tokens/s, processes,
tokens/s per process, and the peak resident memory summed over the process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

BATCH = 1000


def make_corpus(out: Path, mb: int, files: int) -> None:
    from neobert.data.sources import builtin_documents

    docs = builtin_documents()
    size = sum(len(d.encode()) for d in docs)
    repeats = max(1, round(mb * 1e6 / size))
    out.mkdir(parents=True, exist_ok=True)
    texts = [f"{d}" for _ in range(repeats) for d in docs]
    per_file = -(-len(texts) // files)
    for f in range(files):
        pq.write_table(pa.table({"text": texts[f * per_file : (f + 1) * per_file]}), out / f"part-{f:03d}.parquet", row_group_size=BATCH)
    print(f"{len(texts):,} documents ({repeats} x built-in, {repeats * size / 1e6:.0f} MB of text) in {files} files under {out}")


def tokenizer_file() -> str:
    from neobert.tokenizer import packaged_tokenizer_file

    return str(packaged_tokenizer_file())


def load_backend():
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(tokenizer_file())
    backend.no_padding()
    backend.no_truncation()
    return backend


def bench_tokenizer(src: Path, threads: int) -> dict:
    """encode_batch_fast over every parquet batch; ids turned into arrays as a writer would."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    backend = load_backend()
    tokens, start = 0, time.perf_counter()
    for path in sorted(src.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=BATCH):
            encodings = backend.encode_batch_fast(batch.column(0).to_pylist())
            ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encodings])
            tokens += len(ids)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "processes": threads}


def bench_datatrove(src: Path, out: Path, workers: int, tasks: int) -> dict:
    from neobert.data.prepare import PrepareArgs, PrepareConfig, prepare
    from neobert.data.config import DataConfig

    start = time.perf_counter()
    prepare(PrepareConfig(DataConfig(source=str(src), num_proc=workers), PrepareArgs(output=str(out), tasks=tasks, progress=False)))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": manifest["tokens"], "seconds": time.perf_counter() - start, "processes": workers}


class RayTokenize:
    """A Ray Data actor: tokenizes a batch and writes it as one shard-like file pair."""

    def __init__(self, out: str):
        self.backend, self.out = load_backend(), out

    def __call__(self, batch: pa.Table) -> dict:
        import uuid

        texts = batch.column("text").to_pylist()
        encodings = self.backend.encode_batch_fast(texts)
        docs = [np.asarray(e.ids, dtype=np.uint16) for e in encodings]
        name = f"{self.out}/{uuid.uuid4().hex}"
        np.concatenate(docs).tofile(name + ".bin")
        np.save(name + ".offsets.npy", np.cumsum([0] + [len(d) for d in docs]))
        return {"tokens": np.array([sum(len(d) for d in docs)])}


def bench_ray(src: Path, out: Path, workers: int) -> dict:
    import ray

    start = time.perf_counter()
    # one logical CPU more than tokenizer actors: with exactly as many, the parquet read tasks
    # never get a CPU and the pipeline stalls
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    files = len(list(src.glob("*.parquet")))
    ds = ray.data.read_parquet(str(src), override_num_blocks=files).select_columns(["text"])  # a block per file, as datatrove's tasks
    counts = ds.map_batches(RayTokenize, fn_constructor_args=(str(out),), batch_size=BATCH, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    tokens = int(counts.sum("tokens"))
    end = time.perf_counter()
    ray.shutdown()
    return {"tokens": tokens, "seconds": end - start, "seconds_without_startup": end - started, "processes": workers}


def watch(process: psutil.Popen, stop=None) -> dict:
    """Sample a process tree every 0.1 s until it ends (or ``stop()`` is true, then kill its group):
    wall seconds, CPU seconds (user + system, last value seen per process) and peak resident memory."""
    start, cpu, peak = time.perf_counter(), {}, 0
    while process.poll() is None:
        rss = 0
        for p in [process, *process.children(recursive=True)]:
            try:
                times, rss = p.cpu_times(), rss + p.memory_info().rss
                cpu[p.pid] = times.user + times.system  # not children_*: reaped children are sampled themselves
            except psutil.Error:
                pass
        peak = max(peak, rss)
        if stop is not None and stop():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(0.1)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": sum(cpu.values()), "peak_rss_mb": round(peak / 2**20)}


def bench_kill(src: Path, out: Path, workers: int, tasks: int) -> dict:
    """Kill a run once half the tokens are written, rerun it; against one uninterrupted run
    just before (whose manifest gives the token count that "half" refers to).

    CPU seconds compare the work done whatever else the machine runs; wall seconds depend on it.
    """
    from neobert.data.prepare import count_tokens

    args = [sys.executable, "-m", "neobert", "prepare", f"data.source={src}", f"data.num_proc={workers}", f"prepare.tasks={tasks}", "prepare.progress=false"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    clean = watch(psutil.Popen([*args, f"prepare.output={out}.clean"], **quiet))
    expected_tokens = json.loads(Path(f"{out}.clean/manifest.json").read_text())["tokens"]
    killed = watch(psutil.Popen([*args, f"prepare.output={out}"], **quiet), stop=lambda: count_tokens(out, tasks)[0] >= expected_tokens / 2)
    kept_tokens, kept_shards = count_tokens(out, tasks)
    finished_tokens = sum(json.loads((out / "shards" / f"{r:05d}" / "meta.json").read_text())["tokens"] for r in range(tasks) if (out / "shards" / f"{r:05d}" / "meta.json").is_file())
    rerun = watch(psutil.Popen([*args, f"prepare.output={out}"], **quiet))
    return {"tokens": expected_tokens, "seconds": killed["seconds"] + rerun["seconds"], "cpu_seconds": killed["cpu_seconds"] + rerun["cpu_seconds"],
            "uninterrupted_seconds": clean["seconds"], "uninterrupted_cpu_seconds": clean["cpu_seconds"],
            "cpu_ratio": (killed["cpu_seconds"] + rerun["cpu_seconds"]) / clean["cpu_seconds"],
            "wall_ratio": (killed["seconds"] + rerun["seconds"]) / clean["seconds"],
            "killed_after_seconds": killed["seconds"], "shards_finished_when_killed": kept_shards,
            "tokens_written_when_killed": kept_tokens, "tokens_in_flight_lost": kept_tokens - finished_tokens, "processes": workers}


def measure(kind: str, argv: list[str]) -> dict:
    """Run one measurement in a fresh process, watching its tree's CPU time and memory."""
    process = psutil.Popen([sys.executable, __file__, "one", kind, *argv], stdout=subprocess.PIPE, text=True, start_new_session=True)
    tree = watch(process)
    result = json.loads(process.stdout.read().strip().splitlines()[-1])
    if kind != "kill":
        result.update(cpu_seconds=tree["cpu_seconds"], peak_rss_mb=tree["peak_rss_mb"])
        result["tokens_per_cpu_second"] = result["tokens"] / result["cpu_seconds"]
    result.update(kind=kind, tokens_per_s=result["tokens"] / result["seconds"])
    result["tokens_per_s_per_process"] = result["tokens_per_s"] / result["processes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out", type=Path)
    c.add_argument("--mb", type=int, default=300)
    c.add_argument("--files", type=int, default=16)
    r = sub.add_parser("run")
    r.add_argument("src", type=Path)
    r.add_argument("--work", type=Path, default=Path("/tmp/bench-prepare"))
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--skip", nargs="*", default=[])
    r.add_argument("--json", type=Path)
    o = sub.add_parser("one")
    o.add_argument("kind")
    o.add_argument("rest", nargs="*")
    args = parser.parse_args()

    if args.command == "corpus":
        make_corpus(args.out, args.mb, args.files)
    elif args.command == "one":
        src, work, workers, tasks = Path(args.rest[0]), Path(args.rest[1]), int(args.rest[2]), int(args.rest[3])
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(f"{work}.clean", ignore_errors=True)
        result = {
            "tokenizer": lambda: bench_tokenizer(src, workers),
            "datatrove": lambda: bench_datatrove(src, work, workers, tasks),
            "ray": lambda: bench_ray(src, work, workers),
            "kill": lambda: bench_kill(src, work, workers, tasks),
        }[args.kind]()
        print(json.dumps(result))
    else:
        files = len(list(args.src.glob("*.parquet")))
        results = []
        plan = [("tokenizer", 1), ("tokenizer", args.workers), ("datatrove", 1), ("datatrove", args.workers), ("ray", args.workers), ("kill", args.workers)]
        for round_ in range(args.rounds):
            for kind, workers in plan:
                if kind in args.skip:
                    continue
                result = measure(kind, [str(args.src), str(args.work / f"{kind}-{workers}"), str(workers), str(files)])
                result["round"] = round_
                results.append(result)
                print(json.dumps(result), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()

"""Load test of ``neobert serve`` against ``SentenceTransformer.encode`` on the same texts.

Starts ``neobert serve`` on 127.0.0.1 (a free port) in a subprocess, then, in this process:

1. direct: ``SentenceTransformer.encode`` of the same model on every text (batch sizes 32,
   the library default, and 256) while the server idles;
2. served: for each concurrency in ``--clients``, that many async httpx clients each send
   ``POST /v1/embeddings`` requests of ``--texts-per-request`` texts back to back, until
   ``--requests`` requests are done or ``--seconds`` have passed (whichever comes first);
   throughput is texts answered per second of wall time, latency is per request;

repeated for ``--rounds`` rounds (medians reported; ratios are taken within each round, so
that both sides meet the same load from other processes on a shared machine).

Texts are ``--tokens`` tokens long with [CLS] and [SEP] (random whole words of the
bert-base-uncased vocabulary, checked with the tokenizer). Without ``--model`` the model is a
randomly initialised NeoBERT of the tiny config's size (4 x 128; speed does not depend on
the weights). Prints a Markdown table (and writes ``--json``). Nothing leaves 127.0.0.1.

    python scripts/loadtest.py [--model DIR] [--clients 1 8 64] [--texts-per-request 1]
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, load_tokenizer
from neobert.embeddings import load_encoder


def tiny_model(directory: Path) -> Path:
    """A random NeoBERT with configs/tiny.yaml's sizes, saved with the default tokenizer."""
    torch.manual_seed(0)
    config = NeoBERTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512, max_length=128)
    NeoBERTForMaskedLM(config).save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)
    return directory


def make_texts(n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of exactly ``tokens`` tokens (special tokens included)."""
    tok = load_tokenizer()
    words = [w for w, i in tok.get_vocab().items() if 2000 <= i < 20000 and w.isalpha() and w.isascii()]
    rng, texts = random.Random(seed), []
    while len(texts) < n:
        text = " ".join(rng.choices(words, k=tokens - 2))
        if len(tok(text)["input_ids"]) == tokens:
            texts.append(text)
    return texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counts(url: str) -> tuple[float, float]:
    """(texts, batches) the server has run so far, from its /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(('neobert_batch_texts_sum{task="embeddings"}', 'neobert_batch_texts_count{task="embeddings"}')):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values.get("neobert_batch_texts_sum", 0.0), values.get("neobert_batch_texts_count", 0.0)


def run_loop(coroutine):
    """asyncio.run, on uvloop when it is installed (less client CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def direct(st, texts: list[str], batch_size: int) -> dict:
    """texts/s and CPU ms per text of one SentenceTransformer.encode pass over ``texts``."""
    start, cpu = time.perf_counter(), time.process_time()
    st.encode(texts, batch_size=batch_size, show_progress_bar=False)
    return {"texts_per_s": len(texts) / (time.perf_counter() - start), "cpu_ms_per_text": (time.process_time() - cpu) * 1000 / len(texts)}


async def served(url: str, texts: list[str], clients: int, per_request: int, max_requests: int, seconds: float, encoding: str) -> dict:
    """Throughput and latency of ``clients`` concurrent clients, each with its own connection
    (an httpx.AsyncClient apiece: one shared pool of 64 connections costs the client more CPU)."""
    latencies: list[float] = []
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(c: int):
        nonlocal sent
        i = c
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await http.get("/health")  # connect before the clock starts
            await ready.wait()
            while sent < max_requests and time.perf_counter() < stop_at:
                sent += 1
                batch = [texts[(i * per_request + k) % len(texts)] for k in range(per_request)]
                i += clients
                start = time.perf_counter()
                r = await http.post("/v1/embeddings", json={"input": batch, "encoding_format": encoding})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)

    ready = asyncio.Event()
    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    stop_at = start + seconds
    ready.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": len(latencies), "texts_per_s": len(latencies) * per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: a random NeoBERT of the tiny config's size)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--encoding-format", default="float", choices=["float", "base64"], help="float (the API default) or base64 (what OpenAI's Python client asks for)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per text with [CLS] and [SEP] (default 32)")
    parser.add_argument("--texts", type=int, default=1024, help="distinct texts (one direct pass encodes them all)")
    parser.add_argument("--requests", type=int, default=1000, help="most requests per concurrency level and round")
    parser.add_argument("--seconds", type=float, default=10, help="most seconds per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (direct passes, every concurrency level); medians are reported")
    parser.add_argument("--threads", type=int, help="torch threads for the direct encode and the server (default: torch's)")
    parser.add_argument("--serve-args", default="", help="extra neobert serve options, e.g. '--max-wait-ms 2'")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    extra = args.serve_args.split()
    if args.threads:
        torch.set_num_threads(args.threads)
        extra += ["--threads", str(args.threads)]
    batch_sizes = (32, 256)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        texts = make_texts(args.texts, args.tokens)
        st = load_encoder(model, device="cpu").model
        st.encode(texts[:256], batch_size=256)  # warm-up
        port = free_port()
        cmd = [sys.executable, "-m", "neobert", "serve", "--model", model, "--port", str(port), "--log-level", "warning", *extra]
        server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"server exited with {server.returncode}")
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            # Rounds interleave direct and served runs, so that both meet the same load from
            # whatever else runs on the machine; ratios are taken within a round.
            rounds = []
            for _ in range(args.rounds):
                reference = {b: direct(st, texts, b) for b in batch_sizes}  # the server idles meanwhile
                served_runs = []
                for c in args.clients:
                    cpu, batches, client_cpu = cpu_seconds(server.pid), batch_counts(url), time.process_time()
                    run = run_loop(served(url, texts, c, args.texts_per_request, args.requests, args.seconds, args.encoding_format))
                    texts_done, batches_done = (after - before for after, before in zip(batch_counts(url), batches))
                    run["texts_per_batch"] = texts_done / max(batches_done, 1)
                    # the warm-up request is counted in neither; its CPU share is negligible
                    run["server_cpu_ms_per_text"] = (cpu_seconds(server.pid) - cpu) * 1000 / (run["requests"] * args.texts_per_request)
                    run["client_cpu_ms_per_text"] = (time.process_time() - client_cpu) * 1000 / (run["requests"] * args.texts_per_request)
                    run["load_average"] = os.getloadavg()[0]
                    served_runs.append(run)
                rounds.append({"direct": reference, "served": served_runs})
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    def median(values):
        return float(np.median(list(values)))

    best = [max(r["direct"].values(), key=lambda d: d["texts_per_s"]) for r in rounds]  # per round
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "unknown CPU")
    loads = [run["load_average"] for r in rounds for run in r["served"]]
    print(f"\n{cpu_name}, {os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f} during the served runs. "
          f"{len(texts)} texts of {args.tokens} tokens, {args.texts_per_request} text(s) per request ({args.encoding_format}), medians of "
          f"{args.rounds} rounds. x direct: served texts/s over the best direct encode of the same round (median, and the "
          f"range over rounds); CPU x direct: direct CPU per text over the server's CPU per text (all its threads, from /proc); "
          f"client CPU: the load generator's (this process, on the same cores)\n")
    print("| run | texts/s | x direct (range) | p50 ms | p99 ms | CPU ms/text | CPU x direct | client CPU ms/text | texts/batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in batch_sizes:
        print(f"| SentenceTransformer.encode, batch_size={b} | {median(r['direct'][b]['texts_per_s'] for r in rounds):.0f} | | | "
              f"| {median(r['direct'][b]['cpu_ms_per_text'] for r in rounds):.2f} | | | {b} |")
    for i, c in enumerate(args.clients):
        runs = [r["served"][i] for r in rounds]
        ratios = [run["texts_per_s"] / b["texts_per_s"] for run, b in zip(runs, best)]
        cpu_ratio = median(b["cpu_ms_per_text"] / run["server_cpu_ms_per_text"] for run, b in zip(runs, best))
        print(f"| serve, {c} clients ({sum(x['requests'] for x in runs)} requests) | {median(x['texts_per_s'] for x in runs):.0f} "
              f"| {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {median(x['p50_ms'] for x in runs):.1f} "
              f"| {median(x['p99_ms'] for x in runs):.1f} | {median(x['server_cpu_ms_per_text'] for x in runs):.2f} | {cpu_ratio:.2f} "
              f"| {median(x['client_cpu_ms_per_text'] for x in runs):.2f} | {median(x['texts_per_batch'] for x in runs):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

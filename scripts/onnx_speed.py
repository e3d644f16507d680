"""Sentence-embedding throughput: onnxruntime fp32 and int8 against PyTorch, same run.

    PYTHONPATH=src python scripts/onnx_speed.py --json docs/deploy/onnx-speed.json

For each model size (random weights: speed does not depend on them) the embeddings export
of ``neobert export-onnx`` (encoder + mean pooling) is written, quantized to int8, and the
same padded batches (SST-2 dev sentences, 32 per batch, in file order, and again sorted by
length as a server batches them) run through PyTorch
(fp32, and bf16 autocast where the CPU has native bf16) and onnxruntime fp32 / int8, in
interleaved rounds; the median round of each is reported as real (non-padding) tokens per
second, and the ratio to PyTorch fp32 of the same round. Threads: ``--threads`` for both.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from neobert import NeoBERTConfig, NeoBERTModel, load_tokenizer
from neobert.export import SentenceEmbedding, export_onnx, quantize_int8

SIZES = {
    "tiny (4 x 128)": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512),
    "small (6 x 384)": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
}
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"


def sentences(n: int) -> list[str]:
    with open(SST2, newline="") as f:
        return [row["sentence"] for row, _ in zip(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), range(n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    texts = sentences(args.texts)
    orders = {"file order": texts, "sorted by length": sorted(texts, key=lambda t: len(tokenizer(t)["input_ids"]))}
    batchings = {
        order: [tokenizer(ordered[i : i + args.batch_size], padding=True, return_tensors="pt") for i in range(0, len(ordered), args.batch_size)]
        for order, ordered in orders.items()
    }
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batchings["file order"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    padded = {order: sum(b["attention_mask"].numel() for b in batches) for order, batches in batchings.items()}
    results = {"texts": len(texts), "batch_size": args.batch_size, "real_tokens": real_tokens, "padded_tokens": padded, "threads": args.threads, "rounds": args.rounds,
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "sizes": {}}

    for (name, shape), (order, batches) in itertools.product(SIZES.items(), batchings.items()):
        torch.manual_seed(0)
        model = SentenceEmbedding(NeoBERTModel(NeoBERTConfig(vocab_size=len(tokenizer), **shape))).eval()
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, Path(tmp) / "model.onnx")
            int8 = quantize_int8(fp32, Path(tmp) / "model_quantized.onnx")
            sessions = {f.name: onnxruntime.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in (fp32, int8)}

            def run_torch(bf16: bool):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return [model(b["input_ids"], b["attention_mask"]).float().numpy() for b in batches]

            def run_onnx(session):
                return [session.run(None, {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()})[0] for b in batches]

            runners = {
                "PyTorch fp32 (padding-free)": lambda: run_torch(False),
                "PyTorch bf16 autocast (padding-free)": lambda: run_torch(True),
                "onnxruntime fp32": lambda: run_onnx(sessions["model.onnx"]),
                "onnxruntime int8 (dynamic)": lambda: run_onnx(sessions["model_quantized.onnx"]),
            }
            reference = np.concatenate(run_torch(False))
            seconds = {k: [] for k in runners}
            outputs = {}
            for _ in range(args.rounds):  # interleaved, so that contention hits every runner alike
                for key, run in runners.items():
                    start = time.perf_counter()
                    outputs[key] = np.concatenate(run())
                    seconds[key].append(time.perf_counter() - start)
            row = {}
            for key, times in seconds.items():
                out = outputs[key]
                cosine = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
                row[key] = {
                    "tokens_per_s": real_tokens / statistics.median(times),
                    "ratio_to_torch_fp32": statistics.median(t / r for t, r in zip(seconds["PyTorch fp32 (padding-free)"], times)),
                    "max_abs_diff_to_torch_fp32": float(np.abs(out - reference).max()),
                    "min_cosine_to_torch_fp32": float(cosine.min()),
                    "file_mb": None,
                }
            row["onnxruntime fp32"]["file_mb"] = fp32.stat().st_size / 1e6
            row["onnxruntime int8 (dynamic)"]["file_mb"] = int8.stat().st_size / 1e6
            results["sizes"][f"{name}, {order}"] = row
            for key, r in row.items():
                print(f"{name:16} {order:16} {key:38} {r['tokens_per_s']:9.0f} tok/s  x{r['ratio_to_torch_fp32']:.2f}  max|d| {r['max_abs_diff_to_torch_fp32']:.1e}  cos {r['min_cosine_to_torch_fp32']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

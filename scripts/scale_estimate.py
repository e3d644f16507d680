"""Estimates for the paper's stage 1 at scale (docs/scale.md): preparation time from the
tokens per CPU-second measured here, training time from FLOPs per token and stated MFU.

    python scripts/scale_estimate.py            # prints the Markdown tables of docs/scale.md

Preparation: ``neobert prepare`` tokenizes at a rate per core (tokens per CPU-second,
measured on this machine's AMD EPYC with ``scripts/bench_prepare.py``:
docs/scale/prepare-bench-65mb.json), times the cores of the machines that run it. The
output is 2 bytes per token (uint16 ids: the vocabulary has 30,522 entries) plus 16 bytes
per document (an int64 offset and hash).

Training: FLOPs per token of NeoBERT-base (28 x 768, SwiGLU 2048, vocabulary 30,522) from
``NeoBERTConfig.flops_per_token``: the matmuls of the q/k/v/o projections, the SwiGLU
matrices and both attention products over the whole row (``4 * L * d`` per layer, an upper
bound: with document masks, flash-attn skips the blocks across documents), plus the MLM
decoder on the 20% of tokens that are masked (the sparse head); a training step costs 3x
its forward pass (the backward pass twice: "6N" plus attention). Time = tokens x FLOPs per
token / (GPUs x 989 TFLOPS, the H100 SXM's dense bf16 peak, x MFU).
"""

from __future__ import annotations

import argparse

from neobert import NeoBERTConfig

TOKENS = 600e9  # RefinedWeb (the paper's count)
DOCUMENTS = 968e6  # RefinedWeb's documents (its paper)
H100_BF16 = 989e12  # dense, SXM
MLM_RATE = 0.2
# tokens per CPU-second of neobert prepare (datatrove), docs/scale/prepare-bench-65mb.json
PREPARE_RATES = {"2 workers per 2 cores (0.81x the tokenizer)": 415e3, "1 worker (1.00x the tokenizer)": 512e3}
# the paper's schedule: stage 1 at 1024 tokens, stage 2 at 4096 (2,097,152-token batches)
STAGES = {"stage 1 (1M steps, 1024)": (1_000_000 * 2_097_152, 1024), "stage 2 (50k steps, 4096)": (50_000 * 2_097_152, 4096)}


def training_flops_per_token(config: NeoBERTConfig, seq_len: int) -> float:
    """3 x (encoder forward + the decoder on the masked share of tokens)."""
    head = config.flops_per_token(seq_len, include_head=True) - config.flops_per_token(seq_len)
    return 3 * (config.flops_per_token(seq_len) + MLM_RATE * head)


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def preparation_table(nodes: list[int], cores: int) -> list[str]:
    out_bytes = 2 * TOKENS + 16 * DOCUMENTS
    lines = [f"Preparing {TOKENS / 1e9:.0f}B tokens ({DOCUMENTS / 1e6:.0f}M documents; output {out_bytes / 1e12:.2f} TB), nodes of {cores} cores:", ""]
    lines.append("| tokens per core-second | " + " | ".join(f"{n} node{'s' if n > 1 else ''} ({n * cores} cores)" for n in nodes) + " |")
    lines.append("|---|" + "---|" * len(nodes))
    for name, rate in PREPARE_RATES.items():
        cells = [f"{duration(TOKENS / (rate * n * cores))}, writes {out_bytes / (TOKENS / (rate * n * cores)) / 1e9:.2f} GB/s" for n in nodes]
        lines.append(f"| {rate / 1e3:.0f}k: {name} | " + " | ".join(cells) + " |")
    return lines


def training_table(config: NeoBERTConfig, gpus: list[int], mfus: list[float]) -> list[str]:
    lines = ["FLOPs per token of NeoBERT-base (28 x 768): "
             + "; ".join(f"{L}: forward {config.flops_per_token(L) / 1e9:.3f} G, training {training_flops_per_token(config, L) / 1e9:.2f} G"
                         for L in (1024, 4096)), ""]
    header = [f"{g} H100, MFU {m:.0%}" for g in gpus for m in mfus]
    lines.append("| tokens | row length | training FLOPs | " + " | ".join(header) + " |")
    lines.append("|---|---|---|" + "---|" * len(header))
    rows = [(f"{TOKENS / 1e9:.0f}B (RefinedWeb once)", TOKENS, 1024), (f"{TOKENS / 1e9:.0f}B (RefinedWeb once)", TOKENS, 4096)]
    rows += [(f"{tokens / 1e12:.2f}T: {name}", tokens, L) for name, (tokens, L) in STAGES.items()]
    for label, tokens, L in rows:
        flops = tokens * training_flops_per_token(config, L)
        cells = [duration(flops / (g * H100_BF16 * m)) for g in gpus for m in mfus]
        lines.append(f"| {label} | {L} | {flops:.2e} | " + " | ".join(cells) + " |")
    per_gpu = {m: H100_BF16 * m / training_flops_per_token(config, 1024) for m in mfus}
    lines += ["", "Tokens per second per H100 at 1024: " + ", ".join(f"{v / 1e3:.0f}k at MFU {m:.0%}" for m, v in per_gpu.items())
              + f"; reading them at 64 GPUs and MFU {mfus[-1]:.0%} is {64 * per_gpu[mfus[-1]] * 2 / 1e6:.0f} MB/s of token ids."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 16, 64], help="preparation: machines")
    parser.add_argument("--cores", type=int, default=64, help="preparation: cores per machine")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    args = parser.parse_args(argv)
    config = NeoBERTConfig()  # the released architecture: 28 x 768, vocabulary 30,522
    print("\n".join(preparation_table(args.nodes, args.cores) + [""] + training_table(config, args.gpus, args.mfu)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

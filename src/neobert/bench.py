"""``neobert bench``: throughput, FLOP rate, MFU and peak memory against ModernBERT and BERT.

Models (random weights from their config classes, no download, dropout off everywhere so
that every model runs the same kind of kernels in both modes):

- ``neobert-base``: this package's NeoBERT, padding-free attention;
- ``neobert-base-padded``: the same weights run the way the released code runs, on the
  padded batch with a dense (B, H, L, L) additive mask;
- ``modernbert-base``, ``bert-base``: ``transformers``' own classes with
  ``attn_implementation="sdpa"`` (BERT's learned position table is stretched to 8192
  entries; a longer ``--seq-lens`` skips its rows, with a line saying so).

Attention kernels: on CUDA with ``flash_attn`` installed, bf16 rows run every model but
``neobert-base-padded`` with ``attn_implementation="flash_attention_2"`` (each model at its
best kernel: NeoBERT's padding-free varlen path, ModernBERT's and BERT's unpadded flash
paths); elsewhere, and in fp32 (which flash-attn does not take), SDPA. Each row records its
``attention``.

Each row runs one batch shape: ``fixed`` batches are ``batch_tokens // seq_len`` rows of
exactly ``seq_len`` tokens with an all-ones attention mask; ``variable`` batches are
``max(4, that)`` rows whose lengths are drawn with a fixed seed (a normal around half of
``seq_len``, or the built-in corpus's document lengths), padded to the longest row.
``inference`` is a forward pass of the encoder; ``train`` is forward + backward of the
masked-LM loss (20% of the real tokens labelled; NeoBERT and ModernBERT decode only
those, BERT decodes every position, as their recipes do).

Figures per row: tokens/s counts real tokens only (padding is waste, not work); FLOPs per
token are matmul FLOPs of the real tokens (closed forms below, attention included, x3 for
a training step); MFU divides the FLOP rate by the best rate measured at start on the
models' own matrix shapes in that dtype; peak memory is what a step adds on top of the
weights and inputs (CUDA: the allocator's peak; CPU: the C allocator's bytes in use, sampled).
``--profile`` adds, per row, the shares of one more step's time spent in matmuls, in
attention kernels and in everything else (``torch.profiler``), to see what limits a row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from neobert.cli import ArgumentParser
from neobert.device import PeakMemory, attention_implementation, resolve_device, use_bf16
from neobert.errors import UserError
from neobert.modeling_neobert import NeoBERTConfig, NeoBERTForMaskedLM

MODELS = ("neobert-base", "neobert-base-padded", "modernbert-base", "bert-base")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("inference", "train")
LENGTHS = ("fixed", "variable")
MLM_RATE = 0.2
TOKEN_IDS = (5, 1000)  # random ids valid in every vocabulary, special tokens avoided
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)


# ---------------------------------------------------------------------------------------
# Models and their FLOPs per token (matmuls, 2 FLOPs per multiply-add, forward pass)


def build(name: str, tiny: bool = False) -> nn.Module:
    """The masked-LM model of ``name`` in float32 on CPU; its ``base_model`` is the encoder."""
    torch.manual_seed(0)
    if name.startswith("neobert"):
        config = NeoBERTConfig(**TINY) if tiny else NeoBERTConfig()
        config.padding_free = name == "neobert-base"
        return NeoBERTForMaskedLM(config)
    if name == "modernbert-base":
        small = dict(TINY, intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        config = ModernBertConfig(**small) if tiny else ModernBertConfig()
        config.sparse_prediction = True  # its recipe decodes only the masked positions
        return ModernBertForMaskedLM._from_config(config, attn_implementation="sdpa")
    if name == "bert-base":
        config = BertConfig(**TINY) if tiny else BertConfig()
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        config.max_position_embeddings = 8192  # absolute positions: stretched so long rows run
        return BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")


def position_limit(model: nn.Module) -> int | None:
    """The longest row a model can run: the size of its learned position table (BERT), or
    None where positions are rotary (NeoBERT, ModernBERT) and any length runs."""
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def flops_per_token(config, seq_len: int) -> int:
    """Forward matmul FLOPs of the encoder per token of a sequence of ``seq_len`` tokens."""
    if isinstance(config, NeoBERTConfig):
        return config.flops_per_token(seq_len)
    d, n = config.hidden_size, config.num_hidden_layers
    attention = 2 * 2 * seq_len * d  # QK^T and AV over the whole sequence, every layer
    if isinstance(config, ModernBertConfig):  # Wqkv, Wo, GLU Wi (d -> 2I), Wo (I -> d)
        i = config.intermediate_size
        return n * (2 * d * 3 * d + 2 * d * d + 2 * d * 2 * i + 2 * i * d + attention)
    if isinstance(config, BertConfig):  # q, k, v, o; intermediate and output dense
        i = config.intermediate_size
        return n * (2 * 4 * d * d + 2 * 2 * d * i + attention)
    raise TypeError(f"no FLOP count for {type(config).__name__}")


def head_flops(config) -> int:
    """Forward matmul FLOPs of the masked-LM head per decoded token."""
    d = config.hidden_size
    transform = 0 if isinstance(config, NeoBERTConfig) else 2 * d * d  # peers: dense + norm before the decoder
    return transform + 2 * d * config.vocab_size


# ---------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 at real tokens
    labels: torch.Tensor  # (B, L), -100 where no loss
    lengths: list[int]  # real tokens per row

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def draw_lengths(kind: str, seq_len: int, rows: int, seed: int, doc_lengths: np.ndarray | None) -> list[int]:
    """Row lengths: all ``seq_len``, or drawn with a fixed seed and clipped to [8, seq_len]."""
    if kind == "fixed":
        return [seq_len] * rows
    rng = np.random.default_rng(seed + seq_len)
    drawn = rng.choice(doc_lengths, rows) if doc_lengths is not None else rng.normal(seq_len / 2, seq_len / 4, rows)
    return [int(n) for n in np.clip(np.round(drawn), 8, seq_len)]


def make_batch(lengths: list[int], seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    real = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(*TOKEN_IDS, (len(lengths), L), generator=g).masked_fill(~real, 0)
    selected = real & (torch.rand(ids.shape, generator=g) < MLM_RATE)
    return Batch(ids, real.long(), ids.masked_fill(~selected, -100), lengths)


def batch_flops(config, batch: Batch, train: bool, decodes_all: bool) -> int:
    """Matmul FLOPs of one step on the real tokens (a training step costs 3x its forward)."""
    encoder = sum(n * flops_per_token(config, n) for n in batch.lengths)
    if not train:
        return encoder
    decoded = batch.tokens if decodes_all else int((batch.labels != -100).sum())
    return 3 * (encoder + decoded * head_flops(config))


# ---------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(shapes: set[tuple[int, int]], tokens: int, dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """The best FLOP rate of ``F.linear`` on (tokens, in) x (in, out) over the given shapes."""
    best = 0.0
    for d_in, d_out in sorted(shapes):
        x, w = torch.randn(tokens, d_in, dtype=dtype, device=device), torch.randn(d_out, d_in, dtype=dtype, device=device)
        F.linear(x, w)
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            F.linear(x, w)
            synchronize(device)
            best = max(best, 2 * tokens * d_in * d_out / (time.perf_counter() - start))
    return best


def linear_shapes(model: nn.Module) -> set[tuple[int, int]]:
    return {(m.in_features, m.out_features) for m in model.base_model.modules() if isinstance(m, nn.Linear)}


def make_step(model: nn.Module, batch: Batch, train: bool, device: torch.device) -> Callable[[], None]:
    """One step of the row: a forward pass of the encoder, or forward + backward of the MLM loss."""
    inputs = dict(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    labels = batch.labels.to(device)

    def step():
        if train:
            model(**inputs, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model.base_model(**inputs)

    return step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[list[float], float]:
    """Seconds of each timed step (after ``warmup`` untimed ones) and the peak memory."""
    for _ in range(warmup):
        step()
    times = []
    with PeakMemory(device) as memory:
        for _ in range(iters):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return times, memory.mb


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def is_attention_op(key: str) -> bool:
    """SDPA and flash-attn kernels, and the attention softmax of eager paths (forward and
    backward); not the loss's ``log_softmax``."""
    return "scaled_dot_product" in key or "flash" in key or key.startswith(("aten::_softmax", "aten::softmax"))


def time_shares(step: Callable[[], None], device: torch.device) -> dict:
    """Where one step's time goes, from ``torch.profiler``: the shares of self time (CPU, or
    the GPU's on CUDA) in matmuls, in attention kernels (SDPA, flash-attn, softmax) and in
    everything else, and the five largest ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    self_time = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()}
    total = sum(self_time.values()) or 1.0
    matmul = sum(t for k, t in self_time.items() if k in MATMUL_OPS) / total
    attention = sum(t for k, t in self_time.items() if is_attention_op(k)) / total
    top = sorted(self_time.items(), key=lambda kv: -kv[1])[:5]
    return {"matmul": matmul, "attention": attention, "other": 1.0 - matmul - attention, "top_ops": {k: t / total for k, t in top}}


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Options:
    models: list[str]
    seq_lens: list[int]
    dtypes: list[str]
    modes: list[str]
    lengths: list[str]
    batch_tokens: int
    warmup: int
    iters: int
    seed: int
    doc_lengths: str
    device: torch.device
    tiny: bool
    profile: bool = False


def corpus_doc_lengths() -> np.ndarray:
    """Document lengths of the built-in corpus (tokenized once, then cached)."""
    from neobert.data import DataConfig, prepare_corpus
    from neobert.tokenizer import load_tokenizer

    train, _ = prepare_corpus(DataConfig(), load_tokenizer())
    return np.asarray(train.doc_lengths)


def run(opts: Options) -> tuple[list[dict], dict[str, float]]:
    """Every row of the grid, models innermost so that ratios compare back-to-back runs;
    and the matmul peak per dtype, measured first."""
    with torch.device("meta"):  # shapes only, no weights
        shapes = set().union(*(linear_shapes(build(name, opts.tiny)) for name in opts.models))
    peaks = {dt: matmul_peak(shapes, min(opts.batch_tokens, 4096), DTYPES[dt], opts.device) for dt in opts.dtypes}
    doc_lengths = corpus_doc_lengths() if opts.doc_lengths == "corpus" and "variable" in opts.lengths else None
    grid = [(dt, mode, kind, L, name) for dt in opts.dtypes for mode in opts.modes for kind in opts.lengths for L in opts.seq_lens for name in opts.models]
    rows, models, skipped = [], {}, set()
    bar = tqdm(grid, desc="bench", unit="row")
    for dt, mode, kind, L, name in bar:
        bar.set_postfix_str(f"{name} {dt} {mode} {kind} L={L}")
        family = "neobert" if name.startswith("neobert") else name
        if family not in models:  # built once (ModernBERT's init alone takes half a minute here)
            models[family] = build(name, opts.tiny)
        limit = position_limit(models[family])
        if limit is not None and L > limit:
            if (name, L) not in skipped:
                bar.write(f"{name} skipped at length {L}: its learned position table has {limit} entries")
                skipped.add((name, L))
            continue
        model = models[family].to(device=opts.device, dtype=DTYPES[dt])  # in place: weights in the row's dtype
        model.train(mode == "train")
        if family == "neobert":  # one set of weights, run both ways
            model.config.padding_free = name == "neobert-base"
        attention = row_attention(model, name, dt, opts.device)
        rows_in_batch = max(1, opts.batch_tokens // L)
        if kind == "variable":  # enough rows for padding to matter
            rows_in_batch = max(4, rows_in_batch)
        batch = make_batch(draw_lengths(kind, L, rows_in_batch, opts.seed, doc_lengths), opts.seed)
        step = make_step(model, batch, mode == "train", opts.device)
        times, mem = time_steps(step, opts.device, opts.warmup, opts.iters)
        seconds = statistics.median(times)
        flops = batch_flops(model.config, batch, mode == "train", decodes_all=family == "bert-base")
        rows.append(
            dict(
                model=name, seq_len=L, batch_size=len(batch.lengths), dtype=dt, mode=mode, lengths=kind,
                tokens=batch.tokens, tokens_per_s=batch.tokens / seconds, flops_per_token=flops / batch.tokens,
                flop_rate=flops / seconds, mfu=flops / seconds / peaks[dt], peak_mem_mb=mem,
                peak_flop_rate=peaks[dt], step_times_s=times, device=str(opts.device), attention=attention,
            )
        )
        if opts.profile:
            rows[-1]["time_shares"] = time_shares(step, opts.device)
    bar.close()
    if not rows:
        raise UserError(f"no row to measure: {', '.join(opts.models)} cannot run --seq-lens {','.join(map(str, opts.seq_lens))}")
    add_ratios(rows)
    return rows, peaks


def row_attention(model: nn.Module, name: str, dtype: str, device: torch.device) -> str:
    """Set the attention kernel of a row's model (on its device, in its dtype) and return it:
    flash-attn where :func:`attention_implementation` allows it, except on the padded NeoBERT
    row, which measures the released code's dense-mask way."""
    implementation = "sdpa" if name == "neobert-base-padded" else attention_implementation(device, bf16=dtype == "bf16")
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)
    return implementation


def add_ratios(rows: list[dict]):
    """rows[i]["ratios"][other] = this row's tokens/s and FLOP rate over the other model's, same setting."""
    setting = lambda r: (r["dtype"], r["mode"], r["lengths"], r["seq_len"])  # noqa: E731
    for r in rows:
        peers = [o for o in rows if setting(o) == setting(r) and o is not r]
        r["ratios"] = {o["model"]: {"tokens_per_s": r["tokens_per_s"] / o["tokens_per_s"], "flop_rate": r["flop_rate"] / o["flop_rate"]} for o in peers}


# ---------------------------------------------------------------------------------------
# Output


def table(rows: list[dict], peaks: dict[str, float]) -> str:
    head = f"{'model':<21} {'dtype':<5} {'mode':<9} {'lengths':<8} {'seq':>5} {'B':>3} {'tok/s':>8} {'GFLOP/tok':>9} {'GFLOP/s':>8} {'MFU':>6} {'mem MB':>8}  tok/s | FLOP rate vs others"
    lines = ["matmul peak measured at start: " + ", ".join(f"{dt} {p / 1e9:.0f} GFLOP/s" for dt, p in peaks.items()), head, "-" * len(head)]
    last = None
    for r in rows:
        key = (r["dtype"], r["mode"], r["lengths"], r["seq_len"])
        if last is not None and key != last:
            lines.append("")
        last = key
        ratios = "  ".join(f"{short(m)} {v['tokens_per_s']:.2f}|{v['flop_rate']:.2f}" for m, v in r["ratios"].items())
        lines.append(
            f"{r['model']:<21} {r['dtype']:<5} {r['mode']:<9} {r['lengths']:<8} {r['seq_len']:>5} {r['batch_size']:>3} "
            f"{r['tokens_per_s']:>8.0f} {r['flops_per_token'] / 1e9:>9.3f} {r['flop_rate'] / 1e9:>8.0f} {r['mfu']:>6.1%} "
            f"{r['peak_mem_mb']:>8.0f}  {ratios}"
        )
    profiled = [r for r in rows if "time_shares" in r]
    if profiled:
        lines += ["", "where one step's time goes (torch.profiler, self time): matmuls | attention kernels | the rest; largest ops"]
        for r in profiled:
            t = r["time_shares"]
            top = ", ".join(f"{k.removeprefix('aten::')} {v:.1%}" for k, v in t["top_ops"].items())
            lines.append(f"{r['model']:<21} {r['dtype']:<5} {r['mode']:<9} {r['lengths']:<8} {r['seq_len']:>5}  {t['matmul']:6.1%} | {t['attention']:6.1%} | {t['other']:6.1%};  {top}")
    return "\n".join(lines)


def short(model: str) -> str:
    return {"neobert-base": "neo", "neobert-base-padded": "neo-pad", "modernbert-base": "modern", "bert-base": "bert"}.get(model, model)


def plot(rows: list[dict], path: Path):
    """tokens/s against sequence length: a panel per (dtype, mode) and lengths kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    settings = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows))
    kinds = list(dict.fromkeys(r["lengths"] for r in rows))
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(len(settings), len(kinds), figsize=(5.2 * len(kinds), 3.6 * len(settings)), squeeze=False)
    for (dt, mode), line in zip(settings, axes):
        for kind, ax in zip(kinds, line):
            for model in dict.fromkeys(r["model"] for r in rows):
                pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in rows if (r["dtype"], r["mode"], r["lengths"], r["model"]) == (dt, mode, kind, model))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=model)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="tokens/s", title=f"{dt} {mode}, {kind} lengths")
            ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"neobert bench on {rows[0]['device']}: tokens/s (real tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line


def comma_list(choices=None, cast=str):
    def parse(text: str):
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}" if choices else f"{text!r} is empty")
        return values

    return parse


def parse_args(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    parser = ArgumentParser(prog="neobert bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=comma_list(MODELS), default=list(MODELS), help="comma-separated, default all: " + ",".join(MODELS))
    parser.add_argument("--seq-lens", type=comma_list(cast=int), default=[512, 4096], help="comma-separated sequence lengths (8..65536; bert-base runs up to 8192), default 512,4096")
    parser.add_argument("--dtype", type=comma_list(DTYPES), default=None, help="fp32, bf16 or both (weights in that dtype); default bf16 where it is native (GPU, AMX/AVX512-BF16 CPU), else fp32")
    parser.add_argument("--mode", type=comma_list(MODES), default=["inference"], help="inference, train (forward+backward of the MLM loss) or both")
    parser.add_argument("--lengths", type=comma_list(LENGTHS), default=list(LENGTHS), help="fixed, variable or both, default both")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per fixed-length batch (rows = this // seq_len, at least 1)")
    parser.add_argument("--doc-lengths", choices=("normal", "corpus"), default="normal", help="variable lengths: a normal around seq_len/2, or the built-in corpus's documents")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="fixed lengths only, one timed step per row: about 5 minutes on 2 CPU cores (fp32)")
    parser.add_argument("--profile", action="store_true", help="after timing, profile one more step per row: time shares of matmuls, attention and the rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of tokens/s by length here")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # 2-layer models: smoke tests only
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.iters = ["fixed"], 1
    if any(not 8 <= n <= 65536 for n in args.seq_lens):
        raise UserError(f"--seq-lens must lie in [8, 65536], got {args.seq_lens}")
    if args.batch_tokens < 1 or args.iters < 1 or args.warmup < 0:
        raise UserError("--batch-tokens and --iters must be positive, --warmup not negative")
    device = resolve_device(args.device)
    if args.dtype is None:  # emulated bf16 runs ~40x slower than fp32: measuring it measures the emulation
        args.dtype = ["bf16"] if use_bf16(None, device) else ["fp32"]
        print(f"--dtype {args.dtype[0]} (bf16 is {'native' if args.dtype == ['bf16'] else 'emulated'} on this {device.type})")
    opts = Options(
        models=args.models, seq_lens=args.seq_lens, dtypes=args.dtype, modes=args.mode, lengths=args.lengths,
        batch_tokens=args.batch_tokens, warmup=args.warmup, iters=args.iters, seed=args.seed,
        doc_lengths=args.doc_lengths, device=device, tiny=args.tiny, profile=args.profile,
    )
    return opts, args


def main(argv: list[str]) -> int:
    opts, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, peaks = run(opts)
    print(table(rows, peaks))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0

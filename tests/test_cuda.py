"""The GPU path (issue 11, item 4): flash-attn against the padded path, a bf16 training step,
``train.compile=true``, a 2-GPU DDP step, the choice of attention kernel, and
``scripts/gpu-check.sh``'s dry mode.

Every test body takes a ``device``: ``cpu`` always runs (it proves the test code right on a
machine without a GPU), ``cuda`` is marked ``cuda`` (``pytest -m cuda`` selects the GPU
variants; ``scripts/gpu-check.sh`` runs them) and is skipped, with the reason, where
``torch.cuda.is_available()`` is false. Tolerances are per device: fp32 on the CPU is exact
to rounding; CUDA kernels (flash-attn, inductor, NCCL's reductions) sum in other orders.
"""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert import device as device_module
from neobert.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
GPU_CHECK = ROOT / "scripts" / "gpu-check.sh"

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: torch.cuda.is_available() is false"


def devices(min_gpus: int = 1):
    """``cpu``, and ``cuda`` marked ``cuda`` and skipped without ``min_gpus`` GPUs."""
    gpus = torch.cuda.device_count() if CUDA else 0
    reason = NO_CUDA if not CUDA else f"needs {min_gpus} CUDA devices, this machine has {gpus}"
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(gpus < min_gpus, reason=reason)]),
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pretrain_args(out: Path, cache: Path, device: str, *extra: str) -> list[str]:
    """The debug config (2 x 64, rows of 64) on ``device``, no checkpoint, no evaluation but the last."""
    return [str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache}", f"train.device={device}",
            "train.save_every=100", "train.eval_every=0", *extra]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------------------
# Which attention kernel pretrain and bench choose


def test_flash_attention_is_chosen_on_cuda_in_bf16_when_installed(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(device_module, "flash_attn_available", lambda: True)
    assert device_module.attention_implementation(cuda, bf16=True) == "flash_attention_2"
    assert device_module.attention_implementation(cuda, bf16=False) == "sdpa"  # flash-attn takes fp16/bf16 only
    assert device_module.attention_implementation(cpu, bf16=True) == "sdpa"
    monkeypatch.setattr(device_module, "flash_attn_available", lambda: False)
    assert device_module.attention_implementation(cuda, bf16=True) == "sdpa"


def test_pretrain_builds_the_model_with_the_chosen_kernel(monkeypatch):
    """build_model asks for the kernel of its device and precision and sets it on the model
    (``eager`` stands in for flash-attn, which a CPU cannot construct); without a device it
    keeps the default."""
    from neobert.tokenizer import load_tokenizer

    asked = []
    monkeypatch.setattr(pretrain, "attention_implementation", lambda device, bf16: asked.append((device, bf16)) or "eager")
    args = pretrain.ModelArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    tokenizer = load_tokenizer()
    model = pretrain.build_model(args, tokenizer, torch.device("cpu"), True)
    assert asked == [(torch.device("cpu"), True)] and model.config._attn_implementation == "eager"
    assert pretrain.build_model(args, tokenizer).config._attn_implementation == "sdpa"


def test_bench_rows_run_and_record_the_chosen_kernel(monkeypatch, tmp_path):
    """Every row but the padded NeoBERT one runs the kernel attention_implementation picks
    (here ``eager``, for the same reason), and records it."""
    from neobert import bench

    asked = []
    monkeypatch.setattr(bench, "attention_implementation", lambda device, bf16: asked.append(bf16) or "eager")
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--seq-lens", "16", "--dtype", "fp32", "--lengths", "fixed", "--warmup", "0", "--iters", "1", "--batch-tokens", "32"]
    assert bench.main(argv + ["--json", str(out)]) == 0
    rows = {r["model"]: r["attention"] for r in json.loads(out.read_text())}
    assert rows == {"neobert-base": "eager", "neobert-base-padded": "sdpa", "modernbert-base": "eager", "bert-base": "eager"}
    assert asked and not any(asked)  # fp32 rows ask for bf16=False


# ---------------------------------------------------------------------------------------
# Attention: the padding-free kernels against the padded path


def packed_batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 40 with document-id masks: documents of unequal lengths, padding at the ends."""
    g = torch.Generator().manual_seed(0)
    docs = [[13, 20, 5], [40], [7, 9]]
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, lengths in enumerate(docs):
        start = 0
        for doc, n in enumerate(lengths, 1):
            mask[row, start:start + n] = doc
            start += n
    ids = torch.randint(5, 1000, mask.shape, generator=g).masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("device", devices())
def test_padding_free_attention_matches_the_padded_path(device, implementation):
    """Outputs at real tokens and gradients of the padding-free path (SDPA per segment, or
    flash-attn's varlen kernel) equal the padded path's (a (B, 1, L, L) document mask) with
    the same weights; outputs at padding are zeros. CUDA runs in bf16 (flash-attn's dtype)."""
    if implementation == "flash_attention_2" and not (device == "cuda" and device_module.flash_attn_available()):
        pytest.skip("flash_attn is not installed (or no CUDA device): flash_attention_2 cannot run")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    config = NeoBERTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_length=64)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(config).to(device, dtype)
    ids, mask = packed_batch(device)
    real = mask > 0

    def run(padding_free: bool):
        model.config.padding_free = padding_free
        model.zero_grad(set_to_none=True)
        out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = torch.linspace(-1, 1, out.numel(), device=device, dtype=torch.float32).view_as(out)
        (out.float() * weights)[real].sum().backward()
        return out.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    free, free_grads = run(True)
    padded, padded_grads = run(False)
    assert (free[~real] == 0).all() and (padded[~real] == 0).all()
    assert (free[real] - padded[real]).abs().max() < tol
    assert free_grads.keys() == padded_grads.keys() and len(free_grads) > 0
    for name, g in free_grads.items():
        scale = padded_grads[name].abs().max().clamp_min(1e-6)
        assert ((g - padded_grads[name]).abs().max() / scale) < tol, name


# ---------------------------------------------------------------------------------------
# Training steps


@pytest.mark.parametrize("device", devices())
def test_bf16_training_steps(device, tmp_path, cache_dir, monkeypatch):
    """train.bf16=true: 6 steps of finite losses that go down; step 1 equals fp32's within
    bf16 rounding but not exactly (autocast did run); the model was built with the kernel
    of its device in bf16."""
    asked = []
    choose = pretrain.attention_implementation
    monkeypatch.setattr(pretrain, "attention_implementation", lambda d, bf16: asked.append((d.type, bf16)) or choose(d, bf16))
    pretrain.main(pretrain_args(tmp_path / "fp32", cache_dir, device, "train.bf16=false", "train.max_steps=1"))
    pretrain.main(pretrain_args(tmp_path / "bf16", cache_dir, device, "train.bf16=true", "train.max_steps=6"))
    (fp32,), bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert asked == [(device, False), (device, True)]
    assert len(bf16) == 6 and all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < bf16[0] - 0.3, bf16
    assert bf16[0] != fp32 and abs(bf16[0] - fp32) < 0.02 * fp32, (fp32, bf16[0])


@pytest.mark.parametrize("device", devices())
def test_compiled_training_steps_match_eager_without_recompiling(device, tmp_path, cache_dir, monkeypatch):
    """train.compile=true (inductor on CUDA; aot_eager on the CPU, where inductor's C++ code
    generation takes minutes): the losses of the eager run over 4 steps, and no new graph
    after the second step (dynamo marks the shapes that changed between steps 1 and 2 dynamic once;
    after that, no batch recompiles)."""
    from torch._dynamo.utils import counters

    pretrain.main(pretrain_args(tmp_path / "eager", cache_dir, device, "train.bf16=false", "train.max_steps=4"))
    if device == "cpu":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    graphs = []
    step = pretrain.mlm_step

    def counted_step(*args, **kwargs):
        result = step(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    monkeypatch.setattr(pretrain, "mlm_step", counted_step)
    torch._dynamo.reset()
    counters.clear()
    try:
        pretrain.main(pretrain_args(tmp_path / "compiled", cache_dir, device, "train.bf16=false", "train.max_steps=4", "train.compile=true"))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 4 and graphs[0] > 0, graphs  # it compiled
    assert graphs[1:] == [graphs[1]] * 3, f"graphs compiled after each step: {graphs}"
    tol = 1e-5 if device == "cpu" else 1e-3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=tol)


@pytest.mark.parametrize("device", devices(min_gpus=2))
def test_two_process_ddp_matches_one_process(device, tmp_path, cache_dir):
    """torchrun with 2 processes (2 GPUs over NCCL, or 2 CPU processes over gloo) gives the
    losses of 1 process with the same global batch (fp32)."""
    steps = ("train.max_steps=2", "train.bf16=false")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = [sys.executable, "-m", "neobert", "pretrain", *pretrain_args(tmp_path / "one", cache_dir, device, *steps)]
    subprocess.run(one, check=True, capture_output=True, env=env, timeout=300)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neobert", "pretrain",
           *pretrain_args(tmp_path / "two", cache_dir, device, *steps)]
    proc = subprocess.run(two, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tol = 1e-5 if device == "cpu" else 1e-4
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 2 and l2 == pytest.approx(l1, abs=tol), (l1, l2)


# ---------------------------------------------------------------------------------------
# scripts/gpu-check.sh


def test_gpu_check_script_dry_mode(tmp_path, cache_dir):
    """The script's CPU dry mode runs its steps at reduced size (bench, a pretraining smoke
    run that must lower its loss) and writes logs and a summary; its test step is this
    pytest run, so it is skipped here. A bad argument is a one-line error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"), GPU_CHECK_CACHE=str(cache_dir), GPU_CHECK_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(GPU_CHECK), "--cpu", "--skip", "tests"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "PASS bench" in summary and "PASS smoke" in summary and "SKIP tests" in summary and "RESULT: PASS" in summary
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {r["model"] for r in rows} == {"neobert-base", "neobert-base-padded", "modernbert-base", "bert-base"}
    smoke = losses(tmp_path / "out" / "smoke-run")
    assert len(smoke) >= 20 and smoke[-1] < smoke[0]

    bad = subprocess.run(["bash", str(GPU_CHECK), "--steps", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--steps" in bad.stderr
    if not CUDA:  # the GPU mode on a machine without one fails at once, in one line, in the summary too
        env["OUT"] = str(tmp_path / "no-gpu")
        no_gpu = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=120)
        assert no_gpu.returncode == 1 and len(no_gpu.stderr.strip().splitlines()) == 1, no_gpu.stderr
        assert "no python whose torch sees a CUDA device" in no_gpu.stderr
        assert "RESULT: FAIL" in (tmp_path / "no-gpu" / "summary.txt").read_text()


def test_ray_launch_fills_each_nodes_command():
    """scripts/ray_launch.py: {rank}, {nodes} and {head} per node, other braces untouched; the
    command after --; a missing command or node count is an argparse error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_launch", ROOT / "scripts" / "ray_launch.py")
    ray_launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_launch)
    args = ray_launch.parse_args(["--nodes", "3", "--gpus-per-node", "8", "--", "torchrun", "--rdzv-endpoint={head}:29500",
                                  "prepare.node_rank={rank}", "prepare.nodes={nodes}", "x={a}"])
    assert (args.nodes, args.gpus_per_node, args.cpus_per_node) == (3, 8, 1)
    assert ray_launch.expand(args.command, 2, args.nodes, "node-a") == [
        "torchrun", "--rdzv-endpoint=node-a:29500", "prepare.node_rank=2", "prepare.nodes=3", "x={a}"]
    for argv in (["--nodes", "2"], ["--nodes", "0", "--", "ls"], ["--", "ls"]):
        with pytest.raises(SystemExit):
            ray_launch.parse_args(argv)

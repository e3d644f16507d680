"""Pretraining: schedule, optimizer groups, checkpoints, exact resume after SIGKILL, 2 processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert.train import common, optim

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"


def test_lr_schedule_points():
    """Warmup is linear to the peak, cosine reaches the floor at 90% of the run, then constant."""
    lr = lambda s: optim.lr_at(s, peak=1.0, warmup=10, total=100, decay_fraction=0.9, min_ratio=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way through the decay
    assert lr(89) > 0.1 and lr(90) == pytest.approx(0.1) and lr(99) == pytest.approx(0.1)
    values = [lr(s) for s in range(10, 91)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_weight_decay_skips_norms_and_biases():
    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (not ("norm" in name or name.endswith("bias"))), name
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_incomplete_checkpoints_are_ignored(tmp_path):
    from neobert import manifest

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000010").mkdir(parents=True)
    (ckpts / "step-00000010" / "state.json").write_text("{}")
    manifest.write_manifest(ckpts / "step-00000010")
    (ckpts / ".tmp-step-00000020-123").mkdir()  # killed mid-write
    (ckpts / "step-00000030").mkdir()  # no manifest (written last): not complete
    (ckpts / "step-00000030" / "state.json").write_text("{}")
    assert common.latest_checkpoint(tmp_path).name == "step-00000010"


# --------------------------------------------------------------------------------------
# End-to-end runs of the debug config in subprocesses


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pretrain_cmd(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "neobert", "pretrain", str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache}", *extra]


def run_ok(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "ref"
    run_ok(pretrain_cmd(out, cache_dir))
    return out


def test_run_directory_contract(reference_run):
    run = reference_run
    assert (run / "config.yaml").exists() and (run / "final" / "model.safetensors").exists()
    records = metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for r in train:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= r.keys()
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-00000010", "step-00000020"]
    assert (run / "tensorboard").is_dir()


def test_loss_goes_down(reference_run):
    losses = [r["loss"] for r in metrics(reference_run) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_final_is_a_transformers_directory(reference_run):
    from transformers import AutoModelForMaskedLM, pipeline

    model = AutoModelForMaskedLM.from_pretrained(reference_run / "final")
    assert isinstance(model, NeoBERTForMaskedLM)
    preds = pipeline("fill-mask", model=str(reference_run / "final"), device="cpu")("the [MASK] of the city.", top_k=2)
    assert len(preds) == 2
    # the saved tokenizer knows the length the model was trained at (debug.yaml: 64), not a default
    assert preds and json.loads((reference_run / "final" / "tokenizer_config.json").read_text())["model_max_length"] == 64
    # trained with the sparse head, shared with full logits (what Trainer's MLM metrics index)
    ids = torch.tensor([[101, 2000, 103, 2003, 102]])
    labels = torch.full_like(ids, -100)
    labels[0, 2] = 2000
    assert model(input_ids=ids, labels=labels).logits.shape == (1, 5, model.config.vocab_size)


def test_plot_writes_png(reference_run):
    from neobert.train.plot import plot_run

    png = plot_run(reference_run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigkill_and_resume_is_bitwise_identical(reference_run, tmp_path, cache_dir):
    """Kill the run at some moment after its first checkpoint, rerun the same command: same final weights."""
    out = tmp_path / "killed"
    cmd = pretrain_cmd(out, cache_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000010" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.1)  # somewhere in steps 11-20 (or while writing)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # interrupted mid-way: otherwise the rerun below would have nothing to resume
    assert common.latest_checkpoint(out).name == "step-00000010" and not (out / "final").exists(), "the run finished before the kill"
    assert "resumed from" in run_ok(cmd).stdout
    a = (reference_run / "final" / "model.safetensors").read_bytes()
    b = (out / "final" / "model.safetensors").read_bytes()
    assert a == b
    # the resumed metrics read like one uninterrupted run
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 21))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, cache_dir):
    """5 steps of the debug config in one process; the held-out evaluation at the end takes 3
    micro-batches, which 2 processes split unevenly (2 and 1)."""
    out = tmp_path_factory.mktemp("runs") / "one"
    run_ok(pretrain_cmd(out, cache_dir, *DISTRIBUTED_STEPS))
    return out


DISTRIBUTED_STEPS = ("train.max_steps=5", "train.save_every=100", "train.eval_every=0", "train.eval_batches=3")


@pytest.mark.parametrize("fsdp", ["false", "true"], ids=["ddp", "fsdp2"])
def test_two_processes_match_one(one_process_run, tmp_path, cache_dir, fsdp):
    """torchrun with 2 CPU processes (gloo), DDP or FSDP2 (fully_shard per block), gives the
    losses and the held-out evaluation of 1 process with the same global batch."""
    two = tmp_path / "two"
    cmd = pretrain_cmd(two, cache_dir, *DISTRIBUTED_STEPS, f"train.fsdp={fsdp}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neobert", *cmd[3:]]
    run_ok(torchrun, timeout=300)
    l1 = [r["loss"] for r in metrics(one_process_run) if "loss" in r]
    l2 = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(l1) == len(l2) == 5
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-5, (l1, l2)
    (e1,), (e2,) = ([r for r in metrics(run) if "eval_loss" in r] for run in (one_process_run, two))
    assert e1["eval_tokens"] == e2["eval_tokens"] and e1["eval_loss"] == pytest.approx(e2["eval_loss"], abs=1e-5)


def test_a_step_under_bf16_autocast(reference_run, tmp_path, cache_dir):
    """train.bf16=true: the steps run under bf16 autocast (losses close to fp32's, not equal:
    the matmuls were rounded) and the weights stay fp32 master weights."""
    from safetensors.torch import load_file

    from neobert.train import pretrain

    out = tmp_path / "bf16"
    pretrain.main([str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "train.bf16=true", "train.max_steps=2"])
    fp32 = [r["loss"] for r in metrics(reference_run) if "loss" in r][:2]
    bf16 = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(bf16) == 2 and all(math.isfinite(x) for x in bf16)
    for a, b in zip(fp32, bf16):
        assert a != b and abs(a - b) < 0.02 * a, (fp32, bf16)
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_a_step_with_torch_compile(reference_run, tmp_path, cache_dir, monkeypatch):
    """train.compile=true: the model runs through torch.compile (dynamo graphs and AOT autograd;
    the aot_eager backend, because inductor's C++ code generation takes minutes on a CPU),
    with the losses of the eager run and checkpoints under the plain parameter names."""
    import functools

    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from neobert.train import pretrain

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "compiled"
    try:
        pretrain.main([str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "train.compile=true", "train.max_steps=2"])
        assert counters["stats"]["unique_graphs"] > 0  # it did compile
    finally:
        torch._dynamo.reset()
    eager = [r["loss"] for r in metrics(reference_run) if "loss" in r][:2]
    compiled = [r["loss"] for r in metrics(out) if "loss" in r]
    assert compiled == pytest.approx(eager, abs=1e-5)
    names = load_file(str(reference_run / "checkpoints" / "step-00000010" / "model.safetensors")).keys()
    assert load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors")).keys() == names


def test_compiled_pretraining_compiles_once_for_every_batch_layout(tmp_path, cache_dir, monkeypatch):
    """train.compile=true with split packing (every micro-batch has its own token count,
    documents and masked tokens): the training step's graph is compiled by the first
    micro-batch and never again, with no graph break at the attention (the compiled
    losses equal the eager ones in test_a_step_with_torch_compile and, batch by batch, in
    test_attention.py)."""
    import functools

    from torch._dynamo.testing import CompileCounterWithBackend

    from neobert.train import pretrain

    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    frames, layouts = [], set()
    step = pretrain.mlm_step

    def counted_step(model, micro, *args, **kwargs):
        result = step(model, micro, *args, **kwargs)
        frames.append(backend.frame_count)
        layouts.update(tuple(b["inputs"]["cu_seq_lens_q"].tolist()) for b in micro)
        return result

    monkeypatch.setattr(pretrain, "mlm_step", counted_step)
    torch._dynamo.reset()
    try:  # no held-out split: its evaluation (no gradients) would be a graph of its own
        pretrain.main([str(DEBUG), f"train.output_dir={tmp_path / 'compiled'}", f"data.cache_dir={cache_dir}", "train.compile=true",
                       "data.packing=split", "data.heldout_fraction=0", "train.max_steps=3"])
    finally:
        torch._dynamo.reset()
    assert len(layouts) > 2 and frames == [1, 1, 1]  # several layouts (6 micro-batches), one graph


def test_bad_override_is_one_line_error(tmp_path, cache_dir):
    proc = subprocess.run(pretrain_cmd(tmp_path / "x", cache_dir, "train.max_stepz=3"), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_stepz" in lines[0] and "train.max_steps" in lines[0]
    proc = subprocess.run(pretrain_cmd(tmp_path / "x", cache_dir, "train.max_steps=many"), capture_output=True, text=True)
    assert proc.returncode == 2 and "train.max_steps" in proc.stderr and "integer" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_summary_matches_last_evaluation(reference_run, capsys):
    """`neobert summary` re-scores the final model: same held-out accuracy as the run's last eval."""
    from neobert.train.summary import summarize

    result = summarize(reference_run)
    last = [r for r in metrics(reference_run) if "eval_accuracy" in r][-1]
    assert result["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    assert 0 < result["baseline_accuracy"] < 0.2
    out = capsys.readouterr().out
    assert "held-out masked-token accuracy" in out and "->" in out


def test_transformers_mlm_with_tied_weights_checkpoints_and_resumes(tmp_path, cache_dir):
    """`model.hf_config` trains a transformers BERT (decoder tied to the word embedding):
    its checkpoints save (safetensors refuses shared tensors unless they are split) and a
    resumed run ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, BertConfig

    hf = tmp_path / "bert.json"
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to_json_file(hf)
    args = (f"model.hf_config={hf}", "data.packing=none", "data.max_length=64", "train.save_every=2", "train.keep_checkpoints=3")
    full, part = tmp_path / "full", tmp_path / "part"
    run_ok(pretrain_cmd(full, cache_dir, *args, "train.max_steps=4"))
    run_ok(pretrain_cmd(part, cache_dir, *args, "train.max_steps=2"))
    run_ok(pretrain_cmd(part, cache_dir, *args, "train.max_steps=4"))  # resumes from step 2
    assert (full / "checkpoints" / "step-00000004" / "model.safetensors").exists()
    model = AutoModelForMaskedLM.from_pretrained(full / "final")
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    a = load_file(str(full / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_heldout_split_trains_and_summarizes_without_evaluation(tmp_path, cache_dir, capsys):
    """data.heldout_fraction=0 is valid: the run trains with no held-out evaluation, and
    `summary` says there is none instead of failing on the empty split."""
    from neobert.train import pretrain, summary

    out = tmp_path / "no-heldout"
    pretrain.main([str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "data.heldout_fraction=0",
                   "train.max_steps=2", "train.eval_every=1"])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2] and not any("eval_loss" in r for r in records)
    assert summary.summarize(out) == {}
    assert "no held-out documents" in capsys.readouterr().out


def test_heldout_evaluation_scores_each_row_once():
    """A held-out split smaller than eval_batches micro-batches: every row is scored exactly once,
    over one process or split between two (no row index wraps around to a duplicate), and both
    processes run the same number of forward passes (collective under FSDP and DDP)."""
    from neobert.data import MLMMasker, PackedRows, TokenCorpus
    from neobert.train.pretrain import PretrainConfig, heldout_batches

    docs = [[101, *range(1000 + 10 * d, 1005 + 10 * d), 102] for d in range(10)]  # 10 distinct documents: batches of 4, 4, 2
    rows = PackedRows(TokenCorpus.from_documents(docs), max_length=16, packing="none", seed=0)
    cfg = PretrainConfig()
    cfg.data.packing, cfg.data.max_length = "none", 16
    cfg.train.micro_batch_size, cfg.train.eval_batches = 4, 16
    masker = MLMMasker({"mask_token_id": 103, "special_ids": [0, 100, 101, 102, 103], "vocab_size": 30522})

    def scored(rank=0, world=1):  # per batch: its rows' original ids (labels where masked), padding dropped; None if it scores nothing
        return [None if (b["labels"] == -100).all() else
                [tuple(x for x in row.tolist() if x) for row in torch.where(b["labels"] != -100, b["labels"], b["input_ids"])]
                for b in heldout_batches(rows, masker, cfg, rank, world)]

    one = scored()
    assert [len(b) for b in one] == [4, 4, 2] and sorted(r for b in one for r in b) == sorted(map(tuple, docs))
    first, second = scored(0, 2), scored(1, 2)
    assert len(first) == len(second) == 2 and second[1] is None  # the second process's extra pass scores nothing
    assert sorted(r for b in first + second[:1] for r in b) == sorted(map(tuple, docs))


def test_micro_batch_without_masked_tokens_adds_nothing_to_the_step():
    """A step whose first micro-batch has no maskable token (rows of [CLS] [SEP] only): the loss
    is the second micro-batch's mean over its masked tokens and the gradients are that loss's,
    not NaN; a step with no masked token at all reports 0 and leaves zero gradients."""
    import copy

    from neobert.data import MLMMasker, collate
    from neobert.data.loader import MicroBatches, model_inputs
    from neobert.data.packing import document_row
    from neobert.train.common import Dist
    from neobert.train.pretrain import PretrainConfig, mlm_step

    g = torch.Generator().manual_seed(0)
    empty = [document_row(torch.tensor([101, 102]).numpy(), 16)] * 4
    text = [document_row(torch.cat([torch.tensor([101]), torch.randint(1000, 2000, (14,), generator=g), torch.tensor([102])]).numpy(), 16)
            for _ in range(4)]

    class Rows:  # step 0 reads rows 0-7: a micro-batch of `empty`, then one of `text`
        def __init__(self, rows):
            self.all = rows

        def __len__(self):
            return len(self.all)

        def rows(self, indices):
            return [self.all[i] for i in indices]

    cfg = PretrainConfig()
    cfg.data.packing, cfg.data.max_length = "none", 16
    cfg.train.micro_batch_size, cfg.train.bf16, cfg.train.seed = 4, False, 0
    masker = MLMMasker({"mask_token_id": 103, "special_ids": [0, 100, 101, 102, 103], "vocab_size": 2000})
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_length=16))
    reference = copy.deepcopy(model)

    def step_zero(rows):  # the two micro-batches of step 0, as the loader builds them
        return list(MicroBatches(Rows(rows), masker, "none", 16, seed=0, micro_batch_size=4, rows_per_step=8, accumulation=2,
                                 rank=0, first_step=0, max_steps=1))

    loss, _ = mlm_step(model, step_zero(empty + text), cfg, Dist())
    first = masker(collate(empty, "none", 16), seed=0, step=0, micro=0)
    second = masker(collate(text, "none", 16), seed=0, step=0, micro=1)
    assert (first["labels"] == -100).all() and (second["labels"] != -100).sum() > 0
    expected = reference(**model_inputs(second, flat=False)).loss  # the model's own mean, on the padded batch
    expected.backward()
    assert math.isfinite(loss) and loss == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)

    model.zero_grad()
    loss, _ = mlm_step(model, step_zero(empty * 2), cfg, Dist())
    assert loss == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_metrics_log_stays_json_with_non_finite_numbers(tmp_path):
    """A diverged loss is written as null: json.dumps would write NaN, which JSON readers refuse."""
    from neobert.train.loop import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}

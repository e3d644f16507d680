"""Faults and bad input, end to end (issue 13): each gets a one-line error, a safe refusal
or the documented fallback, with nothing lost and nothing half-written left.

Interruptions kill real ``neobert pretrain`` subprocesses (SIGKILL while a checkpoint or
the final model is being written, a full disk mid-write); bad input goes through the
command line in-process (``neobert.cli.main``) so each check costs no interpreter start.
Runs use configs/debug.yaml (a 2 x 64 model, seconds on a CPU). docs/reliability.md is the
table of what is tested here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neobert import cli, rundir

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pretrain_cmd(out, cache, *extra) -> list[str]:
    return [sys.executable, "-m", "neobert", "pretrain", str(DEBUG), f"train.output_dir={out}", f"data.cache_dir={cache}", *extra]


def run_ok(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def nb(capsys, *argv) -> tuple[int, str]:
    """``neobert ARGV`` in this process: (exit status, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    # the error is the last line, once progress bars (which redraw with \r) are set aside
    lines = [part for line in err.splitlines() for part in line.split("\r") if part.strip() and "it/s]" not in part and "s/it]" not in part]
    last = lines[-1].strip()
    assert last.startswith("error: ") and all(n in last for n in needles), err[-2000:]
    return last


def final_bytes(run: Path) -> bytes:
    return (run / "final" / "model.safetensors").read_bytes()


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def wait_for(predicate, proc, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ref"
    run_ok(pretrain_cmd(out, cache_dir))
    return out


def partial_copy(reference: Path, to: Path, keep_steps: tuple[int, ...] = (10, 20)) -> Path:
    """A copy of the reference run as an interrupted run would leave it: no final/, only
    the checkpoints of ``keep_steps``."""
    shutil.copytree(reference, to, ignore=shutil.ignore_patterns(rundir.LOCK))
    rundir.safe_rmtree(to / "final")
    for ck in (to / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) not in keep_steps:
            rundir.safe_rmtree(ck)
    return to


# --------------------------------------------------------------------------------------
# Interruptions (real subprocesses, SIGKILL)


def test_second_run_on_a_busy_directory_is_refused_naming_the_pid(reference, tmp_path, cache_dir):
    """While a run holds its directory, a second one gets one line naming the first's PID
    and touches nothing: the first ends with the reference's weights and metrics. (The
    first is paused with SIGSTOP once it holds the directory, so the debug run cannot end
    before the second one starts.)"""
    out = tmp_path / "run"
    cmd = pretrain_cmd(out, cache_dir)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(lambda: (out / rundir.MARKER).exists(), first, "the run claimed its directory")
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        first.send_signal(signal.SIGCONT)
        assert_one_line_error(second.returncode, second.stderr, "in use by another neobert run", f"process {first.pid}")
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert final_bytes(out) == final_bytes(reference)
    assert train_steps(out) == list(range(1, 21))


def test_kill_mid_checkpoint_leaves_only_a_temporary_that_the_rerun_removes(reference, tmp_path, cache_dir):
    """SIGKILL while the step-20 checkpoint is written: no step-00000020 appears, only its
    temporary directory; the rerun removes it, resumes from step 10 and ends with the
    reference's weights."""
    out = partial_copy(reference, tmp_path / "run", keep_steps=(10,))
    cmd = pretrain_cmd(out, cache_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = out / "checkpoints"
    try:
        wait_for(lambda: any(p.name.startswith(".tmp-step-00000020") for p in ckpts.iterdir()), proc, "the step-20 checkpoint write")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir()) and not (ckpts / "step-00000020").exists()
    rerun = run_ok(cmd)
    assert "removed 1 temporary directory of interrupted writers" in rerun.stdout
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert final_bytes(out) == final_bytes(reference)
    assert train_steps(out) == list(range(1, 21))


def test_kill_during_final_export_and_torn_metrics_line(reference, tmp_path, cache_dir):
    """SIGKILL while final/ is written (the run resumed at its last step, so it goes straight
    to the export): no final/ appears; the rerun removes the temporary directory, drops a
    torn last metrics line with a warning, and exports the reference's weights."""
    out = partial_copy(reference, tmp_path / "run")
    cmd = pretrain_cmd(out, cache_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(lambda: any(p.name.startswith(".tmp-final") for p in out.iterdir()), proc, "the final export")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "final").exists()
    with open(out / "metrics.jsonl", "a") as f:  # a full disk cut this append short
        f.write('{"step": 21, "loss": 7.')
    rerun = run_ok(cmd)
    assert "dropped a torn last line" in rerun.stderr
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    assert final_bytes(out) == final_bytes(reference)
    assert train_steps(out) == list(range(1, 21))
    from neobert.train.plot import plot_run

    (out / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes() + b'{"step": 21, "lo')
    assert plot_run(out).is_file()  # neobert plot reads past a torn line too


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, cache_dir):
    """A truncated model.safetensors in the newest checkpoint: a one-line warning naming it,
    resume from step 10, and the same final weights as the uninterrupted run."""
    out = partial_copy(reference, tmp_path / "run")
    newest = out / "checkpoints" / "step-00000020"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_ok(pretrain_cmd(out, cache_dir))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-00000020" in warnings[0] and "model.safetensors has" in warnings[0] and "step-00000010" in warnings[0]
    assert final_bytes(out) == final_bytes(reference)
    assert (out / "checkpoints" / "damaged-step-00000020").is_dir()  # kept for inspection, never resumed or pruned into


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def test_full_disk_mid_checkpoint_is_one_line_and_resumes_exactly_once_freed(reference, tmp_path, cache_dir):
    """The step-20 checkpoint does not fit: one line naming the path, nothing half-written
    kept; with space again, the rerun resumes from step 10 to the reference's weights.

    As root the run directory is a 70 MB tmpfs (a real ENOSPC); otherwise the run gets a
    file-size limit (RLIMIT_FSIZE: the write fails with EFBIG the same way)."""
    out = tmp_path / "disk" / "run"
    out.parent.mkdir()
    limit = 70 << 20  # one checkpoint (48 MB) fits, a second does not
    mounted = can_mount_tmpfs() and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(out.parent)]).returncode == 0
    try:
        preexec = None
        if not mounted:
            import resource

            def preexec():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))  # the 16 MB model fits, the 32 MB optimizer.pt does not

        proc = subprocess.run(pretrain_cmd(out, cache_dir, "train.save_every=10"), capture_output=True, text=True, env=ENV, preexec_fn=preexec)
        last = assert_one_line_error(proc.returncode, proc.stderr, "cannot write", "the partial write was removed")
        if mounted:
            assert "no space left on device" in last
        assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
        assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000010"] or not mounted
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={4 * limit}", str(out.parent)], check=True)
        run_ok(pretrain_cmd(out, cache_dir))
        assert final_bytes(out) == final_bytes(reference)
    finally:
        if mounted:
            subprocess.run(["umount", str(out.parent)])


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_tokenizer_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL the run while its 2 tokenizer processes work: they end too, and the next
    run removes the dead build's temporary corpus directory."""
    cache = tmp_path / "cache"
    words = "the river town market bridge morning station letter garden winter".split()
    docs = tmp_path / "docs.jsonl"  # enough text that tokenizing it takes a while, quick to read
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 10] for j in range(400))}) + "\n" for i in range(40000)))
    cmd = pretrain_cmd(tmp_path / "run", cache, f"data.source={docs}", "data.max_documents=null", "data.num_proc=2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(lambda: len(children_of(proc.pid)) >= 2, proc, "the tokenizer processes", timeout=120)
        workers = children_of(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20
    while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _state(w)], "tokenizer workers outlived their parent"
    stale = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert stale, "the killed build should have left its temporary directory"
    from neobert.data import corpus

    assert [p.name for p in corpus.remove_stale_builds(cache)] == [p.name for p in stale]


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "running"
    except OSError:
        return "zombie"


# --------------------------------------------------------------------------------------
# Run directories: ownership


def test_resume_none_into_an_older_run_is_refused_then_overwrite_starts_clean(reference, tmp_path, cache_dir, capsys):
    out = partial_copy(reference, tmp_path / "old")
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "train.resume=none", "train.max_steps=4")
    assert_one_line_error(code, err, "holds an earlier run", "train.overwrite=true")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000020"]
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "train.resume=none",
                   "train.overwrite=true", "train.max_steps=4", "train.save_every=2", "train.eval_every=0")
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert train_steps(out) == [1, 2, 3, 4]


def test_output_dir_dot_with_user_files_and_empty_output_dir(tmp_path, cache_dir, capsys, monkeypatch):
    work = tmp_path / "thesis"
    (work / "final").mkdir(parents=True)
    (work / "final" / "thesis.txt").write_text("three years")
    monkeypatch.chdir(work)
    code, err = nb(capsys, "pretrain", DEBUG, "train.output_dir=.", f"data.cache_dir={cache_dir}")
    assert_one_line_error(code, err, "train.output_dir=. holds files neobert did not write", "final")
    code, err = nb(capsys, "pretrain", DEBUG, "train.output_dir=.", f"data.cache_dir={cache_dir}", "train.overwrite=true")
    assert_one_line_error(code, err, "final in it was not written by neobert")
    assert (work / "final" / "thesis.txt").read_text() == "three years"
    code, err = nb(capsys, "pretrain", DEBUG, "train.output_dir=", f"data.cache_dir={cache_dir}")
    assert_one_line_error(code, err, "train.output_dir is empty")
    assert sorted(p.name for p in work.iterdir()) == ["final"]


def test_glue_never_deletes_a_user_file_in_a_task_directory(tmp_path, capsys):
    from neobert import NeoBERTConfig, NeoBERTForMaskedLM

    torch.manual_seed(0)
    model = tmp_path / "model"
    NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(model)
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("sentence\tlabel\ngreat film\t1\nawful plot\t0\ngreat cast\t1\nawful music\t0\n")
    out = tmp_path / "U"
    (out / "sst2").mkdir(parents=True)
    (out / "sst2" / "notes.txt").write_text("mine")
    code, err = nb(capsys, "glue", "all", "--model", model, "--data-dir", tmp_path / "glue", "--output-dir", out,
                   "train.max_steps=1", "train.max_length=32", "train.bf16=false")
    assert_one_line_error(code, err, str(out / "sst2"), "neobert did not")
    assert (out / "sst2" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------
# Checkpoints


def test_missing_optimizer_state_is_an_error_not_a_reset(reference, tmp_path, cache_dir, capsys):
    out = partial_copy(reference, tmp_path / "run", keep_steps=(10,))
    (out / "checkpoints" / "step-00000010" / "optimizer.pt").unlink()
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={out}", f"data.cache_dir={cache_dir}")
    assert_one_line_error(code, err, "no intact checkpoint", "step-00000010: optimizer.pt is missing")
    assert not (out / "final").exists()
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / 'other'}", f"data.cache_dir={cache_dir}",
                   f"train.resume={out / 'checkpoints' / 'step-00000010'}")
    assert_one_line_error(code, err, "step-00000010", "optimizer.pt is missing")


def test_resuming_with_another_model_shape_is_refused(reference, tmp_path, cache_dir, capsys):
    out = partial_copy(reference, tmp_path / "run")
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={out}", f"data.cache_dir={cache_dir}", "model.hidden_size=32", "train.max_steps=30")
    assert_one_line_error(code, err, "model.hidden_size", "64", "32")


# --------------------------------------------------------------------------------------
# Config values: one line, before any data is read


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.micro_batch_size=0", ("train.micro_batch_size=0", "positive")),
        ("train.micro_batch_size=-4", ("train.micro_batch_size=-4", "positive")),
        ("train.save_every=0", ("train.save_every=0", "positive")),
        ("train.log_every=0", ("train.log_every=0", "positive")),
        ("train.lr=-1e-3", ("train.lr=-0.001", "positive")),
        ("train.lr=.nan", ("train.lr=nan", "positive")),
        ("train.batch_tokens=-512", ("train.batch_tokens=-512", "positive")),
        ("train.max_steps=0", ("train.max_steps=0", "positive")),
        ("model.num_attention_heads=3", ("model.num_attention_heads=3", "model.hidden_size=64")),
        ("train.device=tpu", ("train.device='tpu'",)),
    ],
)
def test_bad_numbers_are_one_line_before_any_work(tmp_path, capsys, override, needles):
    out = tmp_path / "run"
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", override)
    assert_one_line_error(code, err, *needles)
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / 'run'}", "train.device=cuda")
    assert_one_line_error(code, err, "train.device=cuda", "no CUDA device")


def test_config_path_that_is_a_directory_or_binary(tmp_path, capsys):
    assert_one_line_error(*nb(capsys, "pretrain", tmp_path), str(tmp_path), "is a directory")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_one_line_error(*nb(capsys, "pretrain", binary), str(binary), "not a text")


def test_output_dir_that_is_a_file_or_not_writable_before_the_corpus(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={target}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(code, err, "is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    where = ro / "run" if not os.access(ro, os.W_OK) else Path("/sys/neobert-test-run")  # root writes through mode bits
    try:
        code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={where}", f"data.cache_dir={tmp_path / 'cache'}")
    finally:
        ro.chmod(0o755)
    assert_one_line_error(code, err, str(where))
    assert not (tmp_path / "cache").exists()  # refused before the corpus was read


# --------------------------------------------------------------------------------------
# Data, tokenizer, cache


def test_bad_parquet_tokenizer_and_corrupt_cache_are_one_line(tmp_path, cache_dir, reference, capsys):
    fake = tmp_path / "docs.parquet"
    fake.write_text("this is not parquet")
    args = ("pretrain", DEBUG, f"train.output_dir={tmp_path / 'a'}")
    assert_one_line_error(*nb(capsys, *args, f"data.source={fake}", f"data.cache_dir={tmp_path / 'c1'}"), str(fake), "not a parquet file")
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": "1.0", "model": ')
    assert_one_line_error(*nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / 'b'}", f"data.tokenizer={tok}"), str(tok))
    # the cache of local files (neobert.data.corpus), built here from a small JSONL source
    from neobert.data import DataConfig, prepare_corpus
    from neobert.tokenizer import load_tokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} about the river and the town"}) + "\n" for i in range(60)))
    built = tmp_path / "built"
    prepare_corpus(DataConfig(source=str(docs), cache_dir=str(built), max_length=64, max_documents=300), load_tokenizer(), verbose=False)  # debug.yaml's recipe
    for damaged, content in (("train.offsets.npy", b"garbage"), ("meta.json", b"{")):
        cache = tmp_path / f"cache-{damaged}"
        shutil.copytree(built, cache)
        (next(cache.glob("corpus-*")) / damaged).write_bytes(content)
        code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / damaged}", f"data.source={docs}", f"data.cache_dir={cache}")
        assert_one_line_error(code, err, "corrupt corpus cache", damaged, "delete")
    # the built-in corpus's prepared shards (neobert.data.shards)
    for damaged in ("offsets.npy", "meta.json"):
        cache = tmp_path / f"prepared-{damaged}"
        shutil.copytree(cache_dir, cache)
        (next(cache.glob("prepared-*/shards/0*")) / damaged).write_bytes(b"garbage")
        code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / ('p' + damaged)}", f"data.cache_dir={cache}")
        assert_one_line_error(code, err, "corrupt prepared shard")


# --------------------------------------------------------------------------------------
# Models from the command line


@pytest.fixture(scope="module")
def small_vocab_model(reference, tmp_path_factory) -> Path:
    """The reference model cut to a 1000-token vocabulary (the tokenizer has 30522)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("smallvocab") / "model"
    shutil.copytree(reference / "final", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(path / "model.safetensors"))
    save_file({k: v[:1000].clone() if v.shape[0] == 30522 else v for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_embed_refuses_models_whose_weights_do_not_fit(reference, tmp_path, capsys, small_vocab_model):
    from safetensors.torch import load_file, save_file

    missing = tmp_path / "missing"
    shutil.copytree(reference / "final", missing)
    sd = load_file(str(missing / "model.safetensors"))
    del sd["model.transformer_encoder.0.qkv.weight"]
    save_file(sd, str(missing / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(*nb(capsys, "embed", "--model", missing, "hello"), "missing", "transformer_encoder.0.qkv.weight")
    truncated = tmp_path / "truncated"
    shutil.copytree(reference / "final", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*nb(capsys, "embed", "--model", truncated, "hello"), str(truncated), "cannot read model.safetensors")
    shape = tmp_path / "shape"
    shutil.copytree(reference / "final", shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (shape / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*nb(capsys, "embed", "--model", shape, "hello"), str(shape))
    assert_one_line_error(*nb(capsys, "embed", "--model", small_vocab_model, "hello"), "30522 tokens", "1000")


def test_pretrain_init_from_a_smaller_vocabulary_is_one_line(small_vocab_model, tmp_path, cache_dir, capsys):
    code, err = nb(capsys, "pretrain", DEBUG, f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", f"model.init_from={small_vocab_model}")
    assert_one_line_error(code, err, "model.init_from", "1000", "30522")


def test_embed_input_and_output_problems_are_caught_first(reference, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(*nb(capsys, "embed", "--model", reference / "final", "--input", latin), f"{latin} line 2", "UTF-8")
    # the output directory is checked before the model is even loaded
    target = tmp_path / "missing-dir" / "out.npy"
    assert_one_line_error(*nb(capsys, "embed", "--model", tmp_path / "no-such-model", "--output", target, "hello"), str(target.parent))


def test_sts_with_one_pair_is_one_line(reference, tmp_path, capsys):
    data = tmp_path / "sts.tsv"
    data.write_text("sentence1\tsentence2\tscore\na cat sits\ta dog runs\t3.0\n")
    assert_one_line_error(*nb(capsys, "eval", "sts", "--model", reference / "final", "--data", data), str(data), "2 pairs")


def test_finetune_refuses_an_empty_label_cell_with_file_and_line(tmp_path, capsys):
    from neobert.data.glue import load_labelled
    from neobert.errors import UserError

    data = tmp_path / "labels.csv"
    data.write_text("text,label\ngood film,pos\nbad film,\nok film,neg\n")
    with pytest.raises(UserError, match=f"{data}:3: empty label"):
        load_labelled(data, data)
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": null}\n')
    with pytest.raises(UserError, match=f"{jsonl}:2: empty label"):
        load_labelled(jsonl, jsonl)

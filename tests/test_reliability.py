"""Run directories, checkpoint manifests, validation and strict loading (issue 13).

The first half tests the pieces (``neobert.rundir``, ``neobert.manifest``,
``neobert.validate``, ``neobert.loading``) directly; the second runs the commands in
subprocesses, killing them where the fault is an interruption. docs/reliability.md lists
every fault and bad input tested here with what it gets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neobert import manifest, rundir, validate
from neobert.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard")


# --------------------------------------------------------------------------------------
# Ownership, claiming, lock


def test_safe_rmtree_removes_only_what_neobert_created(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    rundir.mark_owned(mine, "test")
    (mine / "a.bin").write_bytes(b"x")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(mine)
    rundir.safe_rmtree(mine)
    assert not mine.exists()
    with pytest.raises(UserError, match="neobert did not create it"):
        rundir.safe_rmtree(theirs)
    assert (theirs / "thesis.txt").read_text() == "years of work"
    with pytest.raises(UserError):
        rundir.safe_rmtree(link)  # a symlink, even to an owned directory, is not followed
    rundir.safe_rmtree(tmp_path / "absent")  # nothing to do


def test_claim_new_empty_and_own_run(tmp_path):
    fresh = rundir.claim(str(tmp_path / "run"), "pretrain", ENTRIES)
    marker = json.loads((tmp_path / "run" / rundir.MARKER).read_text())
    assert marker["run_id"] == fresh.run_id and marker["command"] == "pretrain" and not fresh.resumable
    fresh.release()
    again = rundir.claim(str(tmp_path / "run"), "pretrain", ENTRIES, resume="auto")
    assert again.resumable and again.run_id == fresh.run_id  # resume=auto continues its own run
    again.release()
    (tmp_path / "empty").mkdir()
    rundir.claim(str(tmp_path / "empty"), "pretrain", ENTRIES).release()


def test_claim_refuses_foreign_contents_and_other_commands(tmp_path):
    user = tmp_path / "user"
    (user / "final").mkdir(parents=True)
    (user / "final" / "thesis.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files neobert did not write"):
        rundir.claim(str(user), "pretrain", ENTRIES)
    # overwrite=true still refuses: final/ is a name the run writes, and it is the user's
    with pytest.raises(UserError, match="final in it was not written by neobert"):
        rundir.claim(str(user), "pretrain", ENTRIES, overwrite=True)
    assert (user / "final" / "thesis.txt").read_text() == "mine"
    # a user's file elsewhere in the directory survives an overwrite
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    rundir.claim(str(notes), "pretrain", ENTRIES, overwrite=True).release()
    assert (notes / "notes.txt").read_text() == "keep" and (notes / rundir.MARKER).is_file()

    other = rundir.claim(str(tmp_path / "c"), "contrastive", ENTRIES)
    other.release()
    with pytest.raises(UserError, match="holds a `neobert contrastive` run"):
        rundir.claim(str(tmp_path / "c"), "pretrain", ENTRIES)


def test_resume_none_into_an_earlier_run_is_refused_and_overwrite_replaces_only_neobert_files(tmp_path):
    run = rundir.claim(str(tmp_path / "r"), "pretrain", ENTRIES)
    ckpt = rundir.ensure_owned_dir(tmp_path / "r" / "checkpoints", "checkpoints") / "step-00000010"
    ckpt.mkdir()
    rundir.mark_owned(ckpt)
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "r" / "README.txt").write_text("the user's")
    run.release()
    with pytest.raises(UserError, match="earlier run and train.resume=none"):
        rundir.claim(str(tmp_path / "r"), "pretrain", ENTRIES, resume="none")
    assert ckpt.is_dir()
    new = rundir.claim(str(tmp_path / "r"), "pretrain", ENTRIES, resume="none", overwrite=True)
    assert new.run_id != run.run_id
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()
    assert (tmp_path / "r" / "README.txt").read_text() == "the user's"
    new.release()


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_output_dir_is_refused(value):
    with pytest.raises(UserError, match="train.output_dir is empty"):
        rundir.check_output_dir(value)


def test_output_dir_that_is_a_file_or_read_only_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        rundir.check_output_dir(str(tmp_path / "f"))
    with pytest.raises(UserError, match="is a file"):
        rundir.check_output_dir(str(tmp_path / "f" / "run"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # root writes through permission bits: there, a sysfs directory stands in for a read-only place
    target = ro / "run" if not os.access(ro, os.W_OK) else Path("/sys/neobert-test-run")
    try:
        with pytest.raises(UserError, match="not writable|cannot create it"):
            rundir.claim(str(target), "pretrain", ENTRIES)
    finally:
        ro.chmod(0o755)


HOLDER = """
import sys, time
from neobert import rundir
run = rundir.claim(sys.argv[1], "pretrain", ("final",))
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    """A second claim while a (real) process holds the directory is refused naming its PID;
    once that process is SIGKILLed the kernel drops the lock and the directory is free."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another neobert run \\(process {holder.pid}\\)"):
            rundir.claim(str(tmp_path / "run"), "pretrain", ("final",))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.claim(str(tmp_path / "run"), "pretrain", ("final",)).release()


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    stale = tmp_path / f".tmp-step-00000030-{rundir.HOST}-{dead.pid}"
    live = tmp_path / f".tmp-final-{rundir.HOST}-{os.getppid()}"  # the parent of this test: alive
    foreign = tmp_path / f".tmp-final-{rundir.HOST}-{dead.pid}-x"
    corpus = tmp_path / f"corpus-news-abc.tmp-{rundir.HOST}-{dead.pid}-k2j3"
    for d in (stale, live, corpus):
        d.mkdir()
        rundir.mark_owned(d)
    foreign.mkdir()  # no ownership file: not ours, kept
    removed = rundir.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, corpus])
    assert live.is_dir() and foreign.is_dir()


# --------------------------------------------------------------------------------------
# Manifest


def _checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "optimizer.pt").write_bytes(os.urandom(8192))
    (path / "rng.pt").write_bytes(os.urandom(1024))
    (path / "state.json").write_text('{"step": 10}')
    manifest.write_manifest(path, run_id="abc", step=10)
    return path


def test_manifest_lists_size_and_checksum_of_every_file(tmp_path):
    import hashlib

    ck = _checkpoint(tmp_path / "step-00000010")
    m = json.loads((ck / "manifest.json").read_text())
    assert m["run_id"] == "abc" and set(m["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    for name, entry in m["files"].items():
        data = (ck / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest.verify(ck) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:5000]), "optimizer.pt has 5000 bytes"),
        (lambda c: (c / "rng.pt").write_bytes(b""), "rng.pt has 0 bytes"),
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]), "model.safetensors has 100 bytes"),
        (lambda c: (c / "state.json").write_text('{"step": 99}'), "state.json has changed bytes"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is damaged"),
        (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage, problem):
    old = _checkpoint(tmp_path / "step-00000010")
    new = _checkpoint(tmp_path / "step-00000020")
    damage(new)
    chosen, damaged = manifest.newest_intact([old, new])
    assert chosen == old and damaged[0][0] == new and problem in damaged[0][1]


def test_flipped_byte_same_size_is_caught(tmp_path):
    ck = _checkpoint(tmp_path / "step-00000010")
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[2000] ^= 0x01
    (ck / "model.safetensors").write_bytes(bytes(data))
    assert "checksum mismatch" in manifest.verify(ck)


# --------------------------------------------------------------------------------------
# metrics.jsonl, validation, strict loading


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in rundir.read_jsonl_records(path)] == [1, 2]
    assert "dropped a torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(UserError, match="line 2"):
        rundir.read_jsonl_records(path)


@pytest.mark.parametrize(
    "check, args, message",
    [
        (validate.positive, ("train.micro_batch_size", 0), "must be a positive number"),
        (validate.positive, ("train.micro_batch_size", -4), "must be a positive number"),
        (validate.positive, ("train.lr", float("nan")), "must be a positive number"),
        (validate.positive, ("train.lr", float("inf")), "must be a positive number"),
        (validate.non_negative, ("train.grad_clip", -1.0), "zero or a positive"),
        (validate.in_range, ("train.min_lr_ratio", 1.5, 0, 1), "must be in [0, 1]"),
        (validate.device, ("train.device", "tpu"), "is not a device"),
    ],
)
def test_validation_helpers_refuse_with_the_key(check, args, message):
    with pytest.raises(UserError) as e:
        check(*args)
    assert args[0] in str(e.value) and message in str(e.value)
    validate.positive("train.lr", 1e-3)
    validate.non_negative("train.grad_clip", 0.0)
    validate.device("train.device", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="no CUDA device is available"):
        validate.device("train.device", "cuda")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_config):
    from neobert import NeoBERTForMaskedLM

    path = tmp_path / "tiny"
    NeoBERTForMaskedLM(tiny_config).save_pretrained(path)
    return path


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_strict_weights_accepts_transfer_and_refuses_missing_unplaced_and_reshaped(tiny_model_dir):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from neobert.loading import strict_weights

    with strict_weights(str(tiny_model_dir)):  # an MLM checkpoint read as an encoder, or under a new head: fine
        AutoModel.from_pretrained(tiny_model_dir)
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    # the API keeps transformers' behaviour: a missing tensor is initialised, no error
    _rewrite_weights(tiny_model_dir, lambda sd: sd.pop("model.transformer_encoder.1.qkv.weight"))
    AutoModel.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match=r"1 tensor\(s\) of the model are missing .*transformer_encoder.1.qkv.weight"):
        with strict_weights(str(tiny_model_dir)):
            AutoModel.from_pretrained(tiny_model_dir)


def test_strict_weights_refuses_unplaced_reshaped_and_truncated(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModel

    from neobert.loading import strict_weights

    extra = tmp_path / "extra"
    shutil.copytree(tiny_model_dir, extra)
    _rewrite_weights(extra, lambda sd: sd.update({"model.transformer_encoder.7.qkv.weight": torch.zeros(3, 3)}))
    with pytest.raises(UserError, match="have no place in the model .*transformer_encoder.7.qkv.weight"):
        with strict_weights(str(extra)):
            AutoModel.from_pretrained(extra)
    shape = tmp_path / "shape"
    shutil.copytree(tiny_model_dir, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=str(shape)):
        with strict_weights(str(shape)):
            AutoModel.from_pretrained(shape)
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read model.safetensors"):
        with strict_weights(str(trunc)):
            AutoModel.from_pretrained(trunc)

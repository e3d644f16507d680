"""``neobert prepare`` and the prepared-corpus format: parity with the single-file cache,
the held-out split, killing and resuming, several machines into one directory, errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neobert import load_tokenizer
from neobert.data import DataConfig, prepare_corpus
from neobert.data import corpus as corpus_module
from neobert.data.corpus import heldout_mask, text_hash
from neobert.data.prepare import PrepareArgs, PrepareConfig, prepare
from neobert.data.shards import PreparedCorpus, heldout_threshold
from neobert.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def random_texts(n: int, seed: int, words: int = 120) -> list[str]:
    """Texts of real vocabulary words (fast to make, slow enough to tokenize to be killed mid-way)."""
    vocab = sorted(w for w in load_tokenizer().get_vocab() if w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, rng.integers(words // 2, 2 * words))) for _ in range(n)]


def write_jsonl(directory: Path, files: int, docs_per_file: int, words: int = 120) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        chunk = random_texts(docs_per_file, seed=f, words=words)
        if f == 0:
            chunk[3] = chunk[5]  # a duplicate text: both copies must land on the same side of the split
            chunk[7] = "   "  # empty documents are skipped, as in the cache
        (directory / f"part-{f:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
        texts += chunk
    return texts


def config(source, output, **prepare_args) -> PrepareConfig:
    data = {k: prepare_args.pop(k) for k in ("num_proc", "heldout_fraction", "max_documents", "text_field") if k in prepare_args}
    return PrepareConfig(DataConfig(source=str(source), **data), PrepareArgs(output=str(output), progress=False, **prepare_args))


def cli(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "neobert", "prepare", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def shard_arrays(path: Path) -> list[tuple]:
    corpus = PreparedCorpus(path)
    return [(np.asarray(corpus.shard(i).ids).tolist(), corpus.shard(i).offsets.tolist(), corpus.shard(i).hashes.tolist()) for i in range(len(corpus))]


# --------------------------------------------------------------------------------------


def test_builtin_prepared_equals_the_cache_in_one_or_several_shards(tmp_path, tok):
    """The prepared built-in corpus splits and orders documents exactly as the single-file cache did."""
    cfg = DataConfig(max_documents=300, num_proc=1)
    corpus_module.build_corpus(cfg, tok, {}, tmp_path / "cache", verbose=False)  # the cache's own build
    train, heldout = (corpus_module.load_split(tmp_path / "cache", split, "uint16") for split in ("train", "heldout"))
    for tasks in (1, 3):
        out = prepare(config("builtin", tmp_path / f"p{tasks}", max_documents=300, tasks=tasks, num_proc=1), tok)
        corpus = PreparedCorpus(out)
        assert len(corpus) == tasks and corpus.manifest["documents"] == 300
        got_train, got_heldout = corpus.token_corpora()
        for got, want in ((got_train, train), (got_heldout, heldout)):
            assert np.array_equal(got.offsets, want.offsets)
            assert np.array_equal(got.ids, want.ids) and got.ids.dtype == np.uint16
        assert corpus.manifest["heldout_documents"] == len(heldout) == 3
    # and training reads the built-in corpus through the prepared path
    got_train, got_heldout = prepare_corpus(DataConfig(max_documents=300, cache_dir=str(tmp_path / "c2"), num_proc=1), tok, verbose=False)
    assert list((tmp_path / "c2").glob("prepared-builtin-*/manifest.json"))
    assert np.array_equal(got_train.ids, train.ids) and np.array_equal(got_heldout.offsets, heldout.offsets)


def test_local_files_in_parallel_tasks_tokenize_and_split_like_the_tokenizer(tmp_path, tok):
    texts = write_jsonl(tmp_path / "src", files=5, docs_per_file=40, words=30)
    out = prepare(config(tmp_path / "src", tmp_path / "out", tasks=3, num_proc=2, heldout_fraction=0.07), tok)
    corpus = PreparedCorpus(out)
    kept = [t for t in texts if t.strip()]
    # file i goes to task i % 3; within a task, files in order
    order = [t for task in range(3) for f in range(task, 5, 3) for t in texts[f * 40 : (f + 1) * 40] if t.strip()]
    docs = [corpus.shard(i).doc(j).tolist() for i in range(len(corpus)) for j in range(len(corpus.shard(i)))]
    assert docs == tok(order)["input_ids"]
    hashes = np.concatenate([corpus.shard(i).hashes for i in range(len(corpus))])
    assert hashes.tolist() == [text_hash(t) for t in order]
    # held out: the ceil(7%) lowest hashes, the same documents as the cache's rule picks
    expected = heldout_mask(hashes, 0.07)
    got = np.concatenate([corpus.split(i)[1] + sum(len(corpus.shard(k)) for k in range(i)) for i in range(len(corpus))])
    assert got.tolist() == np.flatnonzero(expected).tolist()
    assert corpus.manifest["heldout_documents"] == math.ceil(0.07 * len(kept))
    assert corpus.manifest["skipped"] == 1 and corpus.manifest["documents"] == len(kept)
    dup = [i for i, t in enumerate(order) if t == texts[5]]
    assert len(dup) == 2 and expected[dup[0]] == expected[dup[1]]


def test_hub_dataset_files_are_shared_out_to_tasks(tmp_path, tok, monkeypatch):
    import datasets

    texts = random_texts(40, seed=1, words=20)
    calls = []

    def load_dataset(path, **options):  # the hub, offline: a streamed dataset of 4 files of 10 rows
        calls.append((path, options))
        return datasets.Dataset.from_dict({"content": texts}).to_iterable_dataset(num_shards=4)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus = PreparedCorpus(prepare(config("hf:someone/web:en", tmp_path / "out", tasks=2, num_proc=1, text_field="content"), tok))
    assert calls[-1] == ("someone/web", {"split": "train", "name": "en", "streaming": True})
    for task, files in ((0, (0, 2)), (1, (1, 3))):  # task r of n reads files r, r + n, ... whole
        shard = corpus.shard(task)
        want = [t for f in files for t in texts[f * 10 : (f + 1) * 10]]
        assert [shard.doc(i).tolist() for i in range(len(shard))] == tok(want)["input_ids"]
    with pytest.raises(UserError, match="no column 'text' \\(columns: content\\); set data.text_field"):
        prepare(config("hf:someone/web:en", tmp_path / "out2", tasks=2, num_proc=1), tok)


def test_heldout_threshold_matches_a_full_sort_across_buckets(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for s in range(4):
        hashes = rng.integers(-(2**63), 2**63 - 1, size=2500, dtype=np.int64)
        hashes[:50] = rng.integers(-(2**63), -(2**63) + 2**40, size=50)  # many in the lowest bucket
        (tmp_path / f"s{s}").mkdir()
        np.save(tmp_path / f"s{s}" / "hashes.npy", hashes)
        paths.append(tmp_path / f"s{s}")
    everything = np.sort(np.concatenate([np.load(p / "hashes.npy") for p in paths]))
    for fraction in (0.0, 0.001, 0.01, 0.3, 0.999):
        k = math.ceil(round(fraction * len(everything), 6))
        assert heldout_threshold(paths, fraction) == (None if k == 0 else int(everything[k - 1]))


def test_killed_run_redoes_only_the_shard_in_flight_and_never_exposes_it(tmp_path, tok):
    write_jsonl(tmp_path / "src", files=4, docs_per_file=400)
    args = [f"data.source={tmp_path / 'src'}", f"prepare.output={tmp_path / 'out'}", "data.num_proc=1", "prepare.batch_size=50"]
    process = cli(*args, start_new_session=True)
    shards = tmp_path / "out" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        finished = [p for p in shards.glob("0*") if p.is_dir()] if shards.is_dir() else []
        if finished and list(shards.glob(".tmp-*/ids.bin")):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed mid-way"
    os.killpg(process.pid, signal.SIGKILL)  # the whole machine dies: executor and workers
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("0*")}
    assert 1 <= len(finished) < 4 and list(shards.glob(".tmp-*"))
    with pytest.raises(UserError, match=rf"not completely prepared \({len(finished)} of 4 shards\)"):
        PreparedCorpus(tmp_path / "out")

    rerun = prepare(config(tmp_path / "src", tmp_path / "out", num_proc=1, batch_size=50), tok)  # the same command again
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0*") if p.name in finished} == finished  # not redone
    assert not list(shards.glob(".tmp-*")) and not list(shards.glob(".progress-*"))
    uninterrupted = prepare(config(tmp_path / "src", tmp_path / "ref", num_proc=1), tok)
    assert shard_arrays(rerun) == shard_arrays(uninterrupted)
    assert PreparedCorpus(rerun).manifest["shards"] == PreparedCorpus(uninterrupted).manifest["shards"]


def test_two_machines_fill_one_directory(tmp_path, tok):
    write_jsonl(tmp_path / "src", files=4, docs_per_file=30, words=30)
    shared = config(tmp_path / "src", tmp_path / "shared", num_proc=1, nodes=2)
    shared.prepare.node_rank = 1
    prepare(shared, tok)
    with pytest.raises(UserError, match="2 of 4 shards"):  # no manifest until every machine is done
        PreparedCorpus(tmp_path / "shared")
    # machine 0 runs in another process at the same time as machine 1 runs again (all done there)
    other = cli(f"data.source={tmp_path / 'src'}", f"prepare.output={tmp_path / 'shared'}", "data.num_proc=1", "prepare.nodes=2", "prepare.node_rank=0")
    prepare(shared, tok)
    assert other.wait(300) == 0, other.stderr.read()
    bar = other.stderr.read()
    assert "tok/s" in bar and "4/4 shards" in bar and "prepared " in bar  # the bar counts every machine's shards
    single = prepare(config(tmp_path / "src", tmp_path / "single", tasks=4, num_proc=1), tok)
    assert shard_arrays(tmp_path / "shared") == shard_arrays(single)
    assert PreparedCorpus(tmp_path / "shared").manifest["shards"] == PreparedCorpus(single).manifest["shards"]


def test_errors_are_one_line(tmp_path, tok):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n')
    (source / "b.jsonl").write_text('{"text": "fine"}\n{"text": 3\n')
    # raised in a worker process of the engine, printed by the command on one line
    process = cli(f"data.source={source}", f"prepare.output={tmp_path / 'out'}", "prepare.tasks=2", "data.num_proc=2", "prepare.progress=false")
    assert process.wait(300) == 2
    err = process.stderr.read().strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and f"{source / 'b.jsonl'} line 2: malformed JSON" in err, err

    (source / "b.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(UserError, match=r"prepared differently \(source_identity differ\)"):  # a changed file
        prepare(config(source, tmp_path / "out", tasks=2, num_proc=1), tok)
    prepare(config(source, tmp_path / "o1", tasks=2, num_proc=1), tok)
    with pytest.raises(UserError, match=r"prepared differently \(tasks differ\)"):
        prepare(config(source, tmp_path / "o1", tasks=3, num_proc=1), tok)
    with pytest.raises(UserError, match="fewer than prepare.nodes=2"):
        prepare(config(source, tmp_path / "o2", tasks=1, nodes=2, node_rank=1), tok)
    with pytest.raises(UserError, match=r"prepare.node_rank=2 must be in 0..prepare.nodes-1"):
        config(source, tmp_path / "o3", nodes=2, node_rank=2)
    with pytest.raises(UserError, match="not a prepared corpus"):
        PreparedCorpus(tmp_path)


def test_pretrain_summary_and_ppl_read_a_prepared_directory(tmp_path, tok, monkeypatch):
    """data.source=PATH of a prepared corpus: training reads its shards, and so do `summary`
    (the run's last held-out accuracy again) and `eval ppl`, none of them copying the corpus
    into memory; settings fixed at preparation cannot be changed when reading."""
    from neobert.config import load_config
    from neobert.data.corpus import open_prepared_corpus
    from neobert.data.shards import PreparedCorpus
    from neobert.eval import ppl
    from neobert.train import pretrain, summary

    write_jsonl(tmp_path / "src", files=3, docs_per_file=60, words=40)
    out = prepare(config(tmp_path / "src", tmp_path / "prepared", num_proc=1, heldout_fraction=0.05), tok)
    monkeypatch.setattr(PreparedCorpus, "token_corpora", lambda self: pytest.fail("the prepared corpus was copied into memory"))
    debug = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    cfg = load_config(pretrain.PretrainConfig, debug, [f"data.source={out}", "data.max_documents=null", "data.heldout_fraction=0.05",
                                                         f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=2"])
    pretrain.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2] and all(np.isfinite(r.get("loss", 0)) for r in records)
    assert not list((tmp_path / "run").glob("**/prepared-*"))  # nothing prepared again
    last = [r for r in records if "eval_accuracy" in r][-1]
    assert summary.summarize(tmp_path / "run")["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    report = tmp_path / "ppl.json"
    assert ppl.main(["--model", str(tmp_path / "run"), "--data", str(out), "--lengths", "16,32", "--docs", "2", "--positions", "2", "--json", str(report)]) == 0
    assert [r["split"] for r in json.loads(report.read_text())["models"][0]["results"]] == ["heldout", "heldout"]

    for key, value, message in (("heldout_fraction", 0.01, "set when preparing"), ("max_documents", 10, "set when preparing"),
                                ("tokenizer", str(tmp_path / "other.json"), "another tokenizer")):
        if key == "tokenizer":  # the same vocabulary, lower-casing switched off: other ids
            spec = json.loads(tok.backend_tokenizer.to_str())
            spec["normalizer"]["lowercase"] = False
            (tmp_path / "other.json").write_text(json.dumps(spec))
            other = load_tokenizer(value)
        with pytest.raises(UserError, match=message):
            open_prepared_corpus(DataConfig(**{"source": str(out), "heldout_fraction": 0.05, key: value}), other if key == "tokenizer" else tok, verbose=False)


def test_several_processes_need_a_prepared_corpus(tmp_path, tok):
    """With WORLD_SIZE > 1 a source that is not prepared is one line saying to prepare it; the
    built-in corpus is prepared under a file lock, so build_data makes no collective call."""
    from neobert.train import common, pretrain

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text\n\nmore text\n")
    cfg = pretrain.PretrainConfig()
    cfg.data = DataConfig(source=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), max_length=64)
    two = common.Dist(rank=1, world=2)
    with pytest.raises(UserError, match=r"not a prepared corpus: with 2 processes, run `neobert prepare data.source=.*prepare.output=DIR` first"):
        pretrain.build_data(cfg, tok, two)
    assert not (tmp_path / "cache").exists()  # refused before any work
    cfg.data = DataConfig(max_documents=40, cache_dir=str(tmp_path / "cache"), max_length=64, num_proc=1)
    n, rows, heldout = pretrain.build_data(cfg, tok, two)  # rank 1 of 2, no process group: it would fail on a barrier
    assert n == 39 and len(heldout) > 0 and (tmp_path / "cache" / ".prepare.lock").exists()


def test_help_lists_every_key_documented(capsys):
    import dataclasses

    from neobert.cli import main as cli
    from neobert.config import field_docs

    assert cli(["prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: neobert prepare [CONFIG.yaml] [key=value ...]")
    assert "  prepare.tasks = null\n" in out and "  data.source = builtin\n" in out
    assert all(field_docs(PrepareArgs).get(f.name) for f in dataclasses.fields(PrepareArgs))

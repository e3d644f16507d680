"""Context extension: the length-mixture sampler, pseudo-perplexity, and resume of the extend stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert.data import DataConfig, LengthMixtureRows, TokenCorpus
from neobert.errors import UserError
from neobert.eval import ppl
from neobert.train import common, optim, pretrain

# --------------------------------------------------------------------------------------
# The sampler


def numbered_corpus(lengths) -> TokenCorpus:
    """Documents whose token j of document i is i * 100_000 + j: every token names its origin."""
    return TokenCorpus.from_documents([np.arange(n) + i * 100_000 for i, n in enumerate(lengths)], dtype=np.uint32)


LENGTHS = np.random.default_rng(0).integers(5, 400, size=300)
THRESHOLDS, PROBABILITIES = [0, 100, 250], [0.2, 0.4, 0.4]


def pieces(ids, doc_ids):
    """(document, first position, number of tokens) of each piece of a row."""
    out = []
    for k in range(1, doc_ids.max() + 1):
        piece = ids[doc_ids == k]
        doc, pos = piece // 100_000, piece % 100_000
        assert (doc == doc[0]).all() and (np.diff(pos) == 1).all(), "a piece is one contiguous window of one document"
        out.append((int(doc[0]), int(pos[0]), len(piece)))
    return out


def test_mixture_proportions_and_thresholds():
    corpus = numbered_corpus(LENGTHS)
    rows = LengthMixtureRows(corpus, 128, "document", seed=3, thresholds=THRESHOLDS, probabilities=PROBABILITIES)
    n = 3000
    buckets = np.array([rows.bucket_of(i) for i in range(n)])
    shares = np.bincount(buckets, minlength=3) / n
    assert np.allclose(shares, PROBABILITIES, atol=0.03), shares  # 3.3 standard deviations at p=0.4
    for i, (ids, doc_ids) in enumerate(rows.rows(range(300))):
        assert len(ids) == 128 and doc_ids[0] == 1 and (np.diff(doc_ids) >= 0).all()
        for doc, start, size in pieces(ids, doc_ids):
            assert LENGTHS[doc] >= THRESHOLDS[buckets[i]]  # every document from the row's bucket
            assert start + size <= LENGTHS[doc]


def test_mixture_is_deterministic_per_index():
    corpus = numbered_corpus(LENGTHS)
    make = lambda seed: LengthMixtureRows(corpus, 128, "document", seed, THRESHOLDS, PROBABILITIES)  # noqa: E731
    a, b = make(3), make(3)
    rows = a.rows([7, 1000, 5])
    for (x, dx), (y, dy) in zip(rows, b.rows([5, 7, 1000])[1:] + b.rows([5])):
        assert (x == y).all() and (dx == dy).all()
    assert not all((x == y).all() for (x, _), (y, _) in zip(rows, make(4).rows([7, 1000, 5])))


@pytest.mark.parametrize("packing", ["none", "split"])
def test_mixture_without_packing_frames_each_document(packing):
    corpus = numbered_corpus(LENGTHS)
    rows = LengthMixtureRows(corpus, 64, packing, seed=0, thresholds=[0, 250], probabilities=[0.5, 0.5])
    starts = set()
    for ids, doc_ids in rows.rows(range(200)):
        doc, pos = ids // 100_000, ids % 100_000
        assert (doc == doc[0]).all() and (doc_ids == 1).all() and len(ids) <= 64
        n = LENGTHS[doc[0]]
        assert pos[0] == 0 and pos[-1] == n - 1  # its own first and last tokens ([CLS], [SEP])
        assert len(ids) == min(n, 64) and (np.diff(pos[1:-1]) == 1).all()
        if n > 64:
            starts.add(int(pos[1]))
    # "none" reads a long document's opening only (the release truncated at 4096); "split" anywhere
    assert starts == {1} if packing == "none" else len(starts) > 10


def test_empty_bucket_is_an_error_and_config_is_checked():
    corpus = numbered_corpus([10, 20, 30])
    with pytest.raises(UserError, match=">= 1024 tokens.*longest has 30"):
        LengthMixtureRows(corpus, 16, "document", 0, [0, 1024], [0.5, 0.5])
    LengthMixtureRows(corpus, 16, "document", 0, [0, 1024], [1.0, 0.0])  # an unused empty bucket is fine
    with pytest.raises(UserError, match="go together"):
        DataConfig(bucket_thresholds=[0, 1024])
    with pytest.raises(UserError, match="summing to 1"):
        DataConfig(bucket_thresholds=[0, 1024], bucket_probabilities=[0.5, 0.6])


def prepared_numbered(root: Path, lengths, shards: int, heldout_fraction: float = 0.1):
    """``numbered_corpus(lengths)`` as a prepared corpus of ``shards`` shards (documents in order)."""
    from neobert.data.shards import PreparedCorpus, ShardWriter, write_manifest

    rng = np.random.default_rng(1)
    for rank, part in enumerate(np.array_split(np.arange(len(lengths)), shards)):
        writer = ShardWriter(root, rank, "uint32")
        writer.add([np.arange(lengths[i]) + i * 100_000 for i in part], rng.integers(-(2**63), 2**63 - 1, size=len(part)).tolist())
        writer.commit({})
    write_manifest(root, {"tasks": shards, "heldout_fraction": heldout_fraction, "source": "synthetic", "tokenizer": "none", "dtype": "uint32"})
    return PreparedCorpus(root)


@pytest.mark.parametrize("packing", ["document", "none", "split"])
def test_sharded_mixture_in_one_window_is_the_in_memory_mixture_row_for_row(tmp_path, packing):
    """The built-in corpus is one shard: stage 2 on it draws exactly the rows it drew from the cache."""
    from neobert.data.mixture import ShardedMixtureRows

    for shards in (1, 3):  # 3 shards fit in one window of 8
        corpus = prepared_numbered(tmp_path / str(shards), LENGTHS, shards)
        train, _ = corpus.token_corpora()
        sharded = ShardedMixtureRows(corpus, 64, packing, 3, THRESHOLDS, PROBABILITIES)
        memory = LengthMixtureRows(train, 64, packing, 3, THRESHOLDS, PROBABILITIES)
        assert len(sharded) == len(memory) and sharded.num_documents == len(train)
        indices = [0, 5, 1, 2 * len(memory) + 7, *range(10, 200)]
        for (a, da), (b, db) in zip(sharded.rows(indices), memory.rows(indices), strict=True):
            assert a.tolist() == b.tolist() and da.tolist() == db.tolist()


def test_sharded_mixture_over_windows_keeps_proportions_determinism_and_bounded_plans(tmp_path):
    from neobert.data.mixture import ShardedMixtureRows

    lengths = np.random.default_rng(2).integers(5, 400, size=1200)
    lengths[:600] = np.minimum(lengths[:600], 240)  # shards 0-5 have no document of the top bucket (>= 250)
    corpus = prepared_numbered(tmp_path, lengths, shards=12)
    shard_of_doc = np.repeat(np.arange(12), [len(p) for p in np.array_split(np.arange(1200), 12)])
    make = lambda seed=3: ShardedMixtureRows(corpus, 128, "document", seed, THRESHOLDS, PROBABILITIES, window=3)  # noqa: E731
    rows = make()
    n = 3000
    shares = np.bincount([rows.bucket_of(i) for i in range(n)], minlength=3) / n
    assert np.allclose(shares, PROBABILITIES, atol=0.03), shares
    picks = list(range(0, 2 * len(rows), 3))
    got = rows.rows(picks)
    from_window = 0
    for i, (ids, doc_ids) in zip(picks, got):
        bucket = rows.bucket_of(i)
        _, window_shards = rows.window_of(i)
        assert len(ids) == 128
        for doc, start, size in pieces(ids, doc_ids):
            assert lengths[doc] >= THRESHOLDS[bucket] and start + size <= lengths[doc]
            from_window += shard_of_doc[doc] in window_shards
            # a window without long documents borrows them from the shards that have some
            assert shard_of_doc[doc] in window_shards or (bucket == 2 and not set(window_shards) & set(range(6, 12)))
        # every window's plan holds its own shards' documents only, two windows at most
        assert len(rows._pools) <= 2 and all(len(p.length) <= 3 * 100 for p in rows._pools.values())
    assert from_window > 0.8 * sum(len(pieces(*r)) for r in got)
    # rows are a pure function of (seed, index): another instance, another order (a resume on other ranks)
    again = make().rows(picks[::-1])[::-1]
    assert all((a == b).all() and (da == db).all() for (a, da), (b, db) in zip(got, again))
    assert not all((a == b).all() for (a, _), (b, _) in zip(got[:20], make(4).rows(picks[:20])))
    # every window is visited in an epoch, in an order of its own per epoch
    windows = [tuple(rows.window_of(i)[1]) for i in range(len(rows))]
    assert len(set(windows)) == 4
    assert [tuple(rows.window_of(i)[1]) for i in range(len(rows), 2 * len(rows))] != windows


def test_sharded_mixture_memory_does_not_grow_with_the_corpus(tmp_path):
    import tracemalloc

    from neobert.data.mixture import ShardedMixtureRows

    peaks = []
    for shards in (4, 40):
        lengths = np.random.default_rng(shards).integers(5, 400, size=shards * 5000)
        corpus = prepared_numbered(tmp_path / str(shards), lengths, shards, heldout_fraction=0.01)
        rows = ShardedMixtureRows(corpus, 128, "document", 0, THRESHOLDS, PROBABILITIES, window=2)
        tracemalloc.start()
        for index in np.linspace(0, len(rows) - 1, 300).astype(int):  # through the whole epoch, in order
            rows.rows([index])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0], peaks  # 10x the corpus, about the same peak


# --------------------------------------------------------------------------------------
# Pseudo-perplexity


def naive_log_probs(model, ids, positions, mask_id):
    out = []
    for i in positions:
        x = ids.clone()
        x[i] = mask_id
        logits = model(input_ids=x[None]).logits[0, i]
        out.append(torch.log_softmax(logits.double(), -1)[ids[i]].item())
    return np.array(out)


def tiny_models():
    torch.manual_seed(0)
    neo = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=100, max_length=16))
    bert = BertForMaskedLM(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16))
    return neo.eval(), bert.eval()


@pytest.mark.parametrize("which", [0, 1], ids=["neobert", "bert"])
def test_batched_pseudo_log_likelihood_matches_naive_loop(which):
    model = tiny_models()[which]
    ids = torch.randint(5, 120, (16,), generator=torch.Generator().manual_seed(1))
    positions = list(range(1, 15))
    batched = ppl.masked_log_probs(model, ids, positions, mask_id=4, batch_size=5).numpy()
    with torch.no_grad():
        naive = naive_log_probs(model, ids, positions, mask_id=4)
    np.testing.assert_allclose(batched, naive, rtol=0, atol=1e-5)


def test_stratified_positions_and_default_lengths():
    rng = np.random.default_rng(0)
    pos = ppl.scored_positions(1000, 10, rng)
    assert len(pos) == 10 and pos.min() >= 1 and pos.max() <= 998
    assert all(i * 99.8 <= p - 1 < (i + 1) * 99.8 + 1 for i, p in enumerate(pos))  # one per stratum
    assert (ppl.scored_positions(20, 0, rng) == np.arange(1, 19)).all()
    assert ppl.default_lengths([128, 512]) == [128, 256, 512, 1024]
    assert ppl.default_lengths([64]) == [64, 128]


def test_evaluate_falls_back_to_train_and_records_what_bert_cannot_run():
    neo, bert = tiny_models()
    docs = lambda n, length, seed: [  # noqa: E731
        np.concatenate([[1], np.random.default_rng([seed, i]).integers(5, 120, length - 2), [2]]) for i in range(n)
    ]
    train = TokenCorpus.from_documents(docs(6, 40, 0))
    heldout = TokenCorpus.from_documents(docs(2, 40, 1) + docs(3, 12, 2))
    args = ppl.Sampling(min_doc_length=32, docs=3, split="auto", seed=0, positions=4, max_tokens=10, batch_size=0, batch_tokens=64)
    results = ppl.evaluate_model(neo, train, heldout, [16, 32], args, mask_id=4)
    assert [r["split"] for r in results] == ["train", "train"]  # 2 held-out documents of >= 32 tokens are too few
    assert all(r["scored"] == 10 and r["documents"] == 3 and r["ppl"] > 1 for r in results)
    args.docs = 2
    assert ppl.evaluate_model(neo, train, heldout, [16], args, mask_id=4)[0]["split"] == "heldout"
    results = ppl.evaluate_model(bert, train, heldout, [16, 32], args, mask_id=4)
    assert "ppl" in results[0] and "ppl" not in results[1] and results[1]["error"]


# --------------------------------------------------------------------------------------
# The extend stage, end to end


def make_stage1(run: Path, tied: bool = False) -> Path:
    """A stage-1 run directory: final/ model (max_length 32) and a checkpoint with AdamW state."""
    torch.manual_seed(0)
    model = NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=32,
                                             tie_word_embeddings=tied))
    opt = optim.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    ids = torch.randint(1000, 30522, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(run / "final")
    common.save_checkpoint(run, 1, model, opt, {"tokens": 0}, keep=1, dist=common.Dist())
    return run


def test_init_optimizer_continues_the_moments_with_this_runs_hyperparameters(tmp_path):
    run = make_stage1(tmp_path / "stage1")
    model = NeoBERTForMaskedLM.from_pretrained(run / "final")
    opt = optim.build_optimizer(model, 1e-4, 0.05, (0.8, 0.9), 1e-7)
    args = pretrain.TrainArgs(weight_decay=0.05, betas=[0.8, 0.9], eps=1e-7)
    pretrain.load_initial_optimizer(model, opt, str(run), args)
    saved = torch.load(run / "checkpoints" / "step-00000001" / "optimizer.pt", weights_only=True)
    assert torch.equal(opt.state[model.decoder.weight]["exp_avg"], saved["state"]["decoder.weight"]["exp_avg"])
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("tied", [True, False])
def test_extend_keeps_the_stage1_models_word_embedding_tie(tmp_path, tied):
    """The tie is part of the architecture stage 2 inherits: a tied stage-1 model is extended
    tied (its one embedding matrix loaded), an untied one untied (its own decoder loaded)."""
    from neobert.tokenizer import load_tokenizer
    from neobert.train import extend

    source = make_stage1(tmp_path / "stage1", tied=tied)
    cfg = extend.ExtendConfig()
    cfg.model.init_from, cfg.data.max_length = str(source), 64
    resolved = extend.resolve(cfg)
    assert resolved.model.tie_word_embeddings is tied
    model = pretrain.build_model(resolved.model, load_tokenizer())
    stage1 = NeoBERTForMaskedLM.from_pretrained(source / "final")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    assert torch.equal(model.get_input_embeddings().weight, stage1.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, stage1.get_output_embeddings().weight)
    assert not tied or torch.equal(stage1.get_output_embeddings().weight, stage1.get_input_embeddings().weight)


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    """Forty .txt documents from 20 to 400 words: short and long ones for the buckets."""
    root = tmp_path_factory.mktemp("text")
    words = "the river city bank north winter market school light paper garden music station".split()
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(20, 400)))))
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def prepared_text(text_source, tmp_path_factory):
    """The forty documents as a prepared corpus of 3 shards (stage 2 reads it window by window)."""
    from neobert.data.prepare import PrepareArgs, PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "corpus"
    return prepare(PrepareConfig(DataConfig(source=str(text_source), num_proc=1, heldout_fraction=0.1), PrepareArgs(output=str(out), tasks=3, progress=False)))


def extend_cmd(source: Path, text: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "neobert", "extend", f"model.init_from={source}", "model.init_optimizer=true",
        f"data.source={text}", f"data.cache_dir={cache}", "data.num_proc=1", "data.heldout_fraction=0.1",
        "data.max_length=64", "data.bucket_thresholds=[0,64,128]", "data.bucket_probabilities=[0.2,0.4,0.4]",
        f"train.output_dir={out}", "train.max_steps=8", "train.batch_tokens=256", "train.micro_batch_size=2", "train.lr=1e-3",
        "train.save_every=4", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "train.bf16=false",
    ]  # fmt: skip


def test_extend_resume_is_bitwise_identical(tmp_path, prepared_text, cache_dir):
    """An extend run on a prepared corpus killed after its first checkpoint and rerun ends with the
    weights of an uninterrupted one."""
    source = make_stage1(tmp_path / "stage1")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    proc = subprocess.run(extend_cmd(source, prepared_text, ref, cache_dir), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 3 shard(s)" in proc.stderr  # read through the prepared corpus's shards
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in records if "lr" in r} == {1e-3}  # constant learning rate
    config = (ref / "config.yaml").read_text()
    assert "max_length: 64" in config and "hidden_size: 32" in config and "bucket_thresholds:" in config
    assert json.loads((ref / "final" / "config.json").read_text())["max_length"] == 64

    out = tmp_path / "killed"
    cmd = extend_cmd(source, prepared_text, out, cache_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000004" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # interrupted mid-way: otherwise the rerun below would have nothing to resume
    assert common.latest_checkpoint(out).name == "step-00000004" and not (out / "final").exists(), "the run finished before the kill"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert (ref / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


def test_eval_ppl_command_writes_json_and_png(tmp_path, text_source, cache_dir):
    from neobert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=16)).save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "ppl.json"
    common_args = ["--data", str(text_source), "--cache-dir", str(cache_dir), "--docs", "2", "--positions", "4"]
    assert ppl.main(["--model", str(model_dir), "--label", "tiny", *common_args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (m,) = report["models"]
    assert m["trained_length"] == 16 and [r["length"] for r in m["results"]] == [16, 32]  # default: up to 2x the trained length
    assert all(r["scored"] == 8 and r["documents"] == 2 for r in m["results"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    merged = tmp_path / "merged.json"
    assert ppl.main(["--merge", str(out), str(out), "--json", str(merged)]) == 0
    assert len(json.loads(merged.read_text())["models"]) == 2


def test_eval_ppl_reads_a_hub_dataset(tmp_path, monkeypatch):
    """`eval ppl --data hf:NAME[:CONFIG]` streams the dataset (here a stand-in for the hub) and
    reads its first --max-documents documents (10,000 when not given); --text-field names the column."""
    import datasets

    from neobert.data import sources
    from neobert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    NeoBERTForMaskedLM(NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=16)).save_pretrained(model_dir)
    load_tokenizer().save_pretrained(model_dir)
    words = "the river city bank north winter market school light paper garden music station".split()
    opened, read = [], []  # what the stand-in was asked for, and the row numbers it yielded

    def stream():
        for i in range(200):
            read.append(i)
            text = " ".join(words[(i + j) % len(words)] for j in range(40))
            yield {"text": text, "body": text, "id": i}

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        opened.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(stream)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    args = ["--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--docs", "2", "--positions", "4", "--lengths", "16,32"]
    assert ppl.main([*args, "--data", "hf:someone/web", "--json", str(tmp_path / "a.json")]) == 0  # no cap given
    report = json.loads((tmp_path / "a.json").read_text())
    assert opened == [("someone/web", None, "train", True)]
    assert report["max_documents"] == ppl.HUB_DOCUMENTS == 10_000 and all(r["scored"] == 8 for r in report["models"][0]["results"])
    read.clear()
    assert ppl.main([*args, "--data", "hf:someone/web:en", "--max-documents", "30", "--text-field", "body", "--json", str(tmp_path / "b.json")]) == 0
    assert opened[1] == ("someone/web", "en", "train", True) and len(read) <= 31  # the stream is read no further than 30 rows
    assert json.loads((tmp_path / "b.json").read_text())["max_documents"] == 30


def test_eval_ppl_argument_errors_are_one_line_user_errors(capsys):
    """Bad arguments of `eval ppl` are a UserError (one line, exit status 2), not argparse's SystemExit."""
    from neobert.cli import main as cli

    with pytest.raises(UserError, match="give --model"):
        ppl.main([])
    with pytest.raises(UserError, match="--docs"):
        ppl.main(["--model", "x", "--docs", "many"])
    assert cli(["eval", "ppl", "--model", "x", "--label", "a", "--label", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one --label per --model" in err[0]

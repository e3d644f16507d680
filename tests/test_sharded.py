"""``ShardedRows``: the same rows as ``PackedRows`` for a one-window corpus, every token once per
epoch over many shards, the held-out split, and memory that does not grow with the corpus."""

import tracemalloc

import numpy as np
import pytest

from neobert.data import PackedRows
from neobert.data.shards import PreparedCorpus, ShardWriter, write_manifest
from neobert.data.sharded import ShardedRows

PACKINGS = ("document", "naive", "none", "split")


def make_corpus(root, shards: int, docs_per_shard: int, seed: int = 0, heldout_fraction: float = 0.1) -> PreparedCorpus:
    """Shards of random documents whose token ids are all distinct (so coverage can be counted)."""
    rng = np.random.default_rng(seed)
    first = 0
    for rank in range(shards):
        writer = ShardWriter(root, rank, "uint32")
        ends = np.cumsum(rng.integers(3, 60, size=docs_per_shard))
        writer.add(np.split(np.arange(first, first + ends[-1]), ends[:-1]), rng.integers(-(2**63), 2**63 - 1, size=docs_per_shard).tolist())
        writer.commit({})
        first += int(ends[-1])
    recipe = {"tasks": shards, "heldout_fraction": heldout_fraction, "source": "synthetic", "tokenizer": "none", "dtype": "uint32"}
    write_manifest(root, recipe)
    return PreparedCorpus(root)


def all_rows(rows, epoch: int = 0) -> list:
    return rows.rows(range(epoch * len(rows), (epoch + 1) * len(rows)))


@pytest.mark.parametrize("packing", PACKINGS)
def test_a_single_shard_gives_exactly_packed_rows(tmp_path, packing):
    """The built-in corpus is one shard: its rows (and so make demo) do not change."""
    corpus = make_corpus(tmp_path, shards=1, docs_per_shard=120)
    train, heldout = corpus.token_corpora()
    for split, tokens, seed in (("train", train, 5), ("heldout", heldout, 0)):
        sharded, packed = ShardedRows(corpus, 16, packing, seed, split=split), PackedRows(tokens, 16, packing, seed)
        assert len(sharded) == len(packed)
        indices = list(range(0, 2 * len(packed) + 3))
        for (a, da), (b, db) in zip(sharded.rows(indices), packed.rows(indices), strict=True):
            assert a.tolist() == b.tolist() and da.tolist() == db.tolist()


@pytest.mark.parametrize("packing", PACKINGS)
def test_each_epoch_reads_every_token_of_the_split_once_across_windows(tmp_path, packing):
    corpus = make_corpus(tmp_path, shards=7, docs_per_shard=30)
    train, heldout = corpus.token_corpora()
    for split, tokens in (("train", train), ("heldout", heldout)):
        rows = ShardedRows(corpus, 16, packing, seed=3, split=split, window=3)
        epochs = []
        for epoch in (0, 1):
            got = all_rows(rows, epoch)
            assert all(len(ids) <= 16 for ids, _ in got)
            ids = np.concatenate([ids for ids, _ in got])
            if packing in ("document", "naive"):
                assert sorted(ids.tolist()) == sorted(tokens.ids.tolist())  # every token exactly once
            elif packing == "split":  # every inner token once; each piece framed by its document's ends
                inner = np.concatenate([r[1:-1] for r, _ in got])
                want = np.concatenate([tokens.doc(i)[1:-1] for i in range(len(tokens))])
                assert sorted(inner.tolist()) == sorted(want.tolist())
            else:  # none: each document once, its first tokens
                assert sorted(r[0] for r, _ in got) == sorted(int(tokens.doc(i)[0]) for i in range(len(tokens)))
            epochs.append([r.tolist() for r, _ in got])
        assert epochs[0] != epochs[1]  # each epoch its own order
        again = ShardedRows(corpus, 16, packing, seed=3, split=split, window=3)
        assert [r.tolist() for r, _ in again.rows(range(len(rows), 2 * len(rows)))] == epochs[1]  # any index, any instance


def test_batches_mix_the_shards_of_a_window(tmp_path):
    corpus = make_corpus(tmp_path, shards=6, docs_per_shard=40)
    rows = ShardedRows(corpus, 16, "document", seed=0, window=3)
    bounds = [(int(corpus.shard(i).ids[0]), int(corpus.shard(i).ids[-1])) for i in range(6)]

    def shard_of(token):
        return next(i for i, (lo, hi) in enumerate(bounds) if lo <= token <= hi)

    first = [shard_of(int(ids[0])) for ids, _ in rows.rows(range(16))]
    assert len(set(first)) == 3  # the first 16 rows come from the 3 shards of the first window


def test_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    peaks = []
    for shards in (4, 40):
        corpus = make_corpus(tmp_path / str(shards), shards=shards, docs_per_shard=5000, heldout_fraction=0.01)
        rows = ShardedRows(corpus, 64, "document", seed=0, window=2)
        tracemalloc.start()
        for index in np.linspace(0, len(rows) - 1, 1000).astype(int):  # through the whole epoch, in order
            rows.rows([index])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0], peaks  # 10x the corpus, about the same peak


def test_split_documents_read_a_split_from_the_shards_as_the_in_memory_corpus(tmp_path):
    """What `eval ppl` reads from a prepared corpus: the documents of the in-memory split, in the
    same order, or only the first whole shards when capped."""
    from neobert.data.sharded import SplitDocuments

    corpus = make_corpus(tmp_path, shards=5, docs_per_shard=30, heldout_fraction=0.2)
    for split, tokens in zip(("train", "heldout"), corpus.token_corpora()):
        docs = SplitDocuments(corpus, split)
        assert len(docs) == len(tokens) and docs.doc_lengths.tolist() == tokens.doc_lengths.tolist()
        assert all(docs.doc(i).tolist() == tokens.doc(i).tolist() for i in range(len(tokens)))
        first_shards = SplitDocuments(corpus, split, max_documents=len(corpus.split(0)[split == "heldout"]) + 1)
        listed = sum(len(corpus.split(i)[split == "heldout"]) for i in range(2))  # two whole shards cover the cap
        assert len(first_shards) == listed and first_shards.doc_lengths.tolist() == tokens.doc_lengths[:listed].tolist()


def test_summary_baseline_counts_the_training_tokens_chunk_by_chunk(tmp_path):
    from neobert.train.summary import train_token_counts

    corpus = make_corpus(tmp_path, shards=4, docs_per_shard=40, heldout_fraction=0.2)
    train, _ = corpus.token_corpora()
    want = np.bincount(train.ids.astype(np.int64))
    got = train_token_counts(corpus, max_tokens=10**9, chunk_tokens=50)  # many chunks per shard
    assert np.array_equal(got[: len(want)], want) and not got[len(want) :].any()
    first_shard = int(np.diff(corpus.shard(0).offsets)[corpus.split(0)[0]].sum())
    capped = train_token_counts(corpus, max_tokens=first_shard // 2, chunk_tokens=50)
    assert first_shard // 2 <= capped.sum() <= first_shard // 2 + 50 + 60  # stops after the chunk that reaches the cap
    assert np.array_equal(capped, np.bincount(train.ids[: capped.sum()].astype(np.int64), minlength=len(capped)))

"""Pretraining data: sources and bad input, tokenize + cache, held-out split, packing, masking."""

import json
import math
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from neobert import NeoBERTModel, load_tokenizer
from neobert.config import load_config
from neobert.data import DataConfig, MLMMasker, PackedRows, TokenCorpus, collate, prepare_corpus
from neobert.data import corpus as corpus_module
from neobert.data import sources as sources_module
from neobert.errors import UserError

SPECIAL = {"mask_token_id": 103, "special_ids": [0, 100, 101, 102, 103], "vocab_size": 30522}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def config(tmp_path, source, **overrides) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), num_proc=1, **overrides)


def prepare(tmp_path, source, tok, **overrides):
    return prepare_corpus(config(tmp_path, source, **overrides), tok, verbose=False)


def all_docs(*corpora) -> list[list[int]]:
    return [c.doc(i).tolist() for c in corpora for i in range(len(c))]


# --------------------------------------------------------------------------------------
# Masking


def padded_batch(batch_size=64, length=512, seed=0) -> dict:
    """Rows framed [CLS] ... [SEP] with random word ids, then padding of random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (batch_size, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=g)
    attention = (torch.arange(length) < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(batch_size), lengths - 1] = 102
    ids[:, 5] = 100  # an [UNK] in every row
    return {"input_ids": ids.masked_fill(attention == 0, 0), "attention_mask": attention}


def test_masking_selects_20_percent_and_replaces_all_by_mask():
    batch = padded_batch()
    before = {k: v.clone() for k, v in batch.items()}
    out = MLMMasker(SPECIAL)(batch, seed=0, step=0)
    ids, labels = batch["input_ids"], out["labels"]
    selected = labels != -100
    eligible = (batch["attention_mask"] == 1) & ~torch.isin(ids, torch.tensor(SPECIAL["special_ids"]))
    assert not (selected & ~eligible).any()  # never specials or padding
    assert abs(selected.sum() / eligible.sum() - 0.2) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    assert (out["input_ids"][selected] == 103).all()
    assert torch.equal(out["input_ids"][~selected], ids[~selected])
    assert all(torch.equal(batch[k], before[k]) for k in before)  # the input is left alone
    assert out["input_ids"].dtype == labels.dtype == torch.long


def test_masking_80_10_10_proportions():
    batch = padded_batch(batch_size=128)
    out = MLMMasker(SPECIAL, rate=0.2, mask_80_10_10=True)(batch, seed=3, step=7)
    selected = out["labels"] != -100
    original, new = batch["input_ids"][selected], out["input_ids"][selected]
    n = selected.sum().item()
    masked, kept = (new == 103).sum().item() / n, (new == original).sum().item() / n
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.01 and abs(1 - masked - kept - 0.1) < 0.01
    assert not torch.isin(new[(new != 103) & (new != original)], torch.tensor(SPECIAL["special_ids"])).any()
    # the same tokens are selected with and without the 80/10/10 rule
    assert torch.equal(MLMMasker(SPECIAL)(batch, seed=3, step=7)["labels"], out["labels"])


def test_masking_is_deterministic_per_seed_step_rank_micro():
    batch, masker = padded_batch(batch_size=4, length=64), MLMMasker(SPECIAL)
    first = masker(batch, seed=1, step=5)["labels"]
    assert torch.equal(first, MLMMasker(SPECIAL)(batch, seed=1, step=5)["labels"])
    for other in ({"seed": 2, "step": 5}, {"seed": 1, "step": 6}, {"seed": 1, "step": 5, "rank": 1}, {"seed": 1, "step": 5, "micro": 1}):
        assert not torch.equal(first, masker(batch, **other)["labels"])


def test_masker_takes_ids_from_the_tokenizer(tok):
    masker = MLMMasker(tok)
    assert masker.mask_id == 103 and set(masker.special_ids.tolist()) == {0, 100, 101, 102, 103}
    batch = collate([(np.array(tok("a cat sat on the mat")["input_ids"]), np.ones(8, dtype=np.int64))], "none", 16)
    out = masker(batch, seed=0, step=0)
    assert (out["labels"][:, [0, 7]] == -100).all() and (out["labels"][batch["attention_mask"] == 0] == -100).all()


# --------------------------------------------------------------------------------------
# Packing


def unique_corpus(lengths) -> TokenCorpus:
    """Documents whose tokens are all distinct, so every token tells where it came from."""
    ends = np.cumsum(lengths)
    return TokenCorpus.from_documents([np.arange(e - n, e) + 1 for n, e in zip(lengths, ends)])


def framed_corpus(lengths) -> TokenCorpus:
    """[CLS] distinct inner tokens [SEP] per document."""
    docs, next_id = [], 200
    for n in lengths:
        docs.append([101, *range(next_id, next_id + n - 2), 102])
        next_id += n - 2
    return TokenCorpus.from_documents(docs)


LENGTHS = [5, 40, 3, 150, 64, 63, 65, 12, 200, 7, 30, 31]


def test_document_packing_covers_every_token_once_in_full_rows():
    corpus, L = unique_corpus(LENGTHS), 64
    rows = PackedRows(corpus, L, "document", seed=1)
    assert len(rows) == math.ceil(sum(LENGTHS) / L)
    epoch = rows.rows(range(len(rows)))
    assert sorted(len(ids) for ids, _ in epoch)[1:] == [L] * (len(rows) - 1)  # only one row may be short
    tokens = np.concatenate([ids for ids, _ in epoch])
    assert np.array_equal(np.sort(tokens), np.sort(corpus.ids.astype(np.int64)))  # none lost, none twice
    doc_of = np.repeat(np.arange(len(corpus)), LENGTHS)
    pieces_per_doc = np.zeros(len(corpus), dtype=int)
    for ids, docs in epoch:
        assert docs[0] == 1 and set(np.diff(docs)) <= {0, 1}
        for d in range(1, docs.max() + 1):
            run = ids[docs == d] - 1
            assert len(set(doc_of[run])) == 1 and (np.diff(run) == 1).all()  # one document, in order
            pieces_per_doc[doc_of[run[0]]] += 1
    assert pieces_per_doc[LENGTHS.index(200)] >= 4  # a document longer than a row is split


def test_rows_are_deterministic_and_each_epoch_differs():
    corpus = unique_corpus(LENGTHS)
    rows = PackedRows(corpus, 32, "document", seed=1)
    n = len(rows)
    picks = [5, 3, n + 2, 3 * n + 1, 0]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(rows.rows(picks), PackedRows(corpus, 32, "document", seed=1).rows(picks)))
    first, second = rows.rows(range(n)), rows.rows(range(n, 2 * n))
    assert [r[0].tolist() for r in first] != [r[0].tolist() for r in second]
    assert np.array_equal(np.sort(np.concatenate([r[0] for r in second])), np.sort(corpus.ids.astype(np.int64)))
    other_seed = PackedRows(corpus, 32, "document", seed=2).rows(range(n))
    assert [r[0].tolist() for r in first] != [r[0].tolist() for r in other_seed]


def test_document_collate_positions_restart_per_document():
    rows = PackedRows(unique_corpus(LENGTHS), 64, "document", seed=0)
    batch = collate(rows.rows(range(len(rows))), "document", 64)
    mask, positions = batch["attention_mask"], batch["position_ids"]
    assert batch["input_ids"].shape == (len(rows), 64) and batch["input_ids"].dtype == torch.long
    expected = [[i - max(j for j in range(i + 1) if j == 0 or row[j] != row[j - 1]) for i in range(len(row))] for row in mask.tolist()]
    assert positions.tolist() == expected  # 0 at each document start (and the padding's), then counting up
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    assert (positions[starts] == 0).all() and (positions[~starts] > 0).all()
    assert ((mask > 0).sum() == sum(LENGTHS)) and (batch["input_ids"][mask == 0] == 0).all()


def test_naive_packing_has_a_0_1_mask_and_plain_positions():
    rows = PackedRows(unique_corpus(LENGTHS), 64, "naive", seed=0).rows(range(3))
    naive, document = collate(rows, "naive", 64), collate(rows, "document", 64)
    assert set(naive["attention_mask"].unique().tolist()) <= {0, 1}
    assert torch.equal(naive["attention_mask"], (document["attention_mask"] > 0).long())
    assert torch.equal(naive["position_ids"], torch.arange(64).expand(3, 64))
    assert torch.equal(naive["input_ids"], document["input_ids"])


def test_none_packing_keeps_the_first_tokens_of_each_document_as_the_release_did():
    corpus, L = framed_corpus(LENGTHS), 64
    rows = PackedRows(corpus, L, "none", seed=0)
    assert len(rows) == len(LENGTHS)  # one row per document, however long
    epoch = rows.rows(range(len(rows)))
    # What the released preprocessing gives: tokenizer(text, truncation=True, max_length=L),
    # i.e. [CLS], the first L - 2 inner tokens, [SEP]; built here from each document's own ids.
    expected = sorted(
        [101, *range(first, first + min(n - 2, L - 2)), 102]
        for n, first in zip(LENGTHS, 200 + np.cumsum([0, *[n - 2 for n in LENGTHS[:-1]]]))
    )
    assert sorted(ids.tolist() for ids, _ in epoch) == expected
    assert all((docs == 1).all() for _, docs in epoch)
    second_epoch = rows.rows(range(len(rows), 2 * len(rows)))
    assert sorted(ids.tolist() for ids, _ in second_epoch) == expected  # a new order, the same rows


def test_split_packing_one_framed_piece_per_row_padded_to_multiple_of_8():
    corpus, L = framed_corpus(LENGTHS), 64
    rows = PackedRows(corpus, L, "split", seed=0)
    assert len(rows) == sum(max(1, math.ceil((n - 2) / (L - 2))) for n in LENGTHS)
    epoch = rows.rows(range(len(rows)))
    for ids, docs in epoch:
        assert ids[0] == 101 and ids[-1] == 102 and len(ids) <= L and (docs == 1).all()
    inner = np.concatenate([ids[1:-1] for ids, _ in epoch])
    assert np.array_equal(np.sort(inner), np.arange(200, 200 + sum(LENGTHS) - 2 * len(LENGTHS)))
    short = [r for r in epoch if len(r[0]) <= 12][:3]
    for packing in ("split", "none"):
        batch = collate(short, packing, L)
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width - 8 < max(len(r[0]) for r in short) <= width
        assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(r[0]) for r in short]))
        assert torch.equal(batch["position_ids"], torch.arange(width).expand(3, width))
        assert collate([(np.arange(59), np.ones(59))], packing, 60)["input_ids"].shape == (1, 60)  # never past max_length


def test_model_on_a_packed_batch_equals_each_document_alone(tiny_config):
    model = NeoBERTModel(tiny_config).eval()
    g = np.random.default_rng(0)
    docs = [[1, *g.integers(3, tiny_config.vocab_size, n - 2), 2] for n in (5, 17, 40, 9, 70, 12, 3)]
    rows = PackedRows(TokenCorpus.from_documents(docs), 32, "document", seed=0).rows(range(4))
    batch = collate(rows, "document", 32)
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).last_hidden_state
        implicit = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for b, (ids, doc_ids) in enumerate(rows):
            for d in range(1, doc_ids.max() + 1):
                alone = model(input_ids=torch.from_numpy(ids[doc_ids == d])[None]).last_hidden_state[0]
                torch.testing.assert_close(packed[b, : len(ids)][torch.from_numpy(doc_ids == d)], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed, implicit)


@pytest.mark.parametrize("packing", ["document", "naive", "none", "split"])
def test_collate_gives_the_segments_the_model_finds_in_the_mask(packing):
    """collate's host-side layout (indices, cu_seqlens, max_seqlen) is exactly what the model
    derives from the batch's attention_mask, with a padded row and an all-padding row; flatten
    lays out the real tokens, their labels and the labelled positions."""
    from neobert.data.packing import flatten
    from neobert.modeling_neobert import real_token_segments

    rows = PackedRows(unique_corpus(LENGTHS), 64, packing, seed=0).rows(range(5))
    rows = [*rows, (rows[0][0][:7], rows[0][1][:7]), (np.zeros(0, np.int64), np.zeros(0, np.int64))]
    batch = collate(rows, packing, 64)
    keep, segments = real_token_segments(batch["attention_mask"])
    real = batch["attention_mask"].flatten() > 0
    assert torch.equal(batch["indices"], real.nonzero().squeeze(1))
    assert batch["cu_seqlens"].dtype == torch.int32 and torch.equal(batch["cu_seqlens"], segments.cu_seqlens)
    assert batch["max_seqlen"] == max(segments.lengths)
    if packing == "document":
        assert len(segments.lengths) > len(rows)  # documents, not rows
    batch = MLMMasker(SPECIAL, rate=0.3)(batch, seed=0, step=0)
    flat = flatten(batch)
    assert torch.equal(flat["input_ids"][0], batch["input_ids"].flatten()[real])
    assert torch.equal(flat["position_ids"][0], batch["position_ids"].flatten()[real])
    labels = batch["labels"].flatten()[real]
    assert torch.equal(flat["labels"][0], labels) and torch.equal(flat["label_positions"], (labels != -100).nonzero().squeeze(1))
    assert flat["cu_seq_lens_q"] is batch["cu_seqlens"] and flat["max_length_q"] == batch["max_seqlen"]


def test_micro_batches_are_the_same_with_workers_and_from_a_resumed_step():
    """The loader's items (rows, masks, layout) do not depend on its worker processes, and a
    loader started at step s (a resumed run) gives the items an uninterrupted one gives there."""
    from neobert.data.loader import MicroBatches, micro_batch_loader

    rows = PackedRows(unique_corpus(LENGTHS * 4), 32, "document", seed=0)
    masker = MLMMasker(SPECIAL, rate=0.3)

    def items(first_step, workers, rank=0):
        dataset = MicroBatches(rows, masker, "document", 32, seed=5, micro_batch_size=3, rows_per_step=12, accumulation=2,
                               rank=rank, first_step=first_step, max_steps=6)
        return list(micro_batch_loader(dataset, workers, 2, torch.device("cpu")))

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    inline = items(0, 0)
    assert len(inline) == 12 and [b["step"] for b in inline] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(b["masked"] == len(b["inputs"]["label_positions"]) > 0 for b in inline)
    for a, b in zip(inline, items(0, 2)):
        assert a["masked"] == b["masked"] and a["tokens"] == b["tokens"] and same(a["inputs"], b["inputs"])
    for a, b in zip(inline[8:], items(4, 2)):
        assert same(a["inputs"], b["inputs"])
    # the second rank of two reads other rows than the first, with other masks
    other = items(0, 0, rank=1)
    assert not torch.equal(other[0]["inputs"]["input_ids"], inline[0]["inputs"]["input_ids"])
    # and micro-batch m of a step is rows [(rank * accumulation + m) * 3, +3) of the step's 12
    expected = collate(rows.rows(range(12 + 9, 12 + 12)), "document", 32)["input_ids"]
    assert torch.equal(other[3]["inputs"]["labels"][0].where(other[3]["inputs"]["labels"][0] != -100, other[3]["inputs"]["input_ids"][0]),
                       expected.flatten()[expected.flatten() > 0])


def test_loader_options_are_validated():
    with pytest.raises(UserError, match="data.num_workers=-1"):
        DataConfig(num_workers=-1)
    with pytest.raises(UserError, match="data.prefetch_factor=0"):
        DataConfig(prefetch_factor=0)


# --------------------------------------------------------------------------------------
# Sources, tokenization and the cache


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


TEXTS = ["The first document.", "A second one, longer than the first.", "Third!"]


def test_txt_one_document_per_file_or_per_blank_line_block(tmp_path, tok):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text + "\n\nsame file\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored: not a corpus file")
    train, heldout = prepare(tmp_path, folder, tok, heldout_fraction=0.0)
    assert len(heldout) == 0 and all_docs(train) == [tok(t + "\n\nsame file\n")["input_ids"] for t in TEXTS]
    assert isinstance(train.ids, np.memmap) and train.ids.dtype == np.uint16 and train.offsets.dtype == np.int64
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("\n\n".join(TEXTS) + "\n\n\n   \n", encoding="utf-8")
    train, _ = prepare(tmp_path, blocks, tok, heldout_fraction=0.0, txt_split="blank_line")
    assert all_docs(train) == [tok(t)["input_ids"] for t in TEXTS]


def test_jsonl_parquet_glob_and_max_documents(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)])
    write_jsonl(tmp_path / "b.jsonl", [{"body": "from b", "id": 9}])
    pq.write_table(pa.table({"body": ["from parquet"], "n": [1]}), tmp_path / "c.parquet")
    train, _ = prepare(tmp_path, tmp_path / "*.*", tok, text_field="body", heldout_fraction=0.0)
    assert all_docs(train) == [tok(t)["input_ids"] for t in [*TEXTS, "from b", "from parquet"]]
    train, _ = prepare(tmp_path, tmp_path / "*.jsonl", tok, text_field="body", heldout_fraction=0.0, max_documents=2)
    assert all_docs(train) == [tok(t)["input_ids"] for t in TEXTS[:2]]


def test_heldout_split_is_by_document_exact_and_independent_of_order(tmp_path, tok):
    texts = [f"document number {i} says {i * i}." for i in range(200)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    write_jsonl(tmp_path / "one" / "docs.jsonl", [{"text": t} for t in texts])
    write_jsonl(tmp_path / "two" / "docs.jsonl", [{"text": t} for t in reversed(texts)])
    train, heldout = prepare(tmp_path, tmp_path / "one", tok, heldout_fraction=0.05)
    assert len(heldout) == 10 and len(train) == 190
    held = {tuple(d) for d in all_docs(heldout)}
    assert held.isdisjoint(tuple(d) for d in all_docs(train))
    assert held == {tuple(d) for d in all_docs(prepare(tmp_path, tmp_path / "two", tok, heldout_fraction=0.05)[1])}
    assert len(prepare(tmp_path, tmp_path / "one", tok, heldout_fraction=0.001)[1]) == 1  # at least one


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS])
    first = prepare(tmp_path, path, tok, heldout_fraction=0.0)[0]
    real_build = corpus_module.build_corpus

    def no_build(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(corpus_module, "build_corpus", no_build)
    again = prepare(tmp_path, path, tok, heldout_fraction=0.0)[0]
    assert np.array_equal(again.ids, first.ids)
    write_jsonl(path, [{"text": t} for t in TEXTS[:2]])
    os.utime(path, ns=(0, 0))  # a new modification time, whatever the clock's resolution
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(tmp_path, path, tok, heldout_fraction=0.0)
    monkeypatch.setattr(corpus_module, "build_corpus", real_build)
    assert len(prepare(tmp_path, path, tok, heldout_fraction=0.0)[0]) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_interrupted_build_never_looks_complete(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS])

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(corpus_module, "_write_splits", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path, path, tok)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left
    prepare(tmp_path, path, tok)
    (built,) = (tmp_path / "cache").iterdir()
    # a build killed before its rename leaves only a temporary name, which is never read
    (built / "meta.json").unlink()
    built.rename(built.with_name(built.name + ".tmp-killed"))
    train, heldout = prepare(tmp_path, path, tok)
    assert len(train) + len(heldout) == 3 and (built / "meta.json").is_file()


def test_hub_source_is_streamed_and_capped(tmp_path, tok, monkeypatch):
    def endless():
        i = 0
        while True:
            yield {"content": f"streamed document {i}", "url": "x"}
            i += 1

    opened = {}

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        opened.update(name=name, config=config, split=split, streaming=streaming)
        return datasets.IterableDataset.from_generator(endless)

    monkeypatch.setattr(sources_module.datasets, "load_dataset", fake_load_dataset)
    train, heldout = prepare(tmp_path, "hf:someone/web:en", tok, text_field="content", max_documents=5, hf_split="train")
    assert opened == {"name": "someone/web", "config": "en", "split": "train", "streaming": True}
    assert sorted(all_docs(train, heldout)) == sorted(tok(f"streamed document {i}")["input_ids"] for i in range(5))
    with pytest.raises(UserError, match=r"row 1: no text in field 'text' \(found: content, url\)"):
        prepare(tmp_path, "hf:someone/web", tok, max_documents=5)
    with pytest.raises(UserError, match="data.max_documents must be set"):
        prepare(tmp_path, "hf:someone/web", tok)


def bad_inputs(tmp_path):
    """(source, config overrides, expected message) for each kind of bad input."""
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": c}\n')
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "a"}, {"body": "b", "title": "t"}])
    write_jsonl(tmp_path / "number.jsonl", [{"text": "a"}, {"text": 5}])
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocolumn.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    (tmp_path / "table.csv").write_text("text\na\n")
    (tmp_path / "one.txt").write_text("just one document")
    p = str(tmp_path)
    return [
        (f"{p}/missing.jsonl", {}, f"no such file or directory: {p}/missing.jsonl"),
        (f"{p}/*.nothing", {}, "no files match"),
        (f"{p}/empty_dir", {}, "no .txt, .jsonl or .parquet files under"),
        (f"{p}/blank.txt", {}, f"empty corpus: {p}/blank.txt has no non-empty documents"),
        (f"{p}/latin1.txt", {}, f"{p}/latin1.txt line 2: not valid UTF-8 (byte 0xe9 at column 4)"),
        (f"{p}/latin1.jsonl", {}, f"{p}/latin1.jsonl line 2: not valid UTF-8"),
        (f"{p}/broken.jsonl", {}, f"{p}/broken.jsonl line 3: malformed JSON"),
        (f"{p}/nofield.jsonl", {}, f"{p}/nofield.jsonl line 2: no field 'text' (found: body, title)"),
        (f"{p}/number.jsonl", {}, f"{p}/number.jsonl line 2: field 'text' is int, not text"),
        (f"{p}/nocolumn.parquet", {}, f"{p}/nocolumn.parquet: no column 'text' (columns: body)"),
        (f"{p}/null.parquet", {}, f"{p}/null.parquet row 2: column 'text' is empty"),
        (f"{p}/table.csv", {}, "unsupported file type '.csv'"),
        (f"{p}/one.txt", {"heldout_fraction": 0.5}, "1 document(s) are too few for data.heldout_fraction=0.5"),
    ]


def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path, tok):
    for source, overrides, message in bad_inputs(tmp_path):
        with pytest.raises(UserError) as raised:
            prepare(tmp_path, source, tok, **overrides)
        assert message in str(raised.value) and "\n" not in str(raised.value), (source, str(raised.value))
    assert not any((tmp_path / "cache").glob("*"))  # failed builds leave nothing behind


def test_data_section_of_a_yaml_config(tmp_path):
    @dataclass
    class Run:
        data: DataConfig = field(default_factory=DataConfig)

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  source: corpus/*.jsonl\n  max_length: 256\n")
    cfg = load_config(Run, path, ["data.packing=none", "data.mlm_rate=0.3"]).data
    assert (cfg.source, cfg.max_length, cfg.packing, cfg.mlm_rate) == ("corpus/*.jsonl", 256, "none", 0.3)
    with pytest.raises(UserError, match=r"data.packing='packed' is not one of"):
        load_config(Run, path, ["data.packing=packed"])
    with pytest.raises(UserError, match="unknown key 'data.sorce'"):
        load_config(Run, path, ["data.sorce=x"])


def test_builtin_corpus_has_3m_tokens(tok):
    """Reads the shared cache (built here once, in about half a minute, if missing)."""
    train, heldout = prepare_corpus(DataConfig(), tok, verbose=False)
    assert len(train) + len(heldout) >= 4000 and len(heldout) == math.ceil(0.01 * (len(train) + len(heldout)))
    assert train.num_tokens + heldout.num_tokens >= 3_000_000
    assert tok.decode(train.doc(0)[:1]) == "[CLS]" and tok.decode(train.doc(0)[-1:]) == "[SEP]"


def test_builtin_corpus_holds_no_headline_of_the_retrieval_task():
    """`eval retrieval --data news` asks for each headline's article: pretraining on the
    built-in corpus must not have seen the headline beside its article. Its news part is
    the articles' texts alone, which are the retrieval task's documents."""
    from neobert.data.retrieval import news_split

    task, _ = news_split()
    news = sources_module.news_articles()
    assert len(news) == 3788 and set(news) == set(task.corpus.values())
    headlines = set(task.queries.values())
    assert not any(doc.split("\n", 1)[0].strip() in headlines for doc in news)

"""Sentence embeddings: pooling with padding, export to sentence-transformers, STS and
retrieval evaluation, the embed command, and the contrastive loss and sampling."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertModel

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTModel, load_tokenizer
from neobert.cli import main as cli
from neobert.data.retrieval import RetrievalSet, news_split, read_retrieval_set
from neobert.embeddings import export_sentence_transformers, load_encoder, neobert_to_eurobert
from neobert.errors import UserError
from neobert.eval.retrieval import evaluate_tfidf, retrieval_metrics, top_k
from neobert.eval.sts import read_sts

TEXTS = [
    "a short one",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello",
    "Sentence embeddings map text to vectors; similar meanings give similar vectors.",
]


def tiny_neobert_config() -> NeoBERTConfig:
    return NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=64)


@pytest.fixture(scope="module")
def neo_dir(tmp_path_factory) -> Path:
    """A random tiny NeoBERT masked-LM directory with the default tokenizer, as pretraining writes final/."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("neo") / "final"
    NeoBERTForMaskedLM(tiny_neobert_config()).save_pretrained(d)
    load_tokenizer().save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------
# Encoding and pooling


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padded_batch_equals_each_text_alone(neo_dir, pooling):
    enc = load_encoder(str(neo_dir), pooling=pooling, device="cpu")
    batch = enc.encode(TEXTS, batch_size=len(TEXTS))
    alone = np.stack([enc.encode([t], batch_size=1)[0] for t in TEXTS])
    assert batch.shape == (len(TEXTS), 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    normalized = enc.encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)


def test_mean_pooling_is_the_masked_mean_of_the_encoder_output(neo_dir):
    enc = load_encoder(str(neo_dir), device="cpu")
    model = NeoBERTModel.from_pretrained(neo_dir).eval()
    tok = load_tokenizer(str(neo_dir))
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(enc.encode([TEXTS[1]])[0], expected, atol=1e-5)


def test_model_argument_forms(neo_dir, tmp_path):
    run = neo_dir.parent  # a run directory: its final/ is the model
    np.testing.assert_allclose(load_encoder(str(run), device="cpu").encode(TEXTS[:1]), load_encoder(str(neo_dir), device="cpu").encode(TEXTS[:1]))
    with pytest.raises(UserError, match="not a model directory"):
        load_encoder(str(tmp_path))
    with pytest.raises(UserError, match="directory or a hub name"):
        load_encoder(str(neo_dir / "config.json"))
    with pytest.raises(UserError, match="pooling"):
        load_encoder(str(neo_dir), pooling="max")


def test_mteb_style_call(neo_dir):
    """MTEB calls encode(sentences, task_name=..., prompt_type=...) and wants an ndarray."""
    enc = load_encoder(str(neo_dir), device="cpu")
    out = enc.encode(TEXTS, task_name="STSBenchmark", prompt_type="query", batch_size=2)
    np.testing.assert_allclose(out, enc.encode(TEXTS), atol=1e-6)
    assert enc.encode([]).shape == (0, 32)
    # MTEB 2 hands over a DataLoader of {"text": [...]} batches
    loader = torch.utils.data.DataLoader([{"text": t} for t in TEXTS], batch_size=3)
    np.testing.assert_allclose(enc.encode(loader, task_metadata=None, hf_split="test", hf_subset="default"), out, atol=1e-6)
    enc.model.prompts = {"query": "query: ", "document": "passage: "}
    np.testing.assert_allclose(enc.encode(TEXTS, prompt_type="passage"), enc.encode(TEXTS, prompt="passage: "), atol=1e-6)


# --------------------------------------------------------------------------------------
# Export to sentence-transformers


def test_neobert_as_eurobert_gives_the_same_hidden_states():
    torch.manual_seed(1)
    neo = NeoBERTModel(NeoBERTConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80)).eval()
    euro = neobert_to_eurobert(neo)
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    with torch.no_grad():
        a = neo(ids, mask).last_hidden_state
        b = euro(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


def test_exported_neobert_loads_in_plain_sentence_transformers(neo_dir, tmp_path):
    """A fresh process that never imports neobert, no trust_remote_code: same embeddings, prompts kept."""
    out = tmp_path / "st"
    export_sentence_transformers(str(neo_dir), out, normalize=True, prompts={"query": "query: "})
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "eurobert"
    ours = load_encoder(str(neo_dir), device="cpu")
    np.save(tmp_path / "ours.npy", ours.encode(TEXTS, normalize=True))
    np.save(tmp_path / "ours_query.npy", ours.encode(TEXTS, normalize=True, prompt="query: "))
    script = f"""
import sys, numpy as np
from sentence_transformers import SentenceTransformer
m = SentenceTransformer({str(out)!r}, device="cpu")
assert not any(k == "neobert" or k.startswith("neobert.") for k in sys.modules), "neobert was imported"
np.testing.assert_allclose(m.encode({TEXTS!r}), np.load({str(tmp_path / "ours.npy")!r}), atol=1e-5)
np.testing.assert_allclose(m.encode_query({TEXTS!r}), np.load({str(tmp_path / "ours_query.npy")!r}), atol=1e-5)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_export_of_any_hf_encoder_and_cli(tmp_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    src = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(src)
    load_tokenizer().save_pretrained(src)
    out = tmp_path / "st"
    assert cli(["export-st", "--model", str(src), "--output", str(out), "--pooling", "cls"]) == 0
    ours = load_encoder(str(src), pooling="cls", device="cpu").encode(TEXTS)
    np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(TEXTS), ours, atol=1e-5)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"


# --------------------------------------------------------------------------------------
# STS


def test_read_sts_benchmark_and_glue_formats(tmp_path):
    # STS benchmark: no header, quotes are plain characters, extra trailing columns
    sts = tmp_path / "sts-dev.csv"
    sts.write_text(
        'main-captions\tMSRvid\t2012test\t0000\t5.000\tA man said "hi.\tA man says "hi".\n'
        "main-news\theadlines\t2013\t0001\t1.5\tOne.\tTwo.\tsource-a\tsource-b\n"
    )
    s1, s2, gold = read_sts(sts)
    assert s1 == ['A man said "hi.', "One."] and s2 == ['A man says "hi".', "Two."]
    np.testing.assert_array_equal(gold, [5.0, 1.5])
    glue = tmp_path / "dev.tsv"
    glue.write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        '0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA "quoted" man.\tA man.\t4.750\n'
    )
    s1, s2, gold = read_sts(glue)
    assert s1 == ['A "quoted" man.'] and s2 == ["A man."] and gold.tolist() == [4.75]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 0.5}) + "\n")
    assert read_sts(jsonl)[2].tolist() == [0.5]


def test_read_sts_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_sts(tmp_path / "missing.tsv")
    no_score = tmp_path / "test.tsv"
    no_score.write_text("index\tgenre\tsentence1\tsentence2\n0\tx\ta\tb\n")
    with pytest.raises(UserError, match="lacks score"):
        read_sts(no_score)
    short = tmp_path / "short.csv"
    short.write_text("main\tfile\t2012\t0001\t3.0\tonly one sentence\n")
    with pytest.raises(UserError, match="line 1: 6 columns"):
        read_sts(short)
    bad = tmp_path / "bad.csv"
    bad.write_text("main\tfile\t2012\t0001\tfive\ta\tb\n")
    with pytest.raises(UserError, match="'five' is not a number"):
        read_sts(bad)
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_sts(tmp_path / "empty.csv")


def test_eval_sts_command(neo_dir, tmp_path, capsys):
    data = tmp_path / "sts-dev.csv"
    rows = [("A man plays a guitar.", "A man is playing a guitar.", 4.8), ("A dog runs.", "The stock market fell.", 0.2),
            ("Kids are swimming.", "Children swim in a pool.", 4.0), ("It is raining.", "A cat sleeps.", 1.0)]
    data.write_text("".join(f"g\tf\t2012\t{i:04d}\t{sc}\t{a}\t{b}\n" for i, (a, b, sc) in enumerate(rows)))
    out = tmp_path / "res" / "sts.json"
    assert cli(["eval", "sts", "--model", str(neo_dir), "--data", str(data), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"spearman", "pearson", "n"} and res["n"] == 4 and -1 <= res["spearman"] <= 1
    assert "spearman" in capsys.readouterr().out
    assert cli(["eval", "sts", "--model", str(neo_dir), "--data", str(tmp_path / "nope.tsv")]) == 2
    assert cli(["eval", "sts", "--data", str(data)]) == 2  # --model is required
    assert cli(["eval", "nope"]) == 2


# --------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_metrics_by_hand():
    ranked = [["d3", "d1", "d2", "d4"], ["d4", "d3", "d2", "d1"]]
    relevant = [{"d1": 2, "d2": 1}, {"d9": 1, "d1": 1, "d3": 0}]
    m = retrieval_metrics(ranked, relevant, ks=(1, 2, 4))
    # query 1: gains (0, 2, 1) -> DCG = 2/log2(3) + 1/2; ideal (2, 1) -> 2 + 1/log2(3)
    ndcg1 = (2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3))
    # query 2: the relevant d1 at rank 4 (d9 never retrieved) -> DCG = 1/log2(5); ideal (1, 1) -> 1 + 1/log2(3)
    ndcg2 = (1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg1 + ndcg2) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@4"] == pytest.approx((1 + 1 / 2) / 2)


def test_top_k_dense_and_sparse_agree():
    from scipy import sparse

    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(5, 8)), rng.normal(size=(30, 8))
    idx, scores = top_k(q, d, 7, chunk=2)
    full = q @ d.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :7])
    idx_sparse, _ = top_k(sparse.csr_matrix(q), sparse.csr_matrix(d), 7)
    np.testing.assert_array_equal(idx_sparse, idx)


def write_beir(d: Path) -> None:
    d.mkdir()
    docs = [("d1", "Cats", "cats purr and chase mice"), ("d2", "", "stock markets fell sharply on monday"), ("d3", "Rain", "heavy rain floods the valley")]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in [("q1", "why do cats purr"), ("q2", "markets fell"), ("q3", "no judgments")]))
    (d / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")


def test_retrieval_set_tfidf_and_command(neo_dir, tmp_path):
    d = tmp_path / "beir"
    write_beir(d)
    data = read_retrieval_set(d)
    assert data.corpus["d1"] == "Cats cats purr and chase mice" and data.qrels == {"q1": {"d1": 1.0}, "q2": {"d2": 2.0}}
    m = evaluate_tfidf(data)
    assert m["mrr@10"] == 1.0 and m["ndcg@10"] == 1.0 and m["recall@1"] == 1.0
    out = tmp_path / "r.json"
    assert cli(["eval", "retrieval", "--model", str(neo_dir), "--data", str(d), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["queries"] == 2 and res["documents"] == 3 and set(res["results"]) == {"tfidf", str(neo_dir)}
    assert set(res["results"]["tfidf"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"}


def test_retrieval_set_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        read_retrieval_set(tmp_path / "missing")
    d = tmp_path / "beir"
    write_beir(d)
    (d / "qrels.tsv").unlink()
    with pytest.raises(UserError, match="no qrels"):
        read_retrieval_set(d)
    (d / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td7\t1\n")
    with pytest.raises(UserError, match="'d7' is not in corpus"):
        read_retrieval_set(d)
    (d / "corpus.jsonl").write_text('{"_id": "d1", "body": "no text field"}\n')
    with pytest.raises(UserError, match="corpus.jsonl line 1: expected a JSON object with keys _id, text"):
        read_retrieval_set(d)
    with pytest.raises(UserError, match="no query has a relevant document"):
        evaluate_tfidf(RetrievalSet("x", {"q": "a"}, {"d": "a"}, {"other": {"d": 1}}))


def test_news_task_is_a_fixed_sample():
    try:
        task, train = news_split()
    except UserError as e:
        pytest.skip(str(e))
    again, _ = news_split()
    assert len(task.queries) == 1000 and task.queries == again.queries
    assert len(task.corpus) > 3700 and all(len(r) == 1 and next(iter(r)) in task.corpus for r in task.qrels.values())
    query_articles = {next(iter(r)) for r in task.qrels.values()}
    assert not query_articles & {a["id"] for a in train}  # training pairs never include an evaluation query
    assert len(train) > 2500


# --------------------------------------------------------------------------------------
# neobert embed


def test_embed_command_inputs_and_formats(neo_dir, tmp_path, monkeypatch, capsys):
    base = ["embed", "--model", str(neo_dir)]
    assert cli(base + TEXTS[:2] + ["--output", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (2, 32)
    (tmp_path / "in.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    assert cli(base + ["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.parquet")]) == 0
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert table["text"] == TEXTS[:2]
    np.testing.assert_allclose(np.array(table["embedding"]), emb, atol=1e-6)
    (tmp_path / "in.jsonl").write_text(json.dumps({"body": TEXTS[1]}) + "\n")
    assert cli(base + ["--input", str(tmp_path / "in.jsonl"), "--field", "body", "--output", str(tmp_path / "e.jsonl")]) == 0
    row = json.loads((tmp_path / "e.jsonl").read_text())
    assert row["text"] == TEXTS[1] and np.allclose(row["embedding"], emb[1], atol=1e-6)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXTS[0] + "\n"))
    assert cli(base) == 0  # stdin in, JSONL on stdout
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["text"] == TEXTS[0] and np.allclose(row["embedding"], emb[0], atol=1e-6)


def test_embed_command_errors(neo_dir, tmp_path, capsys):
    base = ["embed", "--model", str(neo_dir)]
    assert cli(base + ["--input", str(tmp_path / "missing.txt")]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert cli(base + ["hello", "--output", str(tmp_path / "e.csv")]) == 2
    assert ".npy, .jsonl or .parquet" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    assert cli(base + ["--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli(["embed", "--model", str(tmp_path / "nope"), "hi"]) == 2


# --------------------------------------------------------------------------------------
# Contrastive training: the loss against a naive loop, sampling, data, a run with resume


def naive_infonce(q, p, negatives, temperature, symmetric):
    """InfoNCE written out query by query: softmax over every positive and negative in the batch."""
    qn = torch.nn.functional.normalize(q, dim=-1)
    docs = torch.nn.functional.normalize(torch.cat([p, *negatives]), dim=-1)
    forward = []
    for i in range(len(q)):
        logits = torch.stack([qn[i] @ docs[j] for j in range(len(docs))]) / temperature
        forward.append(torch.logsumexp(logits, 0) - logits[i])
    loss = torch.stack(forward).mean()
    if symmetric:  # each positive against every query
        pn = docs[: len(q)]
        backward = []
        for i in range(len(q)):
            logits = torch.stack([pn[i] @ qn[j] for j in range(len(q))]) / temperature
            backward.append(torch.logsumexp(logits, 0) - logits[i])
        loss = (loss + torch.stack(backward).mean()) / 2
    return loss


@pytest.mark.parametrize("symmetric, n_negatives", [(False, 0), (False, 2), (True, 2)])
def test_infonce_and_gradient_cache_match_a_naive_loop(neo_dir, symmetric, n_negatives):
    from neobert.train.contrastive import LossArgs, build_loss

    st = load_encoder(str(neo_dir), device="cpu").model
    st.train()
    queries = ["what is a cat", "stock market news", "rain in the valley", "who won the match"]
    docs = ["cats are small pets that purr", "markets fell on monday", "heavy rain floods the valley today", "the home team won 2-1"]
    negs = [[f"unrelated text number {i} {j}" + " word" * (i + j) for i in range(4)] for j in range(n_negatives)]
    columns = [queries, docs, *negs]
    features = [st.preprocess(c) for c in columns]
    params = [p for p in st.parameters() if p.requires_grad]

    embeddings = [st(dict(f))["sentence_embedding"] for f in features]
    expected = naive_infonce(embeddings[0], embeddings[1], embeddings[2:], 0.07, symmetric)
    expected_grads = torch.autograd.grad(expected, params)

    for mini_batch_size in (0, 3):  # plain, and gradient-cached in chunks of 3 texts
        st.zero_grad()
        loss_fn = build_loss(st, LossArgs(temperature=0.07, symmetric=symmetric, mini_batch_size=mini_batch_size))
        loss = loss_fn([dict(f) for f in features], None)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5), mini_batch_size
        for p, g in zip(params, expected_grads):  # float32: summation order differs, so tolerances scale with the gradient
            torch.testing.assert_close(p.grad, g, atol=1e-5 * float(g.abs().max()), rtol=1e-3)


def test_batch_plan_samples_datasets_by_sqrt_size_one_per_batch():
    from itertools import islice

    from neobert.data.pairs import batch_plan, dataset_probabilities

    np.testing.assert_allclose(dataset_probabilities([100, 400, 1600]), [1 / 7, 2 / 7, 4 / 7])
    sizes, bs = [100, 400], 10
    batches = list(islice(batch_plan(sizes, bs, seed=3), 3000))
    share = np.mean([k for k, _ in batches])
    assert share == pytest.approx(2 / 3, abs=0.03)
    for k, idx in batches:
        assert len(idx) == bs and idx.max() < sizes[k]  # every batch from one dataset
    first_pass = np.concatenate([idx for k, idx in batches if k == 0][:10])
    assert sorted(first_pass) == list(range(100))  # a pass visits each row once
    again = list(islice(batch_plan(sizes, bs, seed=3), 3000))
    assert all(k == k2 and (i == i2).all() for (k, i), (k2, i2) in zip(batches, again))
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        next(batch_plan([5, 100], 10, seed=0))


def test_load_pairs_formats_and_errors(tmp_path):
    import pyarrow as pa

    from neobert.data.pairs import DatasetArgs, load_pairs

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}a", f"n{i}b"][: 1 + i % 2]}) + "\n" for i in range(4)))
    s = load_pairs(DatasetArgs(path=str(jsonl), query_instruction="Q: ", document_instruction="D: "), hard_negatives=2)
    assert s.name == "a" and s.rows[1] == ("q1", "p1", ["n1a"])  # one row has a single negative: all keep one
    assert s.columns([0, 1]) == [["Q: q0", "Q: q1"], ["D: p0", "D: p1"], ["D: n0a", "D: n1a"]]
    assert load_pairs(DatasetArgs(path=str(jsonl)), hard_negatives=0).rows[0] == ("q0", "p0", [])
    tsv = tmp_path / "b.tsv"
    tsv.write_text('anchor\tpositive\tnegative_1\tnegative_2\nsay "hi\thello\tbye\tno\n')
    assert load_pairs(DatasetArgs(path=str(tsv)), hard_negatives=5).rows == [('say "hi', "hello", ["bye", "no"])]
    pq.write_table(pa.table({"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"], "score": [4.5, 1.0, 5.0]}), tmp_path / "c.parquet")
    assert load_pairs(DatasetArgs(path=str(tmp_path / "c.parquet"), min_score=4.0), 1).rows == [("a", "x", []), ("c", "z", [])]
    with pytest.raises(UserError, match="need min_score"):
        load_pairs(DatasetArgs(path=str(tmp_path / "c.parquet")), 1)
    with pytest.raises(UserError, match="not found"):
        load_pairs(DatasetArgs(path=str(tmp_path / "missing.jsonl")), 1)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(UserError, match="expected query"):
        load_pairs(DatasetArgs(path=str(tmp_path / "d.jsonl")), 1)
    # Columns by name (sentence-transformers/wikihow: text -> summary), the instruction still prepended
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "long post", "summary": "title", "answer": "x"}) + "\n")
    e = load_pairs(DatasetArgs(path=str(tmp_path / "e.jsonl"), query_column="text", positive_column="summary", query_instruction="W: "), 1)
    assert e.rows == [("long post", "title", [])] and e.columns([0]) == [["W: long post"], ["title"]]
    with pytest.raises(UserError, match="must both name columns"):
        load_pairs(DatasetArgs(path=str(tmp_path / "e.jsonl"), query_column="text"), 1)


def test_contrastive_run_resumes_exactly(neo_dir, tmp_path):
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"
    topics = ["cats", "rain", "markets", "football", "music", "trains", "coffee", "space"]
    pairs.write_text("".join(json.dumps({"query": f"about {t} {i}", "positive": f"a text on {t}, part {i}"}) + "\n" for i in range(2) for t in topics))
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{sc}\t{a}\t{b}\n" for i, (a, b, sc) in enumerate([("cats", "a cat", 4.5), ("rain", "markets", 0.5), ("music", "songs", 4.0)])))

    def run(out, *extra):
        args = [f"model.init_from={neo_dir}", f"data.datasets=[{{path: {pairs}, query_instruction: 'q: '}}]", f"train.output_dir={out}",
                "train.max_steps=4", "train.batch_size=4", "loss.mini_batch_size=2", "loss.symmetric=true", "train.bf16=false",
                "train.lr=1e-3", "train.warmup_steps=1", "train.save_every=2", "train.log_every=1", f"train.eval_sts={sts}", *extra]
        assert cli(["contrastive", *args]) == 0

    run(tmp_path / "a")
    run(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    run(tmp_path / "b")  # resumes from step 2
    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and any("sts_spearman" in r for r in records)
    final = load_encoder(str(tmp_path / "b"), device="cpu")  # the run directory's final/
    assert final.model.prompts["query"] == "q: " and final.encode(["hello"]).shape == (1, 32)
    before = load_encoder(str(neo_dir), device="cpu").encode(["hello"])
    assert not np.allclose(final.encode(["hello"]), before)


def test_contrastive_from_a_contrastive_run_directory_keeps_its_pooling(neo_dir, tmp_path):
    """model.init_from=RUN where RUN/final is a sentence-transformers directory: its own pooling
    (here cls) is kept, and model.pooling (default mean) is not forced on it."""
    previous = tmp_path / "previous"  # a contrastive run directory: final/ is a sentence-transformers model
    load_encoder(str(neo_dir), pooling="cls", device="cpu").model.save(str(previous / "final"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"about {t}", "positive": f"a text on {t}"}) + "\n" for t in ["cats", "rain", "music", "coffee"]))
    out = tmp_path / "next"
    assert cli(["contrastive", f"model.init_from={previous}", f"data.datasets=[{{path: {pairs}}}]", f"train.output_dir={out}",
                "train.max_steps=1", "train.batch_size=2", "loss.mini_batch_size=0", "train.bf16=false"]) == 0
    modules = json.loads((out / "final" / "modules.json").read_text())
    pooling = json.loads((out / "final" / modules[1]["path"] / "config.json").read_text())
    assert pooling["pooling_mode"] == "cls"

"""``neobert serve``: the real server in a subprocess on 127.0.0.1, driven with httpx.

Served results are compared with the same computation done directly (``Encoder.encode``,
the masked-LM and classifier heads); batching of concurrent requests must not change them;
limits give 4xx JSON errors and leave the server up; SIGTERM lets requests in flight finish.
"""

import asyncio
import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, load_tokenizer
from neobert.cli import main as cli
from neobert.embeddings import export_sentence_transformers, load_encoder

TEXTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "a short one",
    "sentence embeddings map text to vectors; similar meanings give similar vectors",
    "padding must not change a single number",
    "x y",
]


def tiny_config(**kw) -> NeoBERTConfig:
    return NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=64, **kw)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("serve") / "mlm"
    NeoBERTForMaskedLM(tiny_config()).save_pretrained(d)
    load_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def st_dir(mlm_dir, tmp_path_factory) -> Path:
    """The masked LM exported as a sentence-transformers directory (no NeoBERT code needed)."""
    return export_sentence_transformers(str(mlm_dir), tmp_path_factory.mktemp("serve") / "st", normalize=True)


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("serve") / "cls"
    NeoBERTForSequenceClassification(tiny_config(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})).save_pretrained(d)
    load_tokenizer().save_pretrained(d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``neobert serve`` in a subprocess; ``wait()`` returns once /health answers."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "neobert", "serve", "--model", str(model), "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(self) -> "Server":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not answer /health within 120 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def servers(mlm_dir, cls_dir, st_dir):
    """The three servers of this module, started together (their start-up is mostly imports)."""
    started = {
        "mlm": Server(mlm_dir, "--max-texts-per-request", "8", "--max-tokens-per-text", "32", "--max-body-bytes", "20000", "--max-wait-ms", "20"),
        # a 1 s batching wait keeps requests queued when the last test sends SIGTERM
        "cls": Server(cls_dir, "--max-wait-ms", "1000"),
        "st": Server(st_dir),
    }
    yield started
    codes = {name: server.stop() for name, server in started.items()}
    assert codes == {name: 0 for name in started}


@pytest.fixture(scope="module")
def mlm_server(servers):
    return servers["mlm"].wait()


@pytest.fixture(scope="module")
def cls_server(servers):
    return servers["cls"].wait()


def embed(url: str, texts, **kw) -> np.ndarray:
    r = httpx.post(url + "/v1/embeddings", json={"input": texts, **kw}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    if kw.get("encoding_format") == "base64":
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def metric(url: str, name: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search("^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --------------------------------------------------------------------------------------


def test_embeddings_equal_direct_encode(mlm_server, mlm_dir):
    direct = load_encoder(str(mlm_dir), device="cpu").encode(TEXTS)
    served = embed(mlm_server.url, TEXTS, model="mlm")
    np.testing.assert_allclose(served, direct, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(embed(mlm_server.url, TEXTS, encoding_format="base64"), served)  # float32 bytes, exact
    one = httpx.post(mlm_server.url + "/v1/embeddings", json={"input": TEXTS[1]}, timeout=30).json()
    tokens = len(load_tokenizer()(TEXTS[1])["input_ids"])
    assert one["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} and one["model"] == "mlm"
    np.testing.assert_allclose(one["data"][0]["embedding"], direct[1], atol=1e-5, rtol=0)


def test_sentence_transformers_export_serves_embeddings_only(servers, st_dir):
    server = servers["st"].wait()
    assert httpx.get(server.url + "/health", timeout=10).json()["capabilities"] == ["embeddings"]
    direct = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS)
    served = embed(server.url, TEXTS)
    np.testing.assert_allclose(served, direct, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)  # its Normalize module ran
    missing = httpx.post(server.url + "/fill-mask", json={"input": "[MASK]"}, timeout=30)
    assert missing.status_code == 404 and "masked-LM" in missing.json()["error"]["message"]


def test_concurrent_requests_are_batched_without_changing_results(mlm_server):
    alone = np.concatenate([embed(mlm_server.url, [t]) for t in TEXTS])
    batches_before = metric(mlm_server.url, 'neobert_batch_texts_count{task="embeddings"}')
    texts_before = metric(mlm_server.url, 'neobert_texts_total{task="embeddings"}')

    async def many():
        async with httpx.AsyncClient(base_url=mlm_server.url, timeout=30) as client:
            requests = [client.post("/v1/embeddings", json={"input": [TEXTS[i % len(TEXTS)]]}) for i in range(24)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(many())
    together = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(together, alone[np.arange(24) % len(TEXTS)], atol=1e-5, rtol=0)
    batches = metric(mlm_server.url, 'neobert_batch_texts_count{task="embeddings"}') - batches_before
    assert metric(mlm_server.url, 'neobert_texts_total{task="embeddings"}') - texts_before == 24
    assert batches < 24, "24 concurrent one-text requests ran one at a time: no dynamic batching"


def test_multi_text_requests_split_across_batches_come_back_in_order(mlm_server, mlm_dir):
    """Concurrent 8-text requests: their texts are sorted by length across requests and cut into
    several model batches (more tokens than one batch holds), and each request still gets its own
    texts' embeddings, in its own order, equal to the direct encode."""
    texts = [f"{TEXTS[i % len(TEXTS)]} {'and more words ' * (i % 5)}request {i}" for i in range(96)]
    direct = load_encoder(str(mlm_dir), device="cpu").encode(texts)
    batches_before = metric(mlm_server.url, 'neobert_batch_texts_count{task="embeddings"}')

    async def many():
        async with httpx.AsyncClient(base_url=mlm_server.url, timeout=30) as client:
            requests = [client.post("/v1/embeddings", json={"input": texts[k::12], "encoding_format": "base64"}) for k in range(12)]
            return await asyncio.gather(*requests)

    for k, r in enumerate(asyncio.run(many())):
        assert r.status_code == 200, r.text
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
        np.testing.assert_allclose(got, direct[k::12], atol=1e-6, rtol=0)
    # 1,626 tokens against a 1,024-token budget: at least two batches
    assert metric(mlm_server.url, 'neobert_batch_texts_count{task="embeddings"}') - batches_before >= 2


def test_engine_tokenizes_once_and_feeds_the_ids_to_the_model(mlm_dir):
    """The ids counted for the limits are the model's input: they equal the tokenizer's, and the
    embeddings computed from them equal SentenceTransformer.encode of the texts."""
    from neobert.serve_engine import Engine

    engine = Engine(str(mlm_dir), device="cpu")
    assert engine.ids_as_features  # a plain pipeline: no prompt, the probe features matched
    texts = [*TEXTS, "  Ünïcödé CAFÉ  crème\tbrûlée ", "日本語 ☃", "UPPER case, punctuation!?"]
    ids = engine.tokenize(texts)
    tok = load_tokenizer()
    assert ids == tok(texts)["input_ids"]
    assert engine.tokenize([("a man eats", "someone is eating")]) == [tok("a man eats", "someone is eating")["input_ids"]]
    served = np.stack(engine.run("embeddings", texts, ids, {}))
    direct = engine.encoder.model.encode(texts, batch_size=len(texts))
    np.testing.assert_allclose(served, direct, atol=1e-6, rtol=0)


def test_engine_with_a_prompt_embeds_through_encode(st_dir, tmp_path):
    """A pipeline with a default prompt is not fed raw ids (they would miss the prompt): the
    engine falls back to encode, and the served embedding is the prompted one."""
    from neobert.serve_engine import Engine

    st = SentenceTransformer(str(st_dir), device="cpu")
    st.prompts, st.default_prompt_name = {"query": "query: "}, "query"
    st.save(str(tmp_path / "prompted"))
    engine = Engine(str(tmp_path / "prompted"), device="cpu")
    assert not engine.ids_as_features
    served = np.stack(engine.run("embeddings", TEXTS, engine.tokenize(TEXTS), {}))
    np.testing.assert_allclose(served, st.encode(TEXTS), atol=1e-6, rtol=0)
    assert np.abs(served - st.encode(TEXTS, prompt="")).max() > 1e-3  # the prompt changed them


def test_batcher_sorts_across_requests_and_returns_each_its_own_results():
    """The model thread's batching without HTTP: concurrent requests share sorted batches cut at
    the token budget, each gets its own results in its own order, a failing batch answers 500
    (and the batcher goes on), and a full queue answers 503."""
    from neobert.serve_engine import Batcher, Metrics, RequestError

    class Recorder:
        def __init__(self):
            self.batches = []

        def run(self, task, texts, ids, options):
            self.batches.append([len(row) for row in ids])
            if "boom" in texts:
                raise ValueError("bad input")
            return [f"{t}:{len(row)}" for t, row in zip(texts, ids)]

    engine = Recorder()

    async def scenario():
        batcher = Batcher(engine, Metrics(), max_batch_tokens=12, max_wait_ms=200, max_queue_texts=10)
        batcher.start()
        requests = {"r1": ["a", "bbbb", "cc"], "r2": ["ddd", "e"], "r3": ["ffff", "gg"]}
        results = await asyncio.gather(*(batcher.submit("embeddings", texts, [[0] * len(t) for t in texts], {}) for texts in requests.values()))
        with pytest.raises(RequestError) as failed:
            await batcher.submit("embeddings", ["boom"], [[0]], {})
        with pytest.raises(RequestError) as busy:
            await batcher.submit("embeddings", list("abcdefghijk"), [[0]] * 11, {})
        after = await batcher.submit("embeddings", ["ok"], [[0, 0]], {})
        await batcher.stop()
        return requests, results, failed.value, busy.value, after

    requests, results, failed, busy, after = asyncio.run(scenario())
    assert results == [[f"{t}:{len(t)}" for t in texts] for texts in requests.values()]
    # collection stops at the budget: a bbbb cc ddd e ffff (15 tokens >= 12), sorted by length and
    # cut where the padded batch would pass 12 tokens; gg forms the next batch
    assert engine.batches[:3] == [[1, 1, 2, 3], [4, 4], [2]]
    assert (failed.status, busy.status) == (500, 503) and "ValueError: bad input" in failed.message
    assert after == ["ok:2"]


def test_fill_mask_equals_the_masked_lm(mlm_server, mlm_dir):
    texts = ["the [MASK] sat on the mat", "paris is the [MASK] of [MASK] ."]
    r = httpx.post(mlm_server.url + "/fill-mask", json={"input": texts, "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    tok, model = load_tokenizer(), NeoBERTForMaskedLM.from_pretrained(mlm_dir).eval()
    for text, row in zip(texts, r.json()["data"]):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            probs = model(ids).logits[0].softmax(-1)
        positions = (ids[0] == tok.mask_token_id).nonzero().flatten().tolist()
        assert [m["position"] for m in row["masks"]] == positions
        for m in row["masks"]:
            scores, top = probs[m["position"]].topk(3)
            assert [p["token"] for p in m["predictions"]] == top.tolist()
            np.testing.assert_allclose([p["score"] for p in m["predictions"]], scores.numpy(), rtol=1e-4)


def test_limits_give_4xx_json_and_the_server_stays_up(mlm_server):
    url = mlm_server.url
    cases = {
        413: {"input": ["word " * 5000]},  # 25000 bytes > 20000
        400: {"input": ["a"] * 9},  # > 8 texts
        422: {"input": 12},
    }
    for status, body in cases.items():
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=30)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
    too_long = httpx.post(url + "/v1/embeddings", json={"input": ["word " * 40]}, timeout=30)  # 42 tokens > 32
    assert too_long.status_code == 400 and "42 tokens" in too_long.json()["error"]["message"]
    for body, status in ((b"{not json", 422), (b'{"inputs": "x"}', 422), (b'{"input": []}', 400)):
        r = httpx.post(url + "/v1/embeddings", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text
    no_mask = httpx.post(url + "/fill-mask", json={"input": "no mask here"}, timeout=30)
    assert no_mask.status_code == 400 and "[MASK]" in no_mask.json()["error"]["message"]
    wrong_model = httpx.post(url + "/v1/embeddings", json={"input": "x", "model": "other"}, timeout=30)
    assert wrong_model.status_code == 404
    assert httpx.get(url + "/health", timeout=10).json()["capabilities"] == ["embeddings", "fill-mask"]
    missing = httpx.post(url + "/classify", json={"input": "x"}, timeout=30)
    assert missing.status_code == 404 and "sequence-classification" in missing.json()["error"]["message"]
    assert embed(url, ["still serving"]).shape == (1, 32)


def test_metrics_count_requests(mlm_server):
    name = 'neobert_requests_total{path="/health",status="200"}'
    before = metric(mlm_server.url, name)
    for _ in range(3):
        httpx.get(mlm_server.url + "/health", timeout=10)
    assert metric(mlm_server.url, name) - before == 3
    assert metric(mlm_server.url, 'neobert_request_seconds_count{path="/health"}') >= 3


def test_classify_equals_the_classifier(cls_server, cls_dir):
    inputs = ["great movie", ["a man is eating", "someone eats"], "terrible, boring and far too long"]
    r = httpx.post(cls_server.url + "/classify", json={"input": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    tok, model = load_tokenizer(), NeoBERTForSequenceClassification.from_pretrained(cls_dir).eval()
    for x, row in zip(inputs, r.json()["data"]):
        enc = tok(*(x if isinstance(x, list) else [x]), return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            probs = model(**enc).logits[0].softmax(-1)
        np.testing.assert_allclose([row["scores"][k] for k in ("neg", "neu", "pos")], probs.numpy(), rtol=1e-4, atol=1e-6)
        assert row["label"] == ("neg", "neu", "pos")[int(probs.argmax())]
    assert httpx.post(cls_server.url + "/fill-mask", json={"input": "[MASK]"}, timeout=30).status_code == 404


def test_bad_model_and_busy_port_are_one_line_errors(tmp_path, capsys, mlm_server, mlm_dir):
    assert cli(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'nope'}"]
    assert cli(["serve", "--model", str(mlm_dir), "--port", str(mlm_server.port)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{mlm_server.port}: Address already in use"]


def test_sigterm_finishes_requests_in_flight_then_exits_0(cls_server):
    """Stops the classifier's server: this test comes after every other test that uses it."""
    server = cls_server

    async def in_flight():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            sent = [asyncio.create_task(client.post("/v1/embeddings", json={"input": [t]})) for t in TEXTS]
            await asyncio.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent)

    responses = asyncio.run(in_flight())
    assert [r.status_code for r in responses] == [200] * len(TEXTS)
    assert server.proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)

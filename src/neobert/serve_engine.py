"""The model side of ``neobert serve``: what a model directory can do, and dynamic batching.

:class:`Engine` loads a model directory once and runs batches of texts for three tasks:

* ``embeddings``: any encoder that :func:`neobert.embeddings.load_encoder` loads (a
  sentence-transformers directory, any NeoBERT or other Hugging Face encoder, a run
  directory), through ``SentenceTransformer.encode``, so a served embedding is the one
  ``neobert embed`` and ``Encoder.encode`` compute;
* ``fill-mask``: a directory whose ``config.json`` names a ``*ForMaskedLM`` architecture;
* ``classify``: a directory whose ``config.json`` names a ``*ForSequenceClassification``.

A head model shares its encoder with the embedding pipeline (one copy of the weights).

:class:`Batcher` turns concurrent requests into batches: every text is a queue item; one
worker takes the first waiting item, keeps collecting until the batch holds
``max_batch_tokens`` tokens or the first item has waited ``max_wait_ms``, sorts what it has
by length and runs it on one thread (the model's default padding-free path wastes no compute
on the little padding that remains). Results go back to each request in its own order.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

import neobert  # noqa: F401  (registers NeoBERT with the transformers Auto classes)
from neobert.embeddings import load_encoder, resolve_model
from neobert.errors import UserError

TASKS = ("embeddings", "fill-mask", "classify")


class RequestError(Exception):
    """A request the server refuses with ``status`` and a one-line message (never a crash)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class Metrics:
    """The Prometheus series the server exports on ``/metrics`` (one registry per server)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("neobert_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry)
        self.latency = Histogram(
            "neobert_request_seconds", "HTTP request latency by path", ["path"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_texts = Histogram(
            "neobert_batch_texts", "texts per model batch", ["task"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_tokens = Histogram(
            "neobert_batch_tokens", "padded tokens per model batch", ["task"], registry=self.registry,
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768),
        )
        self.batch_seconds = Histogram("neobert_batch_seconds", "model time per batch", ["task"], registry=self.registry)
        self.texts = Counter("neobert_texts", "texts processed by task", ["task"], registry=self.registry)
        self.queue = Gauge("neobert_queue_texts", "texts waiting for the model", registry=self.registry)


class Engine:
    """One model directory, loaded once; ``run(task, texts, options)`` computes a batch (blocking)."""

    def __init__(self, name_or_path: str, device: str | None = None, pooling: str | None = None):
        path = resolve_model(name_or_path)
        self.encoder = load_encoder(path, pooling=pooling, device=device)
        st = self.encoder.model
        self.tokenizer = st.tokenizer
        if self.tokenizer is None:
            raise UserError(f"{name_or_path}: the model has no tokenizer to serve text with")
        self.device = st.device
        self.head, self.head_task, self.token_types = None, None, False
        max_positions = None
        local = Path(path)
        if (local / "config.json").is_file() and not (local / "modules.json").is_file():
            config = AutoConfig.from_pretrained(path)
            max_positions = getattr(config, "max_position_embeddings", None)
            architectures = config.architectures or []
            loader = None
            if any(a.endswith("ForMaskedLM") for a in architectures) and self.tokenizer.mask_token is not None:
                loader, self.head_task = AutoModelForMaskedLM, "fill-mask"
            elif any(a.endswith("ForSequenceClassification") for a in architectures):
                loader, self.head_task = AutoModelForSequenceClassification, "classify"
            if loader is not None:
                verbosity = transformers.logging.get_verbosity()
                transformers.logging.set_verbosity_error()  # no load report for the head's own weights
                try:
                    self.head = loader.from_pretrained(path).to(self.device).eval()
                finally:
                    transformers.logging.set_verbosity(verbosity)
                st[0].model = self.head.base_model  # the embedding pipeline runs the head's encoder: one copy
                # BERT-style heads read the segment ids of text pairs; NeoBERT has none
                self.token_types = getattr(config, "type_vocab_size", None) is not None
        self.capabilities = ["embeddings"] + ([self.head_task] if self.head_task else [])
        self.dim = self.encoder.dim
        # longer texts would be truncated (embeddings) or run past the trained length
        self.max_length = min(n for n in (st.max_seq_length, max_positions, 10**9) if n)

    def missing(self, task: str) -> str | None:
        """Why ``task`` is not available with this model, or None."""
        if task in self.capabilities:
            return None
        need = {"fill-mask": "a masked-LM directory (architectures *ForMaskedLM)", "classify": "a sequence-classification directory (architectures *ForSequenceClassification)"}[task]
        return f"{task} is not available for this model: it needs {need}; this server offers {', '.join(self.capabilities)}"

    def count_tokens(self, texts: list) -> list[int]:
        """Token counts with special tokens (texts are strings, or (a, b) pairs for classify)."""
        counts = [0] * len(texts)
        for kind in (str, tuple):
            idx = [i for i, t in enumerate(texts) if isinstance(t, kind)]
            if idx:
                args = ([texts[i][0] for i in idx], [texts[i][1] for i in idx]) if kind is tuple else ([texts[i] for i in idx],)
                for i, ids in zip(idx, self.tokenizer(*args, truncation=False, verbose=False)["input_ids"]):
                    counts[i] = len(ids)
        return counts

    def _batch(self, texts: list) -> dict[str, torch.Tensor]:
        pairs = isinstance(texts[0], tuple)
        args = ([a for a, _ in texts], [b for _, b in texts]) if pairs else (list(texts),)
        enc = self.tokenizer(*args, padding=True, truncation=False, return_tensors="pt", return_token_type_ids=self.token_types)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def run(self, task: str, texts: list, options: dict) -> list:
        """Results for ``texts``, one per text, in order (called on the batching thread)."""
        if task == "embeddings":
            emb = self.encoder.model.encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_numpy=True)
            return list(emb.astype(np.float32, copy=False))
        if task == "classify":
            return self._classify(texts)
        return self._fill_mask(texts, options["top_k"])

    def _classify(self, texts: list) -> list[dict]:
        """Label probabilities (softmax; sigmoid for multi-label) or the value of a regressor."""
        logits = self.head(**self._batch(texts)).logits.float().cpu()
        config = self.head.config
        if config.num_labels == 1 and config.problem_type in (None, "regression"):
            return [{"value": float(v)} for v in logits[:, 0]]
        probs = torch.sigmoid(logits) if config.problem_type == "multi_label_classification" else logits.softmax(-1)
        labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        return [
            {"label": labels[int(p.argmax())], "score": float(p.max()), "scores": {labels[i]: float(p[i]) for i in range(len(labels))}}
            for p in probs
        ]

    def _fill_mask(self, texts: list[str], top_k: int) -> list[list[dict]]:
        """The top_k tokens and probabilities at every [MASK] of every text."""
        batch = self._batch(texts)
        logits = self.head(**batch).logits  # (B, L, V)
        masked = batch["input_ids"] == self.tokenizer.mask_token_id
        results = []
        for row in range(len(texts)):
            per_mask = []
            for pos in masked[row].nonzero().flatten().tolist():
                scores, ids = logits[row, pos].float().softmax(-1).topk(top_k)
                per_mask.append({
                    "position": pos,
                    "predictions": [
                        {"token": int(i), "token_str": self.tokenizer.decode([int(i)]), "score": float(s)} for s, i in zip(scores, ids)
                    ],
                })
            results.append(per_mask)
        return results


@dataclass
class Item:
    """One text waiting for the model, with the future its request awaits."""

    task: str
    text: str | tuple[str, str]
    tokens: int
    options: dict
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Dynamic batching: one worker drains the queue into batches of sorted texts."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_tokens: int, max_wait_ms: float, max_queue_texts: int):
        self.engine, self.metrics = engine, metrics
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.max_queue_texts = max_queue_texts
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neobert-model")  # one model thread
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Called after the HTTP server has drained its requests: nothing is waiting any more."""
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, task: str, texts: list, tokens: list[int], options: dict) -> list:
        """Queue ``texts`` and wait for their results (in order)."""
        if self.queue.qsize() + len(texts) > self.max_queue_texts:
            raise RequestError(503, f"server busy: {self.queue.qsize()} texts are waiting (limit {self.max_queue_texts}); retry later")
        loop = asyncio.get_running_loop()
        items = [Item(task, t, n, options, loop.create_future()) for t, n in zip(texts, tokens)]
        for item in items:
            self.queue.put_nowait(item)
        self.metrics.queue.set(self.queue.qsize())
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _collect(self) -> list[Item]:
        """The next items: at least one, until the token budget is met or the first has waited max_wait."""
        items = [await self.queue.get()]
        tokens = items[0].tokens
        deadline = items[0].enqueued + self.max_wait
        while tokens < self.max_batch_tokens:
            if self.queue.empty():
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            items.append(item)
            tokens += item.tokens
        self.metrics.queue.set(self.queue.qsize())
        return items

    def _batches(self, items: list[Item]) -> list[list[Item]]:
        """Group by task (texts or pairs, fill-mask's top_k), sort by length, cut at max_batch_tokens padded tokens."""
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            if not item.future.done():  # a client that went away: skip its texts
                key = (item.task, isinstance(item.text, tuple), tuple(sorted(item.options.items())))
                groups.setdefault(key, []).append(item)
        batches = []
        for group in groups.values():
            group.sort(key=lambda it: it.tokens)
            batch: list[Item] = []
            for item in group:
                if batch and (len(batch) + 1) * item.tokens > self.max_batch_tokens:  # padded size if it joins
                    batches.append(batch)
                    batch = []
                batch.append(item)
            batches.append(batch)
        return batches

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for batch in self._batches(await self._collect()):
                task = batch[0].task
                start = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.executor, self.engine.run, task, [it.text for it in batch], batch[0].options)
                except Exception as e:  # a failed batch fails its requests (500), not the server
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(RequestError(500, f"model error: {type(e).__name__}: {e}"))
                    continue
                self.metrics.batch_seconds.labels(task).observe(time.perf_counter() - start)
                self.metrics.batch_texts.labels(task).observe(len(batch))
                self.metrics.batch_tokens.labels(task).observe(len(batch) * batch[-1].tokens)
                self.metrics.texts.labels(task).inc(len(batch))
                for it, result in zip(batch, results):
                    if not it.future.done():
                        it.future.set_result(result)

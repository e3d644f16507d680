"""The model side of ``neobert serve``: what a model directory can do, and dynamic batching.

:class:`Engine` loads a model directory once and runs batches of texts for three tasks:

* ``embeddings``: any encoder that :func:`neobert.embeddings.load_encoder` loads (a
  sentence-transformers directory, any NeoBERT or other Hugging Face encoder, a run
  directory), through ``SentenceTransformer.encode``, so a served embedding is the one
  ``neobert embed`` and ``Encoder.encode`` compute;
* ``fill-mask``: a directory whose ``config.json`` names a ``*ForMaskedLM`` architecture;
* ``classify``: a directory whose ``config.json`` names a ``*ForSequenceClassification``.

A head model shares its encoder with the embedding pipeline (one copy of the weights).

Each request is tokenized once, when it arrives (:meth:`Engine.tokenize`, the tokenizer's
Rust backend): the token counts enforce the limits and size the batches, and for embeddings
the same ids become the model's input, so the model thread does not tokenize again. That
shortcut is taken only where it is provably what ``SentenceTransformer.encode`` does: no
prompt, no truncated dimension, and the features it builds for probe texts equal the
pipeline's own ``preprocess`` (checked when the model loads); otherwise the batch goes
through ``encode`` itself.

:class:`Batcher` turns concurrent requests into batches on one model thread of its own:
every text is a queue item; the thread takes the first waiting item, keeps collecting until
the batch holds ``max_batch_tokens`` tokens or the first item has waited ``max_wait_ms``,
sorts what it has by length and runs it (the model's default padding-free path wastes no
compute on the little padding that remains). The thread forms its next batch as soon as one
is done, without waiting for the event loop, which only hands results back to the
requests, one call per batch.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sentence_transformers.util import batch_to_device
from tokenizers import Tokenizer
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

import neobert  # noqa: F401  (registers NeoBERT with the transformers Auto classes)
from neobert.embeddings import load_encoder, resolve_model
from neobert.errors import UserError
from neobert.loading import strict_weights

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
                    with strict_weights(path):  # an encoder tensor missing from the file would serve random outputs
                        self.head = loader.from_pretrained(path).to(self.device).eval()
                finally:
                    transformers.logging.set_verbosity(verbosity)
                st[0].model = self.head.base_model  # the embedding pipeline runs the head's encoder: one copy
                # BERT-style heads read the segment ids of text pairs; NeoBERT has none
                self.token_types = getattr(config, "type_vocab_size", None) is not None
        # A private copy of the fast tokenizer's backend: transformers sets truncation and padding
        # on the shared one for each call, and counting must see every token.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None:
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        self._token_type_ids, self._extra_features = False, {}
        self.ids_as_features = self._check_features()
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

    def tokenize(self, texts: list) -> list[list[int]]:
        """Token ids with special tokens, untruncated (texts are strings, or (a, b) pairs for classify)."""
        if self._backend is not None:  # the tokenizer's own Rust pipeline, without transformers' per-call overhead
            return [e.ids for e in self._backend.encode_batch_fast(texts)]
        ids: list = [None] * len(texts)
        for kind in (str, tuple):
            idx = [i for i, t in enumerate(texts) if isinstance(t, kind)]
            if idx:
                args = ([texts[i][0] for i in idx], [texts[i][1] for i in idx]) if kind is tuple else ([texts[i] for i in idx],)
                for i, row in zip(idx, self.tokenizer(*args, truncation=False, verbose=False)["input_ids"]):
                    ids[i] = row
        return ids

    def _features(self, ids: list[list[int]]) -> dict:
        """The padded batch ``SentenceTransformer.preprocess`` makes of these texts, from their ids."""
        lengths = [len(row) for row in ids]
        longest = max(lengths)
        input_ids = np.full((len(ids), longest), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for i, (row, n) in enumerate(zip(ids, lengths)):
            if self.tokenizer.padding_side == "left":
                input_ids[i, longest - n:], mask[i, longest - n:] = row, 1
            else:
                input_ids[i, :n], mask[i, :n] = row, 1
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._token_type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return {**features, **self._extra_features}

    def _check_features(self) -> bool:
        """Whether embeddings can skip ``encode``'s own tokenization: exactly what it would compute.

        True when the pipeline applies no prompt, truncates no dimension, and the features built
        from :meth:`tokenize` for probe texts (accents, case, spaces, punctuation, unknown
        characters, different lengths) equal its ``preprocess`` output, padding included.
        """
        st = self.encoder.model
        if self._backend is None or st._resolve_prompt(None, None) or st.truncate_dim is not None:
            return False
        if getattr(st, "_distributed_inference", None) is not None:
            return False
        probe = ["Hello, World!", "  naïve café  CRÈME brûlée  ", "x", "a longer text with several words; and 42 numbers...", "日本語 ☃ \t tab"]
        reference = st.preprocess(probe)
        tensors = {k for k, v in reference.items() if isinstance(v, torch.Tensor)}
        if not tensors <= {"input_ids", "attention_mask", "token_type_ids"}:
            return False
        self._token_type_ids = "token_type_ids" in tensors
        self._extra_features = {k: v for k, v in reference.items() if k not in tensors}
        mine = self._features(self.tokenize(probe))
        return mine.keys() == reference.keys() and all(
            torch.equal(mine[k], reference[k]) if k in tensors else mine[k] == reference[k] for k in mine
        )

    def _batch(self, texts: list) -> dict[str, torch.Tensor]:
        pairs = isinstance(texts[0], tuple)
        args = ([a for a, _ in texts], [b for _, b in texts]) if pairs else (list(texts),)
        enc = self.tokenizer(*args, padding=True, truncation=False, return_tensors="pt", return_token_type_ids=self.token_types)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def run(self, task: str, texts: list, ids: list[list[int]], options: dict) -> list:
        """Results for ``texts`` (tokenized as ``ids``), one per text, in order (called on the model thread)."""
        if task == "embeddings":
            st = self.encoder.model
            if self.ids_as_features:
                emb = st(batch_to_device(self._features(ids), self.device))["sentence_embedding"]
                emb = (emb.float() if emb.dtype == torch.bfloat16 else emb).cpu().numpy()  # as encode's convert_to_numpy
            else:
                emb = st.encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_numpy=True)
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


class Pending:
    """One request's texts in the queue: their results fill in as batches finish, in any order."""

    def __init__(self, future: asyncio.Future, n: int):
        self.future, self.results, self.left = future, [None] * n, n


@dataclass
class Item:
    """One text waiting for the model: the ``index``-th text of its request."""

    task: str
    text: str | tuple[str, str]
    ids: list[int]
    options: dict
    request: Pending
    index: int
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.ids)


class Batcher:
    """Dynamic batching on a model thread of its own, fed by a queue the event loop fills."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_tokens: int, max_wait_ms: float, max_queue_texts: int):
        self.engine, self.metrics = engine, metrics
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.max_queue_texts = max_queue_texts
        self.queue: collections.deque[Item] = collections.deque()
        self.ready = threading.Condition()  # guards queue and stopping
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="neobert-model", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    async def stop(self) -> None:
        """Called after the HTTP server has drained its requests: nothing is waiting any more."""
        with self.ready:
            self.stopping = True
            self.ready.notify()
        if self.thread.is_alive():
            await asyncio.to_thread(self.thread.join)

    async def submit(self, task: str, texts: list, ids: list[list[int]], options: dict) -> list:
        """Queue ``texts`` (tokenized as ``ids``) and wait for their results (in order)."""
        pending = Pending(self.loop.create_future(), len(texts))
        items = [Item(task, t, i, options, pending, k) for k, (t, i) in enumerate(zip(texts, ids))]
        with self.ready:
            waiting = len(self.queue)
            if waiting + len(texts) > self.max_queue_texts:
                raise RequestError(503, f"server busy: {waiting} texts are waiting (limit {self.max_queue_texts}); retry later")
            self.queue.extend(items)
            self.ready.notify()
        self.metrics.queue.set(waiting + len(texts))
        return await pending.future

    def _collect(self) -> list[Item] | None:
        """The next items (None when stopping): at least one, until the token budget is met or the first has waited max_wait."""
        with self.ready:
            while not self.queue:
                if self.stopping:
                    return None
                self.ready.wait()
            items = [self.queue.popleft()]
            tokens = items[0].tokens
            deadline = items[0].enqueued + self.max_wait
            while tokens < self.max_batch_tokens:
                if not self.queue:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0 or self.stopping:
                        break
                    self.ready.wait(timeout)
                    continue
                items.append(self.queue.popleft())
                tokens += items[-1].tokens
            self.metrics.queue.set(len(self.queue))
        return items

    def _batches(self, items: list[Item]) -> list[list[Item]]:
        """Group by task (texts or pairs, fill-mask's top_k), sort by length, cut at max_batch_tokens padded tokens."""
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            if not item.request.future.done():  # a client that went away: skip its texts
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

    def _work(self) -> None:
        while (items := self._collect()) is not None:
            for batch in self._batches(items):
                task = batch[0].task
                start = time.perf_counter()
                try:
                    results = self.engine.run(task, [it.text for it in batch], [it.ids for it in batch], batch[0].options)
                except Exception as e:  # a failed batch fails its requests (500), not the server
                    error = RequestError(500, f"model error: {type(e).__name__}: {e}")
                    self.loop.call_soon_threadsafe(self._fail, {id(it.request): it.request for it in batch}.values(), error)
                    continue
                self.metrics.batch_seconds.labels(task).observe(time.perf_counter() - start)
                self.metrics.batch_texts.labels(task).observe(len(batch))
                self.metrics.batch_tokens.labels(task).observe(len(batch) * batch[-1].tokens)
                self.metrics.texts.labels(task).inc(len(batch))
                done = []
                for it, result in zip(batch, results):
                    it.request.results[it.index] = result
                    it.request.left -= 1
                    if it.request.left == 0:
                        done.append(it.request)
                if done:
                    self.loop.call_soon_threadsafe(self._finish, done)

    @staticmethod
    def _finish(done: list[Pending]) -> None:
        for request in done:
            if not request.future.done():  # cancelled when its client went away
                request.future.set_result(request.results)

    @staticmethod
    def _fail(requests, error: RequestError) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

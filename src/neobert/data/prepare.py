"""``neobert prepare``: tokenize a source into a prepared corpus of shards, in parallel, on datatrove.

    neobert prepare [CONFIG.yaml] [key=value ...]
    neobert prepare data.source='corpus/*.parquet' prepare.output=/shared/corpus prepare.tasks=64

The source is any ``data.source`` (``builtin``, local files and globs, ``hf:NAME[:CONFIG]``
streamed); the output a prepared-corpus directory (layout in ``neobert.data.shards``).
The work is cut into ``prepare.tasks`` tasks, each reading its share of the source and
writing one shard, and runs on datatrove's ``LocalPipelineExecutor``: ``data.num_proc``
processes on this machine, tasks already finished skipped on a rerun. Local files are
shared out whole, file ``i`` to task ``i % tasks``; a hub dataset by its files when it has
more than one, else row by row (datatrove's ``HuggingFaceDatasetReader``); the built-in
corpus in contiguous blocks, so its shards in order hold its documents in order.

Several machines fill one shared directory by each running the same command with
``prepare.nodes=N prepare.node_rank=R``: machine R runs the R-th contiguous block of tasks
(under Slurm, a job array with ``prepare.node_rank=$SLURM_ARRAY_TASK_ID``). Whichever run
finds every shard finished writes the manifest; until then readers refuse the directory.

Killed at any moment and run again, a run redoes only the tasks that were in flight: a
shard exists only once complete (written aside, then renamed into place). A progress bar
counts the tokens of every shard of the directory, written by this machine or another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from datatrove.data import Document
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseReader
from loguru import logger
from tqdm.auto import tqdm

from neobert.data.config import DataConfig
from neobert.data.shards import MANIFEST, RECIPE, ShardWriter, finished_shards, shard_dir, write_manifest
from neobert.data.sources import read_texts
from neobert.errors import UserError

FORMAT = 1  # bump when the way documents become shards changes (part of the output's key)


@dataclass
class PrepareArgs:
    """Where the prepared corpus goes and how the work is shared out."""

    output: str | None = None
    """The prepared-corpus directory; null: <data.cache_dir>/prepared-<name>-<hash of the recipe>."""
    tasks: int | None = None
    """Tasks, one shard each; null: one per input file for local files (at most 1024), 1 for the
    built-in corpus, data.num_proc for a hub dataset. data.num_proc processes run them."""
    nodes: int = 1
    """Machines that fill the same output directory (each runs a contiguous block of the tasks)."""
    node_rank: int = 0
    """This machine's number, 0 .. nodes-1 (under Slurm: $SLURM_ARRAY_TASK_ID of a job array)."""
    batch_size: int = 1000
    """Documents per call of the tokenizer."""
    progress: bool = True
    """Show the progress bar (tokens/s) and the summary line on stderr."""


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareArgs = field(default_factory=PrepareArgs)

    def __post_init__(self):
        p = self.prepare
        if p.tasks is not None and p.tasks < 1:
            raise UserError(f"prepare.tasks={p.tasks} must be at least 1 (or null)")
        if p.nodes < 1 or not 0 <= p.node_rank < p.nodes:
            raise UserError(f"prepare.node_rank={p.node_rank} must be in 0..prepare.nodes-1 (prepare.nodes={p.nodes})")
        if p.batch_size < 1:
            raise UserError(f"prepare.batch_size={p.batch_size} must be at least 1")


# ---------------------------------------------------------------------------------------
# The recipe: what identifies a prepared corpus


def default_tasks(cfg: DataConfig) -> int:
    from neobert.data.sources import local_files

    if cfg.source == "builtin":
        return 1  # 3.4M tokens: one shard, the documents in their order
    if cfg.source.startswith("hf:"):
        return cfg.num_proc
    return min(len(local_files(cfg.source)), 1024)


def make_recipe(cfg: DataConfig, tokenizer, tasks: int) -> dict:
    from neobert.data.corpus import tokenizer_fingerprint
    from neobert.data.sources import describe_source

    return {
        "format": FORMAT,
        "source": cfg.source,
        "source_identity": describe_source(cfg),
        "tokenizer_name": cfg.tokenizer,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": "uint16" if len(tokenizer) <= 2**16 else "uint32",
        "heldout_fraction": cfg.heldout_fraction,
        "max_documents": cfg.max_documents,
        "tasks": tasks,
    }


def default_output(cfg: DataConfig, recipe: dict) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.source.removeprefix("hf:")).name or "corpus")[:40]
    return cfg.resolved_cache_dir() / f"prepared-{name}-{key}"


def claim_output(output: Path, recipe: dict) -> None:
    """Write the recipe into a new output, or check that an existing one was made by the same recipe."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / RECIPE
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != recipe:
            differ = sorted(k for k in set(existing) | set(recipe) if existing.get(k) != recipe.get(k))
            raise UserError(f"{output} holds a corpus prepared differently ({', '.join(differ)} differ): choose another prepare.output or delete it")
        return
    temporary = output / f".{RECIPE}.{uuid.uuid4().hex[:8]}"  # unique across machines sharing the directory
    temporary.write_text(json.dumps(recipe, indent=1))
    os.replace(temporary, path)  # concurrent first runs write the same recipe


# ---------------------------------------------------------------------------------------
# The pipeline steps (datatrove): a reader per kind of source, then the shard writer


class BuiltinReader(BaseReader):
    """The built-in corpus, its first ``limit`` documents, a contiguous block per task."""

    name = "neobert built-in corpus"

    def __init__(self, max_documents: int | None):
        super().__init__()
        self.max_documents = max_documents

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        texts = _builtin_texts()[: self.max_documents]
        start, stop = rank * len(texts) // world_size, (rank + 1) * len(texts) // world_size
        for i in range(start, stop):
            yield Document(text=texts[i], id=f"builtin/{i}")


class FileReader(BaseReader):
    """Local .txt/.jsonl/.parquet files, file ``i`` to task ``i % tasks``; bad input names file and line."""

    name = "neobert local files"

    def __init__(self, source: str, text_field: str, txt_split: str, limit_per_task: int | None):
        super().__init__()
        self.source, self.text_field, self.txt_split, self.limit_per_task = source, text_field, txt_split, limit_per_task

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from neobert.data.sources import local_files

        count = 0
        for path in local_files(self.source)[rank::world_size]:
            for number, text in read_texts(path, self.text_field, self.txt_split):
                if self.limit_per_task is not None and count >= self.limit_per_task:
                    return
                count += 1
                yield Document(text=text, id=f"{path}/{number}")


class ShardWriterStep(PipelineStep):
    """Tokenizes documents in batches (framed ``[CLS] ... [SEP]``) into this task's shard."""

    name = "neobert shard writer"
    type = "TOKENIZER"

    def __init__(self, output: str, recipe: dict, batch_size: int, single_threaded: bool):
        super().__init__()
        self.output, self.recipe, self.batch_size, self.single_threaded = output, recipe, batch_size, single_threaded

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if (shard_dir(self.output, rank) / "meta.json").is_file():
            return  # finished by an earlier run that died before datatrove marked it complete
        if self.single_threaded:  # one process per core: the tokenizer's own threads would oversubscribe
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        backend = load_backend(self.recipe)
        start = time.perf_counter()
        writer = ShardWriter(Path(self.output), rank, self.recipe["dtype"])
        progress = Progress(Path(self.output), rank)
        skipped = 0
        try:
            batch: list[str] = []
            for document in data or ():
                if document.text and not document.text.isspace():
                    batch.append(document.text)
                else:
                    skipped += 1
                if len(batch) >= self.batch_size:
                    self._write(backend, batch, writer, progress)
                    batch = []
            if batch:
                self._write(backend, batch, writer, progress)
            writer.commit({"skipped": skipped, "seconds": round(time.perf_counter() - start, 2)})
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.remove()
        self.stat_update("tokens", value=writer.tokens)
        yield from ()

    def _write(self, backend, texts: list[str], writer: ShardWriter, progress: Progress) -> None:
        from neobert.data.corpus import text_hash

        encodings = backend.encode_batch_fast(texts)
        writer.add([e.ids for e in encodings], [text_hash(t) for t in texts])
        progress.update(writer.documents, writer.tokens)


@functools.cache
def _builtin_texts() -> list[str]:
    """The built-in documents, read once per process (a sequential run reads them for each task)."""
    from neobert.data.sources import builtin_documents

    return builtin_documents()


def load_backend(recipe: dict):
    """The fast tokenizer's backend, checked against the recipe (every machine must tokenize alike)."""
    from neobert.data.corpus import tokenizer_fingerprint
    from neobert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(recipe["tokenizer_name"])
    if tokenizer_fingerprint(tokenizer) != recipe["tokenizer"]:
        raise UserError(f"the tokenizer {recipe['tokenizer_name'] or 'bert-base-uncased'} here differs from the one this corpus is prepared with")
    return tokenizer.backend_tokenizer


class Progress:
    """A task's running counts in a small file beside the shards, so that any machine can sum them."""

    def __init__(self, root: Path, rank: int, every_s: float = 1.0):
        self.path = root / "shards" / f".progress-{rank:05d}"
        self.every_s, self._last = every_s, 0.0

    def update(self, documents: int, tokens: int) -> None:
        now = time.time()
        if now - self._last >= self.every_s:
            self._last = now
            temporary = self.path.with_name(self.path.name + f".{os.getpid()}")
            temporary.write_text(json.dumps({"documents": documents, "tokens": tokens}))
            os.replace(temporary, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def count_tokens(output: Path, tasks: int, finished: dict[int, int] | None = None) -> tuple[int, int]:
    """(tokens written, shards finished) in ``output``: finished shards plus tasks in flight.

    ``finished`` (rank -> tokens) remembers finished shards between calls, so that a bar
    refreshed every second reads only the tasks still running.
    """
    finished = {} if finished is None else finished
    in_flight = 0
    for rank in range(tasks):
        if rank in finished:
            continue
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = shard_dir(output, rank) / "meta.json"
            if meta.is_file():
                finished[rank] = json.loads(meta.read_text())["tokens"]
                continue
            in_flight += json.loads((output / "shards" / f".progress-{rank:05d}").read_text())["tokens"]
    return sum(finished.values()) + in_flight, len(finished)


# ---------------------------------------------------------------------------------------
# Running


def prepare(cfg: PrepareConfig, tokenizer=None) -> Path:
    """Run this machine's tasks of the prepared corpus ``cfg`` describes; returns its directory.

    The manifest is written when every shard is finished (by this machine or others).
    """
    from neobert.tokenizer import load_tokenizer

    d, p = cfg.data, cfg.prepare
    tokenizer = tokenizer or load_tokenizer(d.tokenizer)
    tasks = p.tasks or default_tasks(d)
    recipe = make_recipe(d, tokenizer, tasks)
    output = Path(p.output).expanduser() if p.output else default_output(d, recipe)
    if (output / MANIFEST).is_file() and json.loads((output / MANIFEST).read_text()).get("recipe") == recipe:
        return output
    if tasks < p.nodes:
        raise UserError(f"prepare.tasks={tasks} is fewer than prepare.nodes={p.nodes}: every machine needs a task")
    claim_output(output, recipe)
    first, last = p.node_rank * tasks // p.nodes, (p.node_rank + 1) * tasks // p.nodes
    workers = max(1, min(d.num_proc, last - first))
    pipeline = [_reader(d, tasks), ShardWriterStep(str(output), recipe, p.batch_size, single_threaded=workers > 1)]

    start = time.perf_counter()
    before, _ = count_tokens(output, tasks)
    with _progress_bar(output, tasks, before, p.progress):
        _run_executor(pipeline, output, tasks, workers, first, last)
    done = finished_shards(output, tasks)
    if len(done) < tasks:
        if p.progress:
            print(f"prepare {d.source}: {len(done)} of {tasks} shards finished in {output}; "
                  "the run that finishes the last one writes the manifest", file=sys.stderr)
        return output
    manifest = write_manifest(output, recipe)
    if p.progress:
        tokens = manifest["tokens"]
        seconds = time.perf_counter() - start
        print(f"prepared {d.source}: {manifest['documents']:,} documents ({manifest['heldout_documents']:,} held out), "
              f"{tokens:,} tokens in {tasks} shard(s), {(tokens - before) / max(seconds, 1e-9):,.0f} tokens/s this run; {output}",
              file=sys.stderr)
    return output


def _reader(d: DataConfig, tasks: int):
    if d.source == "builtin":
        return BuiltinReader(d.max_documents)
    limit = None if d.max_documents is None else math.ceil(d.max_documents / tasks)
    if d.source.startswith("hf:"):
        from datatrove.pipeline.readers import HuggingFaceDatasetReader

        name, _, config = d.source[3:].partition(":")
        options = {"split": d.hf_split} | ({"name": config} if config else {})
        check_hub_source(d, name, options)
        return HuggingFaceDatasetReader(name, options, streaming=True, limit=-1 if limit is None else limit, text_key=d.text_field)
    return FileReader(d.source, d.text_field, d.txt_split, limit)


class QuietExecutor(LocalPipelineExecutor):
    """datatrove's local executor with each task's console log muted (its log file keeps everything)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        # datatrove points a console log at sys.stderr for each task, then restores one
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                return super()._run_for_rank(rank, local_rank, node_rank)
        finally:
            logger.remove()


def check_hub_source(d: DataConfig, name: str, options: dict) -> None:
    """Open the stream once here, so that a wrong name or column is one line before any task starts
    (datatrove's reader would skip rows without the text column with a warning in a log)."""
    import datasets

    from neobert.data.sources import _first_line

    try:
        stream = datasets.load_dataset(name, **options, streaming=True)
    except Exception as e:  # offline, unknown name or config, bad split: all worth one line
        raise UserError(f"data.source: cannot open {name!r} on the Hugging Face hub: {_first_line(e)}") from None
    if stream.features is not None and d.text_field not in stream.features:
        raise UserError(f"{d.source}: no column {d.text_field!r} (columns: {', '.join(stream.features)}); set data.text_field")


def _run_executor(pipeline: list, output: Path, tasks: int, workers: int, first: int, last: int) -> None:
    """datatrove's local executor over tasks [first, last), its console log muted (it goes to logs/)."""
    executor = QuietExecutor(
        pipeline, tasks=tasks, workers=workers, logging_dir=str(output / "logs"),
        local_tasks=last - first, local_rank_offset=first, start_method="fork",
    )
    logger.remove()  # datatrove logs through loguru; its per-task files keep everything
    try:
        executor.run()
    except UserError:
        raise
    except Exception as e:
        if isinstance(getattr(e, "__cause__", None), UserError):
            raise e.__cause__ from None
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"preparing {output} failed: {type(e).__name__}: {first_line} (task logs in {output / 'logs' / 'logs'})") from None


@contextlib.contextmanager
def _progress_bar(output: Path, tasks: int, before: int, show: bool):
    """A bar of tokens written (tokens/s) and shards finished, refreshed from the files every second."""
    if not show:
        yield
        return
    stop, finished = threading.Event(), {}
    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="prepare", file=sys.stderr, dynamic_ncols=True)

    def refresh():
        while not stop.wait(1.0):
            tokens, done = count_tokens(output, tasks, finished)
            bar.update(tokens - before - bar.n)
            bar.set_postfix_str(f"{done}/{tasks} shards")

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        tokens, done = count_tokens(output, tasks, finished)
        bar.update(tokens - before - bar.n)
        bar.set_postfix_str(f"{done}/{tasks} shards")
        bar.close()


def load_prepare_config(path: str | None, overrides: list[str]) -> PrepareConfig:
    """The ``data:`` and ``prepare:`` sections of a YAML file (a training config works) plus overrides."""
    from neobert.config import _set_dotted, from_dict

    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
        data = {k: v for k, v in loaded.items() if k in {f.name for f in dataclasses.fields(PrepareConfig)}}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return from_dict(PrepareConfig, data, str(path or "config"))


def main(argv: list[str]) -> int:
    from neobert.config import describe, split_args

    if any(a in ("-h", "--help") for a in argv):
        print("usage: neobert prepare [CONFIG.yaml] [key=value ...]\n")
        print(__doc__.split("\n\n", 2)[2].strip())
        print("\nkeys (YAML sections, or key=value overrides; other sections of CONFIG.yaml are ignored):")
        print(describe(PrepareConfig))
        return 0
    path, overrides = split_args(argv)
    print(prepare(load_prepare_config(path, overrides)))
    return 0

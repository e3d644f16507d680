"""Sentence embeddings from any encoder: load, encode, and export as sentence-transformers.

``--model`` (and :func:`load_encoder`) accepts what :func:`neobert.models.resolve_model`
resolves: a sentence-transformers directory or hub name (used as saved), a Hugging Face
encoder directory, NeoBERT or any other ``AutoModel`` (the encoder followed by mean
pooling; ``pooling="cls"`` takes the first token instead), a neobert run directory (its
``final/``), or ``all-MiniLM-L6-v2`` from its pip package.

Encoding goes through ``SentenceTransformer.encode``, which sorts the texts by length
so that each batch carries little padding, batches them and shows a progress bar.
:class:`Encoder` adds the harness-facing surface: ``encode(sentences, **kwargs)``
returning a float32 ``np.ndarray``, and mteb 2's ``EncoderProtocol`` (``mteb_model_meta``,
``similarity``, ``similarity_pairwise``, ``encode(DataLoader, task_metadata=...)``), served
by mteb's own wrapper for sentence-transformers, so ``mteb.evaluate(load_encoder(...))``
scores exactly as ``mteb.evaluate(SentenceTransformer(...))`` would.

Export (``export_sentence_transformers``, ``neobert export-st``): a NeoBERT is written as
the equivalent native ``transformers`` EuroBERT model (:mod:`neobert.convert`), so
``SentenceTransformer(dir)`` loads it without ``trust_remote_code`` in a process that has
never imported ``neobert``. Other encoders are written as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from neobert.cli import ArgumentParser, add_model_args
from neobert.convert import neobert_to_eurobert
from neobert.device import resolve_device
from neobert.errors import UserError
from neobert.loading import check_vocab, strict_weights
from neobert.modeling_neobert import NeoBERTModel
from neobert.models import resolve_model

__all__ = ["Encoder", "load_encoder", "export_sentence_transformers", "neobert_to_eurobert", "resolve_model", "embed_main", "export_main"]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide load reports such as the masked-LM decoder weights that an encoder leaves unused."""
    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


class Encoder:
    """A sentence encoder: ``encode(texts) -> (n, dim)`` float32, and an mteb 2 model.

    ``model`` is the underlying ``SentenceTransformer`` (an ``nn.Module`` whose forward maps
    tokenized features to ``sentence_embedding``; contrastive training uses it directly).
    ``name`` (``org/model`` form, or a path) names the model in mteb's results.
    """

    def __init__(self, model: SentenceTransformer, name: str | None = None):
        self.model = model
        self.name = name
        self._mteb_wrapper = None

    def _mteb(self):
        """mteb's ``SentenceTransformerEncoderWrapper`` around ``model``, made on first use.

        Delegating to it (rather than re-implementing the protocol) keeps mteb's prompt
        selection, similarity function and metadata identical to what mteb does for a
        ``SentenceTransformer``. mteb is imported here because only mteb calls this.
        """
        if self._mteb_wrapper is None:
            from mteb.models import SentenceTransformerEncoderWrapper

            wrapper = SentenceTransformerEncoderWrapper(self.model)
            if self.name is not None and "/" in self.name:  # mteb requires the org/model form
                wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update={"name": self.name})
            self._mteb_wrapper = wrapper
        return self._mteb_wrapper

    @property
    def mteb_model_meta(self):
        """mteb's ``ModelMeta``: how ``mteb.evaluate`` recognises a ready model instead of loading one."""
        return self._mteb().mteb_model_meta

    def similarity(self, embeddings1, embeddings2):
        """The model's similarity matrix (cosine unless the model saved another), for mteb."""
        return self._mteb().similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """The model's similarity of each row of ``embeddings1`` with the same row of ``embeddings2``, for mteb."""
        return self._mteb().similarity_pairwise(embeddings1, embeddings2)

    def _warn_truncation(self, sentences: Sequence[str]) -> None:
        """One warning with the count of texts longer than the model's length (they are cut)."""
        limit, tokenizer = self.model.max_seq_length, getattr(self.model, "tokenizer", None)
        if not limit or tokenizer is None:
            return
        lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=False, verbose=False)["input_ids"]]
        over = sum(n > limit for n in lengths)
        if over:
            warnings.warn(f"{over} of {len(lengths)} texts are longer than the model's {limit} tokens (longest {max(lengths)}): truncated to {limit}")

    @property
    def dim(self) -> int:
        return self.model.get_embedding_dimension()

    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        prompt: str | None = None,
        prompt_name: str | None = None,
        show_progress_bar: bool = False,
        **kwargs,
    ) -> np.ndarray:
        """Embed ``sentences`` in batches sorted by length; rows follow the input order.

        ``prompt`` is prepended to every text; ``prompt_name`` picks one of the model's
        saved prompts. Called by mteb 2 (a ``task_metadata`` given), the call goes to
        mteb's sentence-transformers wrapper, which picks the prompt from the task and
        ``prompt_type``. Otherwise ``sentences`` may also be a DataLoader of
        ``{"text": [...]}`` batches, and ``prompt_type`` ("query", "document" or MTEB 1's
        "passage") selects the saved prompt of that name when the model has one; other
        keyword arguments (task name, splits) do not change an embedding.
        """
        if kwargs.get("task_metadata") is not None:
            return self._mteb().encode(sentences, batch_size=batch_size, show_progress_bar=show_progress_bar, **kwargs)
        if isinstance(sentences, torch.utils.data.DataLoader):
            sentences = [text for batch in sentences for text in batch["text"]]
        prompt_type = getattr(kwargs.get("prompt_type"), "value", kwargs.get("prompt_type"))  # enum or str
        prompt_type = "document" if prompt_type == "passage" else prompt_type
        if prompt is None and prompt_name is None and prompt_type in self.model.prompts:
            prompt_name = prompt_type
        if len(sentences) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._warn_truncation(sentences)
        out = self.model.encode(
            list(sentences),
            batch_size=batch_size,
            prompt=prompt,
            prompt_name=prompt_name,
            normalize_embeddings=normalize,
            show_progress_bar=show_progress_bar,
            convert_to_numpy=True,
        )
        return out.astype(np.float32, copy=False)


def load_encoder(
    name_or_path: str,
    pooling: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
) -> Encoder:
    """Load any encoder (see the module docstring) as an :class:`Encoder` in eval mode.

    ``pooling`` (``mean`` or ``cls``) applies to plain Hugging Face encoders; a
    sentence-transformers directory brings its own. ``max_length`` truncates inputs
    (default: what the model declares).
    """
    if pooling not in (None, "mean", "cls"):
        raise UserError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    path = resolve_model(name_or_path)
    device = str(resolve_device(device))
    local = Path(path).is_dir()
    is_st = (Path(path) / "modules.json").is_file() or not local
    if is_st and pooling is not None and local:
        raise UserError(f"{path} is a sentence-transformers directory: its pooling is saved in it, drop --pooling")
    with _quiet_transformers(), strict_weights(path):  # random weights in place of missing ones: refused
        try:
            if is_st and pooling is None:
                model = SentenceTransformer(path, device=device)
            else:
                first = Transformer(path)
                model = SentenceTransformer(
                    modules=[first, Pooling(first.get_embedding_dimension(), pooling or "mean")], device=device
                )
        except (OSError, ValueError) as e:  # hub names: not found, offline, or not a valid repo id
            raise UserError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
    first = model[0]
    if hasattr(first, "auto_model") and hasattr(first.auto_model, "get_input_embeddings"):
        check_vocab(getattr(model, "tokenizer", None), first.auto_model.get_input_embeddings().num_embeddings, path)
    if max_length is not None:
        model.max_seq_length = max_length
    model.eval()
    return Encoder(model, name=str(Path(path).resolve()) if local else name_or_path)


# ---------------------------------------------------------------------------------------
# Export


def export_sentence_transformers(
    name_or_path: str,
    output_dir: str | Path,
    pooling: str | None = None,
    normalize: bool = False,
    max_length: int | None = None,
    prompts: dict[str, str] | None = None,
) -> Path:
    """Write ``name_or_path`` as a sentence-transformers directory that loads with no custom code.

    ``prompts`` (e.g. ``{"query": "query: ", "document": ""}``) are saved with the model
    and used by ``encode_query`` / ``encode_document``; ``normalize`` appends a Normalize
    module so every embedding has unit length.
    """
    st = load_encoder(name_or_path, pooling=pooling, max_length=max_length, device="cpu").model
    modules = list(st)
    first = modules[0]
    if not isinstance(first, Transformer):
        raise UserError(f"{name_or_path}: only transformer-based models can be exported, found {type(first).__name__}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(first.auto_model, NeoBERTModel):
        neobert_to_eurobert(first.auto_model, first.tokenizer).save_pretrained(out)
        first.tokenizer.save_pretrained(out)
        with _quiet_transformers():
            modules[0] = Transformer(str(out), max_seq_length=first.max_seq_length)
    if normalize and not any(isinstance(m, Normalize) for m in modules):
        modules.append(Normalize())
    merged_prompts = {**st.prompts, **(prompts or {})}
    exported = SentenceTransformer(modules=modules, prompts=merged_prompts, device="cpu")
    exported.save(str(out))
    return out


# ---------------------------------------------------------------------------------------
# The commands `embed` and `export-st`


def _read_texts(texts: list[str], input_path: str | None, field: str) -> list[str]:
    """Texts from the arguments, else the file ``input_path`` (or stdin for None / ``-``)."""
    if texts:
        return list(texts)
    if input_path is None and sys.stdin.isatty():
        raise UserError("no text: give texts as arguments, --input FILE, or pipe them on stdin")
    if input_path in (None, "-"):
        lines = sys.stdin.read().splitlines()
        source = "stdin"
    else:
        try:
            lines = Path(input_path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"input file not found: {input_path}") from None
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise UserError(f"{input_path} line {line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); convert the file to UTF-8") from None
        source = input_path
    if input_path is not None and input_path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{source} line {n}: expected a JSON object with a {field!r} field") from None
        return texts
    return [line for line in lines if line.strip()]


def _write_embeddings(texts: list[str], emb: np.ndarray, output: str | None) -> None:
    if output is None or output.endswith(".jsonl"):
        lines = (json.dumps({"text": t, "embedding": [float(x) for x in row]}) + "\n" for t, row in zip(texts, emb))
        if output is None:
            sys.stdout.writelines(lines)
        else:
            with open(output, "w", encoding="utf-8") as f:
                f.writelines(lines)
    elif output.endswith(".npy"):
        np.save(output, emb)
    else:  # .parquet: embedding as a fixed-size list of float32
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        table = pa.table({"text": texts, "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})
        pq.write_table(table, output)


def embed_main(argv: list[str]) -> int:
    """``neobert embed``: texts in (arguments, a file, stdin), embeddings out."""
    parser = ArgumentParser(
        prog="neobert embed",
        description="Embed texts: arguments, --input FILE (one text per line, or .jsonl with --field), or stdin. "
        "Output .npy (rows in input order), .jsonl ({text, embedding} per line; the default, on stdout) or .parquet.",
    )
    parser.add_argument("texts", nargs="*", help="texts to embed")
    parser.add_argument("--input", help="a text file (one text per line; blank lines skipped), a .jsonl file, or - for stdin")
    parser.add_argument("--field", default="text", help="the text field of a .jsonl input (default text)")
    parser.add_argument("--output", help="OUT.npy, OUT.jsonl or OUT.parquet (default: JSONL on stdout)")
    parser.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    parser.add_argument("--prompt", help="text prepended to every input, e.g. an instruction")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.output is not None and not args.output.endswith((".npy", ".jsonl", ".parquet")):
        raise UserError(f"--output must end in .npy, .jsonl or .parquet, got {args.output}")
    if args.output is not None:  # before any embedding is computed
        parent = Path(args.output).absolute().parent
        if not parent.is_dir():
            raise UserError(f"--output {args.output}: the directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"--output {args.output}: the directory {parent} is not writable")
    texts = _read_texts(args.texts, args.input, args.field)
    encoder = load_encoder(args.model, pooling=args.pooling, max_length=args.max_length, device=args.device)
    emb = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize, prompt=args.prompt, show_progress_bar=True)
    _write_embeddings(texts, emb, args.output)
    if args.output is not None:
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}")
    return 0


def export_main(argv: list[str]) -> int:
    """``neobert export-st``: write a sentence-transformers directory."""
    parser = ArgumentParser(
        prog="neobert export-st",
        description="Write --model as a sentence-transformers directory that SentenceTransformer(dir) loads "
        "with no custom code (a NeoBERT is saved as the equivalent transformers EuroBERT model).",
    )
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--normalize", action="store_true", help="append a Normalize module (unit-length embeddings)")
    parser.add_argument("--query-prompt", help="saved as the 'query' prompt (used by encode_query)")
    parser.add_argument("--document-prompt", help="saved as the 'document' prompt (used by encode_document)")
    args = parser.parse_args(argv)
    prompts = {k: v for k, v in (("query", args.query_prompt), ("document", args.document_prompt)) if v is not None}
    out = export_sentence_transformers(
        args.model, args.output, pooling=args.pooling, normalize=args.normalize, max_length=args.max_length, prompts=prompts
    )
    print(f"wrote {out}: load it with sentence_transformers.SentenceTransformer({str(out)!r})")
    return 0

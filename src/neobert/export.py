"""ONNX export of NeoBERT models: ``export_onnx`` and ``neobert export-onnx``.

``export_onnx(model, path)`` writes one ONNX file with inputs ``input_ids`` and
``attention_mask`` (int64, (batch, length), both dynamic) and one output: ``last_hidden_state``
for ``NeoBERTModel``, ``logits`` for the heads, ``sentence_embedding`` for
``SentenceEmbedding`` (encoder + pooling). It uses the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``): the forward pass is traced by ``torch.export``,
which makes the model take its padded path (one graph, no host reads), so the file runs any
batch shape and any padding in onnxruntime with the outputs of the PyTorch model.

``neobert export-onnx --model DIR --task {embeddings,fill-mask,classification} [--int8]
--output OUT`` writes ``OUT/model.onnx``, with ``--int8`` also ``OUT/model_quantized.onnx``
(onnxruntime dynamic quantization: int8 weights, activations quantized on the fly), the
tokenizer and ``config.json`` of the model, and ``export.json`` (task, inputs, output,
pooling, files). It then runs a padded batch through onnxruntime and PyTorch and prints the
largest difference; an fp32 file further than 1e-3 from PyTorch is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from neobert.cli import ArgumentParser
from neobert.errors import UserError
from neobert.modeling_neobert import NeoBERTModel, NeoBERTPreTrainedModel, pool
from neobert.models import resolve_model

INPUTS = ("input_ids", "attention_mask")
TASKS = ("embeddings", "fill-mask", "classification")
SAMPLE = ["A short sentence.", "The river bank was quiet in the morning and the birds sang over the water.", "Two words"]


class SentenceEmbedding(nn.Module):
    """Encoder + pooling, (B, L) -> (B, d): the sentence embedding ``neobert embed`` and
    sentence-transformers compute (mean over real tokens, or the first token)."""

    output_name = "sentence_embedding"

    def __init__(self, encoder: NeoBERTModel, pooling: str = "mean"):
        super().__init__()
        self.encoder, self.pooling, self.config = encoder, pooling, encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def output_name(model: nn.Module) -> str:
    if isinstance(model, SentenceEmbedding):
        return SentenceEmbedding.output_name
    return "last_hidden_state" if isinstance(model, NeoBERTModel) else "logits"


def example_inputs(model: NeoBERTPreTrainedModel | SentenceEmbedding, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A padded batch to trace with (its sizes are not baked in: both axes are dynamic)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return {"input_ids": ids.masked_fill(mask == 0, model.config.pad_token_id or 0), "attention_mask": mask}


def export_onnx(model: NeoBERTPreTrainedModel | SentenceEmbedding, path: str | Path) -> Path:
    """Write ``model`` (put in eval mode, float32) to ``path`` as ONNX; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (),
            kwargs=example_inputs(model),
            dynamo=True,
            dynamic_shapes={name: {0: "batch", 1: "length"} for name in INPUTS},
            input_names=list(INPUTS),
            output_names=[output_name(model)],
            verbose=False,
        )
    program.save(str(path))
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """onnxruntime dynamic quantization: int8 weights of the matmuls, activations on the fly."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime advises its pre-processing first: its symbolic shape inference fails on these
    # graphs, and without it (skip_symbolic_shape) the quantized outputs were identical; quiet
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return target


def build(model_dir: str, task: str, pooling: str = "mean") -> nn.Module:
    """The module to export for ``task`` from a NeoBERT model directory."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    import neobert  # noqa: F401  (registers the Auto classes)

    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model: no config.json in {model_dir} (a NeoBERT model directory, e.g. a run's final/)")
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type != "neobert":
        raise UserError(f"--model: {model_dir} holds a {model_type!r} model; export-onnx exports NeoBERT models")
    if task == "embeddings":
        return SentenceEmbedding(AutoModel.from_pretrained(model_dir), pooling)
    auto = AutoModelForMaskedLM if task == "fill-mask" else AutoModelForSequenceClassification
    return auto.from_pretrained(model_dir)


def largest_difference(model: nn.Module, onnx_file: Path, batch: dict[str, torch.Tensor]) -> float:
    """max |onnxruntime - PyTorch| over a batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: batch[name].numpy() for name in INPUTS})
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = out if isinstance(out, torch.Tensor) else out[0]
    return float((torch.from_numpy(got) - want).abs().max())


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="neobert export-onnx", description="Export a NeoBERT model to ONNX for onnxruntime, optionally int8 (docs/deploy.md).")
    parser.add_argument("--model", required=True, help="a NeoBERT model directory, or a run directory (its final/)")
    parser.add_argument("--task", required=True, choices=TASKS, help="embeddings: encoder + pooling; fill-mask: MLM logits; classification: class logits")
    parser.add_argument("--output", required=True, help="directory to write model.onnx, tokenizer, config.json, export.json")
    parser.add_argument("--int8", action="store_true", help="also write model_quantized.onnx (onnxruntime dynamic int8 quantization)")
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="embeddings only (default mean)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from neobert.tokenizer import load_tokenizer

    source = resolve_model(args.model)
    model = build(source, args.task, args.pooling).eval()
    out = Path(args.output)
    files = [export_onnx(model, out / "model.onnx")]
    if args.int8:
        files.append(quantize_int8(files[0], out / "model_quantized.onnx"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = load_tokenizer()
        print(f"{source} has no tokenizer: wrote the default bert-base-uncased WordPiece")
    tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    manifest = {"task": args.task, "inputs": list(INPUTS), "output": output_name(model), "files": [f.name for f in files]}
    if args.task == "embeddings":
        manifest["pooling"] = args.pooling
    (out / "export.json").write_text(json.dumps(manifest, indent=1) + "\n")

    batch = dict(tokenizer(SAMPLE, padding=True, return_tensors="pt"))
    for file in files:
        diff = largest_difference(model, file, batch)
        print(f"{file}: {file.stat().st_size / 1e6:.1f} MB, max |onnxruntime - torch| = {diff:.2g} on a padded batch of {len(SAMPLE)}")
        if file.name == "model.onnx" and diff > 1e-3:
            raise UserError(f"{file} differs from the PyTorch model by {diff:.3g} (> 1e-3): please report this export")
    return 0

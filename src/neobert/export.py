"""ONNX export of NeoBERT models (the encoder and every head) through torch.export.

``export_onnx(model, path)`` writes one ONNX file with inputs ``input_ids`` and
``attention_mask`` (int64, (batch, length), both dynamic) and one output: ``last_hidden_state``
for ``NeoBERTModel``, ``logits`` for the heads. It uses the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``): the forward pass is traced by ``torch.export``,
which makes the model take its padded path (one graph, no host reads), so the file runs any
batch shape and any padding in onnxruntime with the outputs of the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neobert.modeling_neobert import NeoBERTModel, NeoBERTPreTrainedModel

INPUTS = ("input_ids", "attention_mask")


def output_name(model: NeoBERTPreTrainedModel) -> str:
    return "last_hidden_state" if isinstance(model, NeoBERTModel) else "logits"


def example_inputs(model: NeoBERTPreTrainedModel, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A padded batch to trace with (its sizes are not baked in: both axes are dynamic)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return {"input_ids": ids.masked_fill(mask == 0, model.config.pad_token_id or 0), "attention_mask": mask}


def export_onnx(model: NeoBERTPreTrainedModel, path: str | Path) -> Path:
    """Write ``model`` (eval mode, float32) to ``path`` as ONNX; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dynamic = {name: {0: "batch", 1: "length"} for name in INPUTS}
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (),
            kwargs=example_inputs(model),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=list(INPUTS),
            output_names=[output_name(model)],
            verbose=False,
        )
    program.save(str(path))
    return path

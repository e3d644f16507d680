"""Compile and export: torch.compile makes one graph that padding does not recompile,
torch.export takes an attention mask with dynamic batch and length, and every class exports
to ONNX and runs in onnxruntime with PyTorch's outputs (within 1e-4), padding included."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import AutoTokenizer, BertConfig

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification, NeoBERTModel
from neobert import cli, load_tokenizer
from neobert.embeddings import load_encoder
from neobert.export import export_onnx, output_name

CLASSES = [NeoBERTModel, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification]


@pytest.fixture
def config() -> NeoBERTConfig:
    torch.manual_seed(0)
    return NeoBERTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=100, max_length=64, num_labels=3)


def padded(lengths: list[int], length: int, vocab: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    return torch.randint(1, vocab, (len(lengths), length), generator=g).masked_fill(mask == 0, 0), mask


class GraphCounter:
    """A torch.compile backend that records each graph dynamo hands it and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


@pytest.mark.parametrize("cls", [NeoBERTModel, NeoBERTForMaskedLM])
def test_compile_one_graph_no_recompile_when_padding_changes(config, cls):
    """fullgraph=True (a graph break would raise) and a single graph for every padding of
    one shape, document-id masks included; outputs equal the eager padding-free path's."""
    model = cls(config).eval()
    torch._dynamo.reset()
    counters.clear()
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids, _ = padded([16, 16, 16], 16)
    masks = [padded(lengths, 16)[1] for lengths in ([16, 7, 12], [3, 16, 9], [16, 16, 16], [1, 2, 3], [0, 16, 5])]
    masks.append(torch.tensor([[1] * 5 + [2] * 6 + [3] * 5, [1] * 9 + [2] * 4 + [0] * 3, [1] * 16]))  # packed documents
    for mask in masks:
        with torch.no_grad():
            got, want = compiled(ids, mask)[0], model(ids, mask)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(backend.graphs) == 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_compile_new_shapes_become_dynamic_once(config):
    """A second shape recompiles once with symbolic batch and length; later shapes reuse it
    (sizes 0 and 1 are specialised by dynamo for every model, so batches here are >= 2)."""
    model = NeoBERTModel(config).eval()
    torch._dynamo.reset()
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for lengths, length in [([5, 3], 8), ([9, 2, 7], 12), ([4, 20], 20), ([6, 6, 1, 2], 6)]:
        ids, mask = padded(lengths, length)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, mask)[0], model(ids, mask)[0], atol=1e-5, rtol=1e-5)
    assert len(backend.graphs) == 2


def test_torch_export_with_attention_mask(config):
    model = NeoBERTForMaskedLM(config).eval()
    ids, mask = padded([8, 5], 8)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    program = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                                  dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
    for lengths, L in [([13, 2, 7], 13), ([1], 5)]:
        ids, mask = padded(lengths, L, seed=1)
        with torch.no_grad():
            got = program.module()(input_ids=ids, attention_mask=mask).logits
            want = model(ids, mask).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_onnx_export_of_every_class_matches_pytorch(config, tmp_path):
    """Dynamo exporter, dynamic batch and length: other shapes and paddings than the traced
    one, and packed documents, run in onnxruntime within 1e-4 of PyTorch at every position
    (mean pooling: the embeddings export below)."""
    batches = [padded([11, 3, 7], 11, seed=2), padded([4], 4, seed=3)]
    docs = torch.tensor([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11])
    batches.append((torch.randint(1, 120, (2, 11), generator=torch.Generator().manual_seed(4)).masked_fill(docs == 0, 0), docs))
    for cls in CLASSES:
        model = cls(config).eval()
        session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / f"{cls.__name__}.onnx")), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
        assert [o.name for o in session.get_outputs()] == [output_name(model)]
        for ids, mask in batches:
            (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            with torch.no_grad():
                want = model(input_ids=ids, attention_mask=mask)[0].numpy()
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=cls.__name__)


# --------------------------------------------------------------------------------------
# neobert export-onnx

TEXTS = ["a short one", "the river bank was quiet in the morning and the birds sang", "[MASK] words"]


def run_onnx(path, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0], batch


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny fill-mask and a tiny classification model, each saved with the tokenizer."""
    root, tokenizer = tmp_path_factory.mktemp("models"), load_tokenizer()
    config = NeoBERTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2)
    for cls, name in [(NeoBERTForMaskedLM, "mlm"), (NeoBERTForSequenceClassification, "classifier")]:
        torch.manual_seed(0)
        cls(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_export_onnx_embeddings_equal_sentence_transformers(model_dirs, tmp_path, capsys):
    """The embeddings file gives what sentence-transformers gives for the same directory; the
    int8 file is smaller and close; export.json says what the file takes and returns."""
    out = tmp_path / "onnx"
    assert cli.main(["export-onnx", "--model", str(model_dirs / "mlm"), "--task", "embeddings", "--int8", "--output", str(out)]) == 0
    assert "max |onnxruntime - torch|" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest == {"task": "embeddings", "inputs": ["input_ids", "attention_mask"], "output": "sentence_embedding",
                        "files": ["model.onnx", "model_quantized.onnx"], "pooling": "mean"}
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the file
    got, _ = run_onnx(out / "model.onnx", tokenizer)
    want = load_encoder(str(model_dirs / "mlm")).encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    low, _ = run_onnx(out / "model_quantized.onnx", tokenizer)
    assert (out / "model_quantized.onnx").stat().st_size < 0.5 * (out / "model.onnx").stat().st_size
    cosine = (low * got).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("task, directory, cls", [("fill-mask", "mlm", NeoBERTForMaskedLM), ("classification", "classifier", NeoBERTForSequenceClassification)])
def test_export_onnx_heads_equal_pytorch(model_dirs, tmp_path, task, directory, cls):
    out = tmp_path / "onnx"
    assert cli.main(["export-onnx", "--model", str(model_dirs / directory), "--task", task, "--output", str(out)]) == 0
    got, batch = run_onnx(out / "model.onnx", AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        want = cls.from_pretrained(model_dirs / directory)(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_export_onnx_bad_input_is_one_line(model_dirs, tmp_path, capsys):
    other = tmp_path / "bert"
    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(other)
    for argv, message in [
        (["--model", str(tmp_path / "missing"), "--task", "embeddings"], "not found"),
        (["--model", str(other), "--task", "embeddings"], "holds a 'bert' model"),
        (["--model", str(model_dirs / "mlm"), "--task", "ner"], "invalid choice: 'ner'"),
    ]:
        assert cli.main(["export-onnx", *argv, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err

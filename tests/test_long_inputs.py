"""Inputs longer than the model's length: pipelines and embeddings run, warn, never crash."""

import warnings

import numpy as np
import pytest
import torch
from transformers import pipeline

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, load_tokenizer
from neobert.embeddings import load_encoder

MAX = 32
LONG = " ".join(["the river bank was quiet in the morning and the birds sang"] * 8)  # ~100 tokens


def save(cls, path, **extra):
    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=MAX, **extra)
    cls(config).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return str(path)


def caught(fn):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in record]


@pytest.mark.parametrize("task, cls, text", [
    ("fill-mask", NeoBERTForMaskedLM, LONG + " [MASK] end"),
    ("text-classification", NeoBERTForSequenceClassification, LONG),
])
def test_pipelines_run_past_max_length_with_a_warning(tmp_path, task, cls, text):
    assert len(load_tokenizer()(text)["input_ids"]) > 3 * MAX
    out, messages = caught(lambda: pipeline(task, model=save(cls, tmp_path / "m"))(text))
    assert len(out) >= 1 and all(np.isfinite(o["score"]) for o in out)
    assert any("exceeds max_length" in m for m in messages)


def test_embeddings_truncate_long_texts_with_a_count(tmp_path):
    encoder = load_encoder(save(NeoBERTForMaskedLM, tmp_path / "m"))
    assert encoder.model.max_seq_length == MAX
    emb, messages = caught(lambda: encoder.encode(["short text", LONG, LONG + " more"]))
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
    assert any("2 of 3 texts are longer than the model's 32 tokens" in m for m in messages)
    # the cut is at the model's length: the long text embeds like its first MAX tokens
    ids = load_tokenizer()(LONG)["input_ids"]
    head = load_tokenizer().decode(ids[1 : MAX - 1])
    np.testing.assert_allclose(emb[1], encoder.encode([head])[0], atol=1e-5)
    _, quiet = caught(lambda: encoder.encode(["short text"]))
    assert not any("longer than the model" in m for m in quiet)

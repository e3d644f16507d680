"""``DataConfig``: the ``data:`` section of a run config (corpus, rows, masking, cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neobert.errors import UserError

PACKINGS = ("document", "none", "naive", "split")
TXT_SPLITS = ("file", "blank_line")
DEFAULT_CACHE = "~/.cache/neobert"


@dataclass
class DataConfig:
    """The ``data:`` section of pretraining and extension runs."""

    source: str = "builtin"
    """Where the text comes from: "builtin" (news, Wikipedia and more from pip packages, about 3.4M
    tokens), a path, glob or directory of .txt/.jsonl/.parquet files, or "hf:NAME[:CONFIG]" for a
    Hugging Face dataset read by streaming (needs the hub), or a prepared-corpus directory written by
    `neobert prepare` (the built-in corpus is prepared into cache_dir the same way on first use)."""
    text_field: str = "text"
    """The JSONL field, parquet column or hub dataset column that holds the text."""
    txt_split: str = "file"
    """How .txt files become documents: "file" (one per file) or "blank_line" (one per block of lines
    separated by an empty line)."""
    hf_split: str = "train"
    """Split of a hub dataset."""
    max_documents: int | None = None
    """Keep only the first N documents (required for a streaming hub source); null keeps all."""
    heldout_fraction: float = 0.01
    """Share of documents held out for evaluation; which ones depends only on their text, never on the
    seed or file order, so the split is the same in every run."""
    max_length: int = 128
    """Row length in tokens, [CLS] and [SEP] included."""
    packing: str = "document"
    """document (this project's choice): documents packed into full rows, attention and positions per
    document; none: one document per row, padded, a longer document cut to its first max_length tokens
    (the paper and the released code); split: one document per row, a longer document cut into pieces
    that each become a row of their own; naive: packed, attention across documents (the paper's
    packing ablation)."""
    mlm_rate: float = 0.2
    """Share of real, non-special tokens selected for the masked-LM loss."""
    mask_80_10_10: bool = False
    """False: every selected token becomes [MASK] (the paper); True: BERT's 80/10/10 rule."""
    tokenizer: str | None = None
    """null: the default bert-base-uncased; else a tokenizer.json, a directory or a hub name."""
    cache_dir: str = DEFAULT_CACHE
    """Where tokenized corpora are cached; the environment variable NEOBERT_CACHE replaces the default."""
    num_proc: int = 2
    """Processes that tokenize in parallel."""
    bucket_thresholds: list[int] | None = None
    """Length mixture (context extension, stage 2): each training row takes its documents from one
    bucket, drawn with these probabilities; bucket k holds the documents of at least
    bucket_thresholds[k] tokens. The paper: [0, 1024, 2048] with [0.2, 0.4, 0.4]. null (both): rows
    come from PackedRows, every document in turn."""
    bucket_probabilities: list[float] | None = None
    """The probability of each length bucket (see bucket_thresholds)."""
    num_workers: int = 0
    """Processes that build the masked training micro-batches ahead of the model (read rows, collate,
    mask; a torch DataLoader, pinned memory on CUDA); 0 builds each in the training process when it is
    needed. The batches are the same for any value."""
    prefetch_factor: int = 4
    """Micro-batches each loader process keeps ready (with num_workers > 0)."""

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise UserError(f"data.packing={self.packing!r} is not one of {list(PACKINGS)}")
        if self.txt_split not in TXT_SPLITS:
            raise UserError(f"data.txt_split={self.txt_split!r} is not one of {list(TXT_SPLITS)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if not 0.0 < self.mlm_rate < 1.0:
            raise UserError(f"data.mlm_rate={self.mlm_rate} must be in (0, 1)")
        if self.max_length < 8:
            raise UserError(f"data.max_length={self.max_length} must be at least 8")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"data.max_documents={self.max_documents} must be positive or null")
        if self.num_proc < 1:
            raise UserError(f"data.num_proc={self.num_proc} must be at least 1")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be 0 (no loader process) or more")
        if self.prefetch_factor < 1:
            raise UserError(f"data.prefetch_factor={self.prefetch_factor} must be at least 1")
        if (self.bucket_thresholds is None) != (self.bucket_probabilities is None):
            raise UserError("data.bucket_thresholds and data.bucket_probabilities go together: set both or neither")
        if self.bucket_thresholds is not None:
            thresholds, probabilities = self.bucket_thresholds, self.bucket_probabilities
            if not thresholds or len(thresholds) != len(probabilities):
                raise UserError(f"data.bucket_thresholds {thresholds} and data.bucket_probabilities {probabilities} must have the same, non-zero length")
            if min(thresholds) < 0 or min(probabilities) < 0 or abs(sum(probabilities) - 1) > 1e-6:
                raise UserError(f"data.bucket_thresholds {thresholds} must be >= 0 and data.bucket_probabilities {probabilities} >= 0 summing to 1")

    def resolved_cache_dir(self) -> Path:
        """``cache_dir``, or $NEOBERT_CACHE when ``cache_dir`` is left at its default."""
        path = self.cache_dir
        if path == DEFAULT_CACHE:
            path = os.environ.get("NEOBERT_CACHE") or path
        return Path(path).expanduser()

"""Pretraining data: from a text source to masked batches.

The pipeline, one module per step:

- ``config``: ``DataConfig``, the ``data:`` section of a run config.
- ``sources``: the built-in corpus (real English text from pip packages), local
  ``.txt``/``.jsonl``/``.parquet`` files, or a streamed Hugging Face dataset, read into a
  ``datasets.Dataset`` of documents; bad input is a one-line ``UserError`` naming file and line.
- ``corpus``: ``prepare_corpus`` tokenizes once, in parallel, splits off the held-out
  documents and caches both as memory-mapped ``TokenCorpus`` arrays.
- ``packing``: ``PackedRows`` makes deterministic rows per epoch (``document``, ``none``,
  ``split`` or ``naive`` packing) and ``collate`` pads them into model inputs (positions by the model's
  own ``document_positions`` rule).
- ``mixture``: ``LengthMixtureRows``, rows whose documents come from a length bucket drawn
  per row (context extension); both row sources follow the ``packing.Rows`` protocol.
- ``masking``: ``MLMMasker`` adds masked-LM labels, deterministic per seed and step.

Other data: ``glue`` (GLUE tasks and own labelled files for fine-tuning), ``pairs``
(query/positive pairs and the batch plan of contrastive training), ``retrieval`` (BEIR
retrieval sets and the built-in headline -> article task). Readers of the data that pip
packages ship live in ``sources`` (the news corpus is read there, for every use).

A trainer calls, in order::

    train, heldout = prepare_corpus(cfg, tokenizer)
    rows = PackedRows(train, cfg.max_length, cfg.packing, seed)
    batch = collate(rows.rows(indices), cfg.packing, cfg.max_length)
    batch = MLMMasker(tokenizer, cfg.mlm_rate, cfg.mask_80_10_10)(batch, seed, step)
    model(**packing.flatten(batch))  # the real tokens as one row, their layout computed on the host

``loader.MicroBatches`` does the last three for every micro-batch of a run, in DataLoader workers.
"""

from neobert.data.config import DataConfig
from neobert.data.corpus import TokenCorpus, prepare_corpus
from neobert.data.masking import MLMMasker
from neobert.data.mixture import LengthMixtureRows
from neobert.data.packing import PackedRows, collate

__all__ = ["DataConfig", "TokenCorpus", "prepare_corpus", "PackedRows", "LengthMixtureRows", "collate", "MLMMasker"]

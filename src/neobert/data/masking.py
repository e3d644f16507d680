"""Masked-LM inputs and labels: ``MLMMasker``.

Each real, non-special token is selected with probability ``rate`` (0.2 in the paper).
Selected tokens get their id as label (-100 everywhere else, the loss's ignore index)
and are replaced by [MASK], or with the 80/10/10 rule by [MASK] 80% of the time, a
random non-special token 10% and themselves 10%. Special tokens ([CLS], [SEP], [PAD],
[UNK], [MASK]) and padding (``attention_mask == 0``) are never selected.

The randomness comes from a ``torch.Generator`` seeded from (seed, step, rank,
micro-batch), drawn on the CPU, so a batch is masked the same way on any device and on
resume, and differently at every step, rank and micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from neobert.errors import UserError


class MLMMasker:
    """``masker(batch, seed, step)`` -> a new batch with masked ``input_ids`` and ``labels``.

    ``tokenizer_or_ids`` is a tokenizer, or a mapping with ``mask_token_id``,
    ``special_ids`` and ``vocab_size`` (a model without a tokenizer at hand).
    """

    def __init__(self, tokenizer_or_ids, rate: float = 0.2, mask_80_10_10: bool = False):
        if isinstance(tokenizer_or_ids, Mapping):
            mask_id, special, vocab_size = (tokenizer_or_ids[k] for k in ("mask_token_id", "special_ids", "vocab_size"))
        else:
            tok = tokenizer_or_ids
            mask_id, special, vocab_size = tok.mask_token_id, tok.all_special_ids, len(tok)
        if mask_id is None:
            raise UserError("the tokenizer has no mask token: masked-LM training needs one")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        self.mask_id, self.rate, self.mask_80_10_10 = int(mask_id), rate, mask_80_10_10
        self.special_ids = torch.tensor(sorted(set(special) | {self.mask_id}), dtype=torch.long)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special_ids] = False
        self.random_ids = allowed.nonzero().squeeze(1)  # the 10% random replacements: never a special token

    def __call__(self, batch: dict, seed: int, step: int, rank: int = 0, micro: int = 0) -> dict:
        input_ids = batch["input_ids"]
        device, shape = input_ids.device, input_ids.shape
        generator = torch.Generator().manual_seed(generator_seed(seed, step, rank, micro))
        eligible = ~torch.isin(input_ids, self.special_ids.to(device))
        if batch.get("attention_mask") is not None:
            eligible &= batch["attention_mask"] != 0
        selected = (torch.rand(shape, generator=generator) < self.rate).to(device) & eligible
        labels = torch.where(selected, input_ids, -100)
        if self.mask_80_10_10:
            choice = torch.rand(shape, generator=generator).to(device)
            replacement = self.random_ids[torch.randint(len(self.random_ids), shape, generator=generator)].to(device)
            masked = torch.where(selected & (choice < 0.8), self.mask_id, input_ids)
            masked = torch.where(selected & (choice >= 0.8) & (choice < 0.9), replacement, masked)
        else:
            masked = torch.where(selected, self.mask_id, input_ids)
        return {**batch, "input_ids": masked, "labels": labels}


def generator_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """One well-mixed 64-bit seed from the four counters (nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0])

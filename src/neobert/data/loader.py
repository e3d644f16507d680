"""The masked micro-batches of pretraining, built ahead of the model by a ``DataLoader``.

``MicroBatches`` is a map-style dataset whose item ``i`` is micro-batch ``i % accumulation``
of optimizer step ``first_step + i // accumulation`` on one rank: its rows (a pure function
of the row indices), collated, masked (keyed by seed, step and the global micro-batch
index) and laid out for the model (:func:`neobert.data.packing.flatten`), with its masked
and real token counts. An item is therefore the same whichever process builds it and
whenever: ``micro_batch_loader`` runs them in ``num_workers`` processes (in order, pinned
in page-locked memory on CUDA) and a run resumed at step ``s`` starts its loader at ``s``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from neobert.data.masking import MLMMasker
from neobert.data.packing import Rows, collate, flatten


@dataclass
class MicroBatches(torch.utils.data.Dataset):
    """One rank's micro-batches of steps ``first_step`` .. ``max_steps - 1``, in order."""

    rows: Rows
    masker: MLMMasker
    packing: str
    max_length: int
    seed: int
    micro_batch_size: int
    rows_per_step: int
    accumulation: int
    rank: int
    first_step: int
    max_steps: int
    flat: bool = True
    """NeoBERT's flattened inputs (``flatten``); False: the padded batch (any other model)."""

    def __len__(self) -> int:
        return max(0, self.max_steps - self.first_step) * self.accumulation

    def __getitem__(self, i: int) -> dict:
        step, m = divmod(i, self.accumulation)
        return self.micro_batch(self.first_step + step, m)

    def micro_batch(self, step: int, m: int) -> dict:
        """Micro-batch ``m`` of ``step`` on this rank: ``inputs`` for the model, its ``masked``
        tokens, its real ``tokens`` and its ``step``."""
        first = step * self.rows_per_step + (self.rank * self.accumulation + m) * self.micro_batch_size
        batch = collate(self.rows.rows(range(first, first + self.micro_batch_size)), self.packing, self.max_length)
        # masks keyed by the global micro-batch index: the same whatever the number of processes
        batch = self.masker(batch, seed=self.seed, step=step, micro=self.rank * self.accumulation + m)
        return {"inputs": model_inputs(batch, self.flat), "masked": int((batch["labels"] != -100).sum()), "tokens": len(batch["indices"]),
                "step": step}


def model_inputs(batch: dict, flat: bool) -> dict:
    """NeoBERT takes the flattened batch (its layout computed here, on the host); other models
    the padded batch with a 0/1 mask."""
    if flat:
        return flatten(batch)
    return {"input_ids": batch["input_ids"], "attention_mask": (batch["attention_mask"] > 0).long(), "labels": batch["labels"]}


def micro_batch_loader(dataset: MicroBatches, num_workers: int, prefetch_factor: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The items of ``dataset`` in order, built by ``num_workers`` processes (0: in this one,
    when asked) ``prefetch_factor`` items ahead each, in pinned memory when they go to CUDA.

    The loader is iterated once, from the run's first step to its last, so its workers live
    for the whole run without ``persistent_workers``.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers else None, worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: leave SIGTERM / SIGUSR1 (Slurm's preemption signals, sent to every
    process of the job) to the training process, which checkpoints at the next step boundary
    and then ends its workers; a worker killed by them would fail the run instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

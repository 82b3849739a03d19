"""Training sequences and batching for the ID recommenders (in memory, from the PreparedDataset).

Training samples (SASRec / RecBole-CE style, next item at every position): for each user the
train sequence gives inputs items[:-1] and targets items[1:]. With `windows="last"` (Kang &
McAuley's choice) only the last max_len+1 items are used; `windows="all"` cuts the whole train
sequence into windows of max_len+1 items overlapping by one item, so every train item is a
target once (closer to RecBole, which trains on every prefix). Validation and test items never
appear in training samples.

Data order is a function of (seed, epoch) only: the global batches are the same for any world
size, and rank r takes the r-th contiguous slice of each global batch, so every rank runs the
same number of steps.
"""
from __future__ import annotations

import torch

from shards.prepared import PreparedDataset


def pad_left(sequences: list[list[int]], max_len: int) -> torch.Tensor:
    """Keep each sequence's last max_len items and left-pad with 0 to a [B, max_len] tensor."""
    out = torch.zeros(len(sequences), max_len, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[-max_len:]
        if seq:
            out[row, max_len - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return out


def train_windows(dataset: PreparedDataset, max_len: int, windows: str = "last") -> list[list[int]]:
    """Item windows of up to max_len+1 items; users whose train sequence has one item give none."""
    if windows not in ("last", "all"):
        raise ValueError(f"windows must be 'last' or 'all', got {windows!r}")
    out = []
    for user in dataset.users:
        seq = user.train
        if len(seq) < 2:
            continue
        if windows == "last":
            out.append(seq[-(max_len + 1):])
            continue
        end = len(seq)
        while end > 1:  # windows end at the last item and overlap by one: every item from the 2nd on is a target once
            out.append(seq[max(0, end - max_len - 1):end])
            end -= max_len
    return out


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches of sample indices: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return list(order.split(batch_size))


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r's contiguous part of a global batch (sizes differ by at most one)."""
    return batch.tensor_split(world_size)[rank]


def collate(windows: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> (inputs, targets), both [B, max_len], left-padded; target 0 means no target."""
    return pad_left([w[:-1] for w in windows], max_len), pad_left([w[1:] for w in windows], max_len)

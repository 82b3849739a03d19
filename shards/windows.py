"""Training windows and batching for the next-item trainers (from the PreparedDataset's sequence
store: a compact window index over the memory-mapped train items, no per-user Python objects).

Training samples (SASRec / RecBole-CE style): for each user the train sequence gives inputs
items[:-1] and targets items[1:]. With `windows="last"` (Kang & McAuley's choice) only the last
max_len+1 items are used, next item at every position; `windows="all"` cuts the whole train
sequence into windows of max_len+1 items overlapping by one item, so every train item is a
target once (next item at every position), but a window's first targets see only 1, 2, ... items
of context. With a `stride` S < max_len, "all" windows end S items apart (n, n-S, ...; overlapping
by max_len+1-S items) and each keeps the loss on its last S targets only (the first window, which
starts at the user's first item, on all of them): every train item is still a target once, each
with at least max_len+1-S items of context (or all of its history). `windows="prefix"` (RecBole's
training rows) gives one row per train target (every train item from the 2nd on), the up to
max_len items before it as input and the loss on that target only (collate zeroes the row's other
targets). Validation and test items never appear in training samples.

Data order is a function of (seed, epoch) only: the global batches are the same for any world
size, and rank r takes the r-th contiguous slice of each global batch, so every rank runs the
same number of steps.
"""
from __future__ import annotations

import bisect
import operator
from itertools import chain

import numpy as np
import torch

from shards.prepared import PreparedDataset

WINDOWS = ("last", "all", "prefix")


def pad_left(sequences: list[list[int]], max_len: int) -> torch.Tensor:
    """Keep each sequence's last max_len items and left-pad with 0 to a [B, max_len] tensor."""
    kept = [seq[-max_len:] for seq in sequences]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    out = np.zeros((len(kept), max_len), dtype=np.int64)
    # each row's last len positions, filled in row-major order: the items in order, right-aligned
    out[np.arange(max_len) >= (max_len - lengths)[:, None]] = np.fromiter(
        chain.from_iterable(kept), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out)


def trim_left_padding(inputs: torch.Tensor, *aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row of `inputs` (and the same columns
    of each `aligned` tensor), keeping at least one: a batch of short histories then costs its
    longest one, not max_len. Exact for models whose positions count from the oldest real item
    and whose attention masks padding keys (SASRec, SICSRec): only padding outputs disappear."""
    real = (inputs != 0).any(0).nonzero()
    start = int(real[0]) if len(real) else inputs.shape[1] - 1
    return (inputs[:, start:], *(t[:, start:] for t in aligned))


class TargetRow(list):
    """A window of which only the last `keep` targets count (the others are 0 after collate)."""

    def __init__(self, items, keep: int):
        super().__init__(items)
        self.keep = keep


class PrefixRow(TargetRow):
    """A `windows="prefix"` row: its items, of which only the last is a training target."""

    def __init__(self, items):
        super().__init__(items, 1)


class TrainWindows:
    """The training rows of a `windows` mode, in order: users in dataset order; "last" one row per
    user (with >= 2 train items); "all" each user's windows from the end backwards; "prefix" each
    user's targets in time order. `windows[i]` is row i's items (a list; a PrefixRow for
    "prefix"), `len()` the number of rows; == compares with a list of lists.

    Held: the store's flat train items and user offsets (memory-mapped when loaded from a prepare
    dir) and one int64 per user, the cumulative number of rows up to it. Row i's user is found by
    binary search; its (start, end) in the flat items follow from the mode: a user u with n train
    items at `first` has rows k = 0.. with end = n - k*max_len ("all", from the end backwards),
    k + 2 ("prefix"), n ("last"), and start = max(0, end - max_len - 1). "all" with stride S: end =
    n - k*S down to the first end <= max_len + 1 (start 0); rows other than that last one are
    TargetRows keeping S targets (with S = max_len they keep all: plain lists)."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, max_len: int, mode: str, stride: int = 0):
        if mode not in WINDOWS:
            raise ValueError(f"windows must be one of {', '.join(WINDOWS)}, got {mode!r}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if not 0 <= stride <= max_len or (stride and mode != "all"):
            raise ValueError(f"window stride must be 0 (= max_len) or 1..max_len ({max_len}) and only "
                             f"with windows 'all', got {stride} with {mode!r}")
        self.items, self.offsets, self.max_len, self.mode = items, offsets, max_len, mode
        self.stride = stride or max_len
        n = np.diff(offsets)
        if mode == "last":
            counts = (n >= 2).astype(np.int64)
        elif mode == "all":  # ends n, n - S, ... down to the first <= L + 1: 1 + ceil((n - L - 1) / S)
            counts = np.where(n >= 2, 1 + np.maximum(0, -(-(n - max_len - 1) // self.stride)), 0)
        else:
            counts = np.maximum(n - 1, 0)
        self.row_ends = np.cumsum(counts)  # [U] rows of users 0..u together
        self.size = int(self.row_ends[-1]) if len(self.row_ends) else 0
        # windows[i] reads through memoryviews (no copies): a Python int per access, several
        # times cheaper than indexing numpy arrays (or np.memmap) one element at a time
        self._items, self._offsets, self._row_ends = (memoryview(np.ascontiguousarray(a))
                                                      for a in (items, offsets, self.row_ends))

    @classmethod
    def of(cls, dataset: PreparedDataset, max_len: int, mode: str, stride: int = 0) -> "TrainWindows":
        store = dataset.sequence_store()
        return cls(store.items, store.offsets, max_len, mode, stride)

    def __len__(self) -> int:
        return self.size

    def __reduce__(self):  # the memoryviews do not pickle
        return TrainWindows, (self.items, self.offsets, self.max_len, self.mode, self.stride % self.max_len)

    def _end(self, n, k):
        """Row k's end within its user's n train items (ints or int arrays alike)."""
        return n if self.mode == "last" else n - k * self.stride if self.mode == "all" else k + 2

    def _user_bounds(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, start, end) of rows: the user's first item in the flat items, and the row's
        items[first + start:first + end] relative to it."""
        user = np.searchsorted(self.row_ends, rows, side="right")
        k = rows - np.where(user > 0, self.row_ends[user - 1], 0)
        first = np.asarray(self.offsets[user], dtype=np.int64)
        end = self._end(np.asarray(self.offsets[user + 1], dtype=np.int64) - first, k)
        return first, np.maximum(0, end - self.max_len - 1), end

    def bounds(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of rows (an int array) in the flat items, each row items[start:end]."""
        rows = np.asarray(rows, dtype=np.int64)
        if not rows.size:
            return rows.copy(), rows.copy()
        if rows.min() < 0 or rows.max() >= self.size:
            raise IndexError(f"window rows out of range 0..{self.size - 1}")
        first, start, end = self._user_bounds(rows)
        return first + start, first + end

    def __getitem__(self, i) -> list[int]:
        i = operator.index(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"window {i} out of range 0..{self.size - 1}")
        user = bisect.bisect_right(self._row_ends, i)
        k = i - (self._row_ends[user - 1] if user else 0)
        first = self._offsets[user]
        n = self._offsets[user + 1] - first
        end = self._end(n, k)
        start = max(0, end - self.max_len - 1)
        return self._row(self._items[first + start:first + end].tolist(), start)

    def _row(self, items: list[int], start: int) -> list[int]:
        """Row items as their mode hands them out; start: the row's first item in its user's train
        sequence (a strided "all" row keeps `stride` targets unless it starts at the first)."""
        if self.mode == "prefix":
            return PrefixRow(items)
        if self.stride < self.max_len and start > 0:
            return TargetRow(items, self.stride)
        return items

    def __iter__(self):
        step = 1 << 14
        for s in range(0, self.size, step):
            first, start, end = self._user_bounds(np.arange(s, min(s + step, self.size)))
            lo, hi = int((first + start).min()), int((first + end).max())
            flat = self.items[lo:hi].tolist()
            for a, b, f in zip((first + start - lo).tolist(), (first + end - lo).tolist(), start.tolist()):
                yield self._row(flat[a:b], f)

    def __eq__(self, other) -> bool:
        if isinstance(other, (TrainWindows, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        stride = f", stride={self.stride}" if self.stride < self.max_len else ""
        return f"TrainWindows({self.size} rows, {self.mode}, max_len={self.max_len}{stride})"

    def num_targets(self) -> int:
        """Training targets over all rows (prefix: one a row; last, all: len - 1 a row, strided
        "all": every train item from each user's 2nd)."""
        if self.mode == "prefix":
            return self.size
        if self.mode == "all":
            return int(np.maximum(np.diff(self.offsets) - 1, 0).sum())
        starts, ends = self.bounds(np.arange(self.size))
        return int((ends - starts - 1).sum())


def train_windows(dataset: PreparedDataset, max_len: int, windows: str = "last", stride: int = 0) -> TrainWindows:
    """Item windows of up to max_len+1 items; users whose train sequence has one item give none."""
    return TrainWindows.of(dataset, max_len, windows, stride)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches of sample indices: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return list(order.split(batch_size))


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r's contiguous part of a global batch (sizes differ by at most one)."""
    return batch.tensor_split(world_size)[rank]


def collate(windows: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> (inputs, targets), both [B, max_len], left-padded; target 0 means no target.
    A TargetRow keeps only its last `keep` targets (the others are 0; a PrefixRow its last)."""
    inputs, targets = pad_left([w[:-1] for w in windows], max_len), pad_left([w[1:] for w in windows], max_len)
    keep = torch.tensor([w.keep if isinstance(w, TargetRow) else max_len for w in windows], dtype=torch.long)
    if (keep < max_len).any():
        targets[torch.arange(max_len) < (max_len - keep)[:, None]] = 0
    return inputs, targets

"""Streaming readers over the shards written by `shards.writer`.

Two ways to read:
- `stream(...)`: every sample exactly once across all ranks and workers (encoding, evaluation).
  Shards are split with webdataset's `split_by_node` (RANK/WORLD_SIZE or torch.distributed) and
  `split_by_worker`, so ranks may get unequal counts.
- `EqualBatches`: training. Every rank yields exactly the same number of batches per epoch, so
  no collective (DDP all-reduce, our all-gathers) ever waits on a rank that ran out: each
  worker cycles over its own shards until its quota is met. The quota is
  total_samples // (world_size * batch_size) batches per rank.
Bad images never crash a run: they are decoded to None and counted (`image_error` on the sample,
`skip_bad_images=True` drops them and counts them in `stats`).
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

from shards.images import decode_rgb
from sicsrec.runtime.rundir import Upstream

log = logging.getLogger(__name__)


def shards_input(shard_dir: str | Path) -> Upstream:
    """The `shard` stage as another stage's input (made outside the launcher: its index.json)."""
    return Upstream("shard", Path(shard_dir), ("index.json",))


def load_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `launcher shard` first")
    return json.loads(path.read_text())


KINDS = ("items", "train", "pairs")


def shard_urls(shard_dir: str | Path, kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; expected one of {KINDS}")
    index = load_index(shard_dir)
    if kind not in index:
        raise FileNotFoundError(f"{shard_dir} holds no {kind} shards")
    return [str(Path(shard_dir) / name) for name in index[kind]["shards"]]


def decode_image(jpg: bytes, key: str) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) logged under `key` (which item, which shard)."""
    img, reason = decode_rgb(jpg)
    if img is None:
        log.warning("%s: image unreadable, decoded as None (%s)", key, reason)
    return img, reason


class DecodeItem:
    """tar sample -> {"item", "item_id", "title", "image": PIL RGB | None, "image_error": str | None}.

    With decode_images=False the JPEG bytes stay undecoded under "jpg" (None when absent)."""

    def __init__(self, decode_images: bool = True, prefix: str = ""):
        self.decode_images, self.prefix = decode_images, prefix

    def __call__(self, sample: dict) -> dict:
        p = self.prefix
        meta = json.loads(sample["json"])
        out = {"item": meta[p.rstrip(".") or "item"], "title": sample[p + "txt"].decode("utf-8"),
               "image": None, "image_error": None}
        if "item_id" in meta and not p:
            out["item_id"] = meta["item_id"]
        jpg = sample.get(p + "jpg")
        if not self.decode_images:
            out["jpg"] = jpg
        elif jpg is not None:
            item_id = f" ({out['item_id']})" if "item_id" in out else ""
            where = f"item {out['item']}{item_id}, sample {sample['__key__']} in {sample.get('__url__', '?')}"
            out["image"], out["image_error"] = decode_image(jpg, where)
        return out


class DecodePair:
    """pair sample -> {"pair", "a": item dict, "b": item dict, "image_error"} (see shards.pairs)."""

    def __init__(self, decode_images: bool = True):
        self.a, self.b = DecodeItem(decode_images, "a."), DecodeItem(decode_images, "b.")

    def __call__(self, sample: dict) -> dict:
        a, b = self.a(sample), self.b(sample)
        return {"pair": json.loads(sample["json"])["pair"], "a": a, "b": b,
                "image_error": a["image_error"] or b["image_error"]}


def decode_sequence(sample: dict) -> dict:
    return json.loads(sample["json"])


def decoder(kind: str, decode_images: bool) -> Callable[[dict], dict]:
    return {"items": lambda: DecodeItem(decode_images), "train": lambda: decode_sequence,
            "pairs": lambda: DecodePair(decode_images)}[kind]()


class SkipBadImages:
    """Drops samples whose image failed to decode, counting them in `stats['bad_images']`."""

    def __init__(self, stats: Counter):
        self.stats = stats

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            if s.get("image_error"):
                self.stats["bad_images"] += 1
                continue
            yield s


def _pipeline(urls: list[str], kind: str, decode_images: bool, skip_bad_images: bool, stats: Counter,
              shuffle_buffer: int, seed: int, split: bool, extra: list[Callable] = ()) -> wds.DataPipeline:
    stages = [wds.SimpleShardList(urls)]
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=wds.warn_and_continue))
    stages.append(wds.map(decoder(kind, decode_images)))
    if skip_bad_images:
        stages.append(SkipBadImages(stats))
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), rng=random.Random(seed)))
    return wds.DataPipeline(*stages, *extra)


def stream(shard_dir: str | Path, kind: str, decode_images: bool = True, skip_bad_images: bool = False,
           stats: Counter | None = None, split: bool = True) -> wds.DataPipeline:
    """Each sample exactly once over all ranks x workers, in shard order (no shuffling)."""
    return _pipeline(shard_urls(shard_dir, kind), kind, decode_images, skip_bad_images,
                     Counter() if stats is None else stats, 0, 0, split)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class EqualBatches(torch.utils.data.IterableDataset):
    """Training batches with an identical count on every rank (see module docstring).

    Iterate it directly or through `DataLoader(ds, batch_size=None, num_workers=W)`; call
    `set_epoch(e)` each epoch to reshuffle the shard order (same order on every rank).
    `collate` maps a list of samples to a batch (default: the list itself).
    """

    def __init__(self, shard_dir: str | Path, kind: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 256, decode_images: bool = True,
                 skip_bad_images: bool = True, collate: Callable | None = None):
        index = load_index(shard_dir)
        self.urls = shard_urls(shard_dir, kind)
        self.kind, self.batch_size, self.rank, self.world_size = kind, batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = max(1, num_workers), seed, shuffle_buffer
        self.decode_images, self.skip_bad_images = decode_images, skip_bad_images
        self.collate = collate or (lambda samples: samples)
        self.epoch = 0
        self.stats: Counter = Counter()
        if len(self.urls) < world_size * self.num_workers:
            raise ValueError(f"{len(self.urls)} {kind} shards cannot feed {world_size} ranks x {self.num_workers} "
                             f"workers; re-shard with fewer samples per shard (shard.*_per_shard)")
        self.batches_per_rank = index[kind]["total"] // (world_size * batch_size)
        if self.batches_per_rank == 0:
            raise ValueError(f"{index[kind]['total']} samples give no full batch of {batch_size} x {world_size} ranks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def _my_shards(self, worker: int, num_workers: int) -> list[str]:
        urls = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)  # same order on every rank
        mine = urls[self.rank::self.world_size]
        return mine[worker::num_workers]

    def __iter__(self):
        worker, num_workers = _worker()
        quota = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        urls = self._my_shards(worker, num_workers)
        rng_seed = hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF
        produced, cycle = 0, 0
        while produced < quota:
            pipe = _pipeline(urls, self.kind, self.decode_images, self.skip_bad_images, self.stats,
                             self.shuffle_buffer, rng_seed + cycle, split=False,
                             extra=[wds.batched(self.batch_size, collation_fn=self.collate, partial=False)])
            got_any = False
            for batch in pipe:
                got_any = True
                yield batch
                produced += 1
                if produced == quota:
                    return
            if not got_any:
                raise RuntimeError(f"rank {self.rank} worker {worker}: shards {urls} hold less than one batch")
            cycle += 1


class StreamedEpoch:
    """Epoch `epoch` of `batches` as `steps` batches indexable in order, a training loop's
    `epoch_batches` (sicsrec.loop): `epoch[i]` comes after `epoch[i - 1]`; a run resumed inside an
    epoch asks for its first undone batch and the ones before it are streamed past. The collate's
    `epoch` (per-batch augmentation seeds) is set with the shard order. Loader workers draw their
    seeds from a generator seeded by `seed`, not from the global RNG (its state differs in a
    resumed run), and run `worker_init_fn` (trainers pass one that leaves preemption signals to them)."""

    def __init__(self, batches: EqualBatches, epoch: int, steps: int, num_workers: int = 0, seed: int = 0,
                 worker_init_fn: Callable[[int], None] | None = None):
        if steps > len(batches):
            raise ValueError(f"{steps} steps asked of an epoch of {len(batches)} batches")
        self.batches, self.epoch, self.steps, self.num_workers = batches, epoch, steps, num_workers
        self.seed, self.worker_init_fn = seed, worker_init_fn
        self._stream: Iterator | None = None
        self._next = 0

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        if not 0 <= index < self.steps:
            raise IndexError(index)
        if self._stream is None or index < self._next:
            self.batches.set_epoch(self.epoch)
            if hasattr(self.batches.collate, "epoch"):
                self.batches.collate.epoch = self.epoch
            loader = self.batches
            if self.num_workers > 0:
                loader = torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=self.num_workers,
                                                     generator=torch.Generator().manual_seed(self.seed),
                                                     worker_init_fn=self.worker_init_fn)
            self._stream, self._next = iter(loader), 0
        while True:
            batch = next(self._stream)
            self._next += 1
            if self._next > index:
                if self._next == self.steps:
                    self.close()  # the epoch is served: its workers go now, not whenever it is collected
                return batch

    def close(self) -> None:
        """Shut the loader workers down. They ignore SIGTERM (preemption is the trainer's), so a
        worker left running would block the interpreter's exit; the loop calls this however
        the epoch ends (done, preempted, failed)."""
        stream, self._stream = self._stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)  # a multi-worker DataLoader iterator
        if shutdown is not None:
            shutdown()

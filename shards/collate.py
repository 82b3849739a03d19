"""Collates of the streamed data route: shard samples -> the batch dicts the trainers step on.

- `SequenceCollate`: train-sequence samples -> next-item windows, user ids, the batch's unique
  input items and (TSSR end to end) their encoder inputs (`ItemInputs` over an `ItemStore`);
- `PairCollate`: labelled pair samples -> tokens and images of both sides (encoder SFT).
Random augmentation in a collate runs `seeded` by (seed, epoch, the batch's ids): the same in
whichever loader worker makes the batch and when a resumed run makes it again. Collates are
plain data (tokenizers and transforms are handed in): they run in loader workers.
"""
from __future__ import annotations

import contextlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shards.reader import decode_image, stream
from shards.windows import collate as collate_windows


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run a block on python / numpy / torch (CPU) RNGs seeded with `seed` (timm's transforms draw
    from them), then restore the streams that were there: the block neither consumes nor depends
    on them. `seed` None: the block runs on the streams as they are."""
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
            seed_fn(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def tokens(tokenizer, titles: list[str], max_len: int) -> dict:
    """Padded, truncated token ids and attention mask of `titles`."""
    enc = tokenizer(titles, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pixels(transform, images: list, size: int, seed: int | None) -> torch.Tensor:
    """`transform`ed images [n, 3, size, size], `seeded`; zeros where an image is None."""
    with seeded(seed):
        return torch.stack([transform(img) if img is not None else torch.zeros(3, size, size) for img in images])


@dataclass
class ItemStore:
    """Every item's title and raw JPEG bytes (None: no image), indexed by dense id (0 = padding)."""
    titles: list[str]
    jpegs: list[bytes | None]

    @classmethod
    def from_shards(cls, shard_dir: str | Path, num_items: int, progress: bool = True) -> "ItemStore":
        titles, jpegs, seen = [""] * (num_items + 1), [None] * (num_items + 1), np.zeros(num_items + 1, bool)
        for sample in tqdm(stream(shard_dir, "items", decode_images=False, split=False), desc="item shards",
                           unit="item", disable=not progress, leave=False):
            item = sample["item"]
            if not 1 <= item <= num_items:
                raise ValueError(f"item shards hold id {item} outside 1..{num_items}: are they from another "
                                 f"prepare run?")
            titles[item], jpegs[item], seen[item] = sample["title"], sample["jpg"], True
        missing = np.flatnonzero(~seen[1:]) + 1
        if len(missing):
            raise ValueError(f"item shards lack {len(missing)} item(s) (e.g. {missing[:5].tolist()}); "
                             f"re-run `launcher shard`")
        return cls(titles, jpegs)


class ItemInputs:
    """Encoder inputs of a list of items: tokens and/or transformed images (a zero placeholder and
    has_image False for items without a decodable image). Plain data: runs in loader workers."""

    def __init__(self, store: ItemStore, tokenizer=None, text_max_len: int = 32, transform=None,
                 image_size: int = 224):
        self.store, self.tokenizer, self.text_max_len = store, tokenizer, text_max_len
        self.transform, self.image_size = transform, image_size

    def __call__(self, ids: list[int], seed: int | None = None) -> dict:
        """`seed` makes the random image augmentation a function of the seed alone (the global
        RNG states are left as they were)."""
        out = {}
        if self.tokenizer is not None:
            out["tokens"] = tokens(self.tokenizer, [self.store.titles[i] for i in ids], self.text_max_len)
        if self.transform is not None:
            images = [decode_image(self.store.jpegs[i], f"item {i}")[0] if self.store.jpegs[i] else None
                      for i in ids]
            out["has_image"] = torch.tensor([img is not None for img in images])
            out["pixels"] = pixels(self.transform, images, self.image_size, seed)
        return out


class SequenceCollate:
    """Train-shard samples {"user", "items"} -> one micro batch: inputs/targets [B, max_len], user
    ids, the sorted unique input items and (end to end) their encoder inputs. The image
    augmentation is seeded by (seed, epoch, the batch's users): the same whichever worker makes
    the batch, and when a resumed run makes it again."""

    def __init__(self, max_len: int, item_inputs: ItemInputs | None, seed: int = 0):
        self.max_len, self.item_inputs, self.seed = max_len, item_inputs, seed
        self.epoch = 0

    def __call__(self, samples: list[dict]) -> dict:
        windows = [s["items"][-(self.max_len + 1):] for s in samples]
        inputs, targets = collate_windows(windows, self.max_len)
        ids = torch.unique(inputs[inputs != 0])
        if len(ids) == 0:  # only users without history: encode one item anyway, every rank runs the encoders
            ids = torch.tensor([1])
        batch = {"inputs": inputs, "targets": targets, "users": torch.tensor([s["user"] for s in samples]),
                 "content_ids": ids}
        if self.item_inputs is not None:
            users = tuple(batch["users"].tolist())
            batch["content"] = self.item_inputs(ids.tolist(), seed=hash((self.seed, self.epoch) + users) & 0x7FFFFFFF)
        return batch


class PairCollate:
    """A list of decoded pair samples -> one batch: tokens of a-texts then b-texts, images (zero
    placeholder + has_image False for missing or corrupt ones), item ids. Runs in loader workers.
    The train transform of a batch is seeded by (seed, epoch, the batch's item ids), so it does
    not depend on the batches before it: a run resumed mid-epoch augments as the original did."""

    def __init__(self, model, seed: int = 0):  # a ContentEncoder: its tokenizer, text length, train transform
        self.tokenizer, self.max_len = model.text.tokenizer, model.text.max_len
        self.transform = model.image_transform(train=True) if model.has_image_encoder else None
        self.size = model.cfg.image_size
        self.seed, self.epoch = seed, 0  # StreamedEpoch sets epoch before each epoch's iteration

    def __call__(self, samples: list[dict]) -> dict:
        sides = [s["a"] for s in samples] + [s["b"] for s in samples]
        batch = {"tokens": tokens(self.tokenizer, [x["title"] for x in sides], self.max_len),
                 "ids": torch.tensor([x["item"] for x in sides])}
        if self.transform is not None:
            batch["has_image"] = torch.tensor([x["image"] is not None for x in sides])
            key = json.dumps([self.seed, self.epoch, batch["ids"].tolist()]).encode()
            batch["images"] = pixels(self.transform, [x["image"] for x in sides], self.size, zlib.crc32(key))
        return batch

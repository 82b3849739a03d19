"""`shard`: write the prepared dataset as WebDataset shards.

  items-XXXXX.tar  one sample per item: __key__ "i<dense id>", txt (title), json
                   {"item", "item_id", "has_image"}, jpg (RGB JPEG; absent when the item has no image
                   or PIL cannot decode it: counted as index.json problems.unreadable_images)
  train-XXXXX.tar  one sample per user: __key__ "u<dense id>", json {"user", "items": train sequence}
  index.json       shard names and sample counts per kind (readers size epochs from it)
Keys hold no dots (webdataset splits a file name at the first dot).
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from shards.config import ShardConfig
from shards.images import decode_rgb
from shards.prepared import PreparedDataset

log = logging.getLogger(__name__)


def item_key(item: int) -> str:
    return f"i{item:08d}"


def user_key(user: int) -> str:
    return f"u{user:08d}"


def encode_jpeg(img: Image.Image, max_side: int, quality: int) -> bytes:
    """An RGB image (from `decode_rgb`, which sniffs the real format) as JPEG bytes."""
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_samples(pattern: str, samples, maxcount: int, maxsize: int, desc: str, total: int) -> dict:
    """Write samples with a size-bounded ShardWriter; returns the index entry (names, counts, total)."""
    counts: Counter = Counter()
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for sample in tqdm(samples, total=total, desc=desc, unit="sample", leave=False):
            sink.write(sample)
            counts[Path(sink.fname).name] += 1
    return {"shards": sorted(counts), "counts": [counts[n] for n in sorted(counts)], "total": sum(counts.values())}


def write_shards(ds: PreparedDataset, out: str | Path, cfg: ShardConfig) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    problems: Counter = Counter()

    def item_samples():
        for it in ds.items[1:]:
            sample = {"__key__": item_key(it.item), "txt": it.title,
                      "json": {"item": it.item, "item_id": it.item_id, "has_image": False}}
            if it.image:
                img, reason = decode_rgb(it.image)
                if img is None:
                    problems["unreadable_images"] += 1
                    log.warning("item %s: image %s unreadable (%s); sharded without image", it.item_id, it.image,
                                reason)
                else:
                    sample["jpg"] = encode_jpeg(img, cfg.image_size, cfg.jpeg_quality)
                    sample["json"]["has_image"] = True
            yield sample

    def user_samples():
        for u in ds.users:
            yield {"__key__": user_key(u.user), "json": {"user": u.user, "items": u.train}}

    index = {
        "items": write_samples(str(out / "items-%05d.tar"), item_samples(), cfg.items_per_shard,
                        cfg.max_shard_bytes, "item shards", ds.num_items),
        "train": write_samples(str(out / "train-%05d.tar"), user_samples(), cfg.users_per_shard,
                        cfg.max_shard_bytes, "train shards", ds.num_users),
        "num_items": ds.num_items,
        "num_users": ds.num_users,
        "problems": dict(problems),
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"item_shards": len(index["items"]["shards"]), "train_shards": len(index["train"]["shards"]),
            **index["problems"]}

"""Pair shards for encoder SFT: each labelled (target, similar) item pair with both items' text
and image, so training streams pairs without random access into the item catalogue.

  pairs-XXXXX.tar  __key__ "p<index>", json {"pair", "a", "b"}, a.txt, b.txt, a.jpg, b.jpg (when present)
  index.json       {"pairs": {"shards", "counts", "total"}}
The join reads the item shards once and keeps in memory only the items that occur in a pair
(at most 2 x #pairs items' JPEG bytes).
"""
from __future__ import annotations

import json
from pathlib import Path

from shards.reader import stream
from shards.writer import write_samples


def write_pair_shards(pairs: list[tuple[int, int]], item_shard_dir: str | Path, out: str | Path,
                      pairs_per_shard: int = 500) -> dict:
    if not pairs:
        raise ValueError("no labelled pairs to shard (did labeling find any valid pair?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("pairs-*.tar"):
        old.unlink()
    needed = {i for pair in pairs for i in pair}
    items = {s["item"]: s for s in stream(item_shard_dir, "items", decode_images=False, split=False)
             if s["item"] in needed}
    missing = needed - set(items)
    if missing:
        raise ValueError(f"pairs reference {len(missing)} item(s) absent from {item_shard_dir}, e.g. {sorted(missing)[:5]}")

    def samples():
        for n, (a, b) in enumerate(pairs):
            sample = {"__key__": f"p{n:08d}", "json": {"pair": n, "a": a, "b": b},
                      "a.txt": items[a]["title"], "b.txt": items[b]["title"]}
            for side, item in (("a", a), ("b", b)):
                if items[item]["jpg"] is not None:
                    sample[f"{side}.jpg"] = items[item]["jpg"]
            yield sample

    index = {"pairs": write_samples(str(out / "pairs-%05d.tar"), samples(), pairs_per_shard, 1 << 30,
                                    "pair shards", len(pairs))}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"pair_shards": len(index["pairs"]["shards"]), "pairs": len(pairs)}

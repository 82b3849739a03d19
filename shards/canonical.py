"""Read and validate a dataset in the canonical format (docs/architecture.md):

  items.jsonl        {"item_id": str, "title": str, "image": "images/<file>" | absolute path | null}
  images/            one image per item (JPEG or PNG); an item may lack one
  interactions.csv   header user_id,item_id,timestamp (int seconds or ISO 8601)

Unrecoverable problems raise DatasetError naming the file and line; recoverable ones (an item
without an image, an empty title) are counted in `warnings` and reported in the stats.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


class DatasetError(ValueError):
    def __init__(self, path: Path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass
class RawItem:
    item_id: str
    title: str
    image: str | None  # absolute path, or None when the item has no (readable) image file


@dataclass
class Interaction:
    user_id: str
    item_id: str
    timestamp: float
    order: int  # position in the file: the tie-break for equal timestamps


@dataclass
class CanonicalDataset:
    items: dict[str, RawItem]
    interactions: list[Interaction]
    warnings: Counter = field(default_factory=Counter)


def parse_timestamp(raw: str) -> float:
    raw = raw.strip()
    try:
        return float(int(raw))
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"timestamp {raw!r} is neither integer seconds nor ISO 8601") from None


def read_items(path: Path, warnings: Counter) -> dict[str, RawItem]:
    if not path.exists():
        raise DatasetError(path, None, "missing items file")
    items: dict[str, RawItem] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(path, line_no, f"invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "item_id" not in rec:
                raise DatasetError(path, line_no, "record has no 'item_id'")
            item_id = str(rec["item_id"])
            if item_id in items:
                raise DatasetError(path, line_no, f"duplicate item_id {item_id!r}")
            title = str(rec.get("title") or "").strip()
            if not title:
                warnings["items_without_title"] += 1
            image = rec.get("image")
            image_path = (path.parent / image) if image else None
            if image_path is None or not image_path.is_file():
                warnings["items_without_image"] += 1
                image_path = None
            items[item_id] = RawItem(item_id, title, str(image_path.resolve()) if image_path else None)
    if not items:
        raise DatasetError(path, None, "no items")
    return items


def read_interactions(path: Path, items: dict[str, RawItem]) -> list[Interaction]:
    if not path.exists():
        raise DatasetError(path, None, "missing interactions file")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"user_id", "item_id", "timestamp"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(path, 1, f"missing column(s) {sorted(missing)}; header must be user_id,item_id,timestamp")
        for row in reader:
            line_no = reader.line_num
            item_id = row["item_id"]
            if item_id not in items:
                raise DatasetError(path, line_no, f"unknown item_id {item_id!r} (not in items.jsonl)")
            if not row["user_id"]:
                raise DatasetError(path, line_no, "empty user_id")
            try:
                ts = parse_timestamp(row["timestamp"] or "")
            except ValueError as e:
                raise DatasetError(path, line_no, str(e)) from None
            out.append(Interaction(row["user_id"], item_id, ts, len(out)))
    if not out:
        raise DatasetError(path, None, "no interactions")
    return out


def read_canonical(root: str | Path) -> CanonicalDataset:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    warnings: Counter = Counter()
    items = read_items(root / "items.jsonl", warnings)
    interactions = read_interactions(root / "interactions.csv", items)
    return CanonicalDataset(items, interactions, warnings)


def write_canonical(root: str | Path, items: list[dict], interactions: list[tuple]) -> None:
    """Write items (dicts with item_id, title, image) and (user_id, item_id, timestamp) rows."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    with open(root / "interactions.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(interactions)

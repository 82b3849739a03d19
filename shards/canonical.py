"""Read and validate a dataset in the canonical format (docs/architecture.md):

  items.jsonl        {"item_id": str, "title": str, "image": "images/<file>" | absolute path | null}
  images/            one image per item (JPEG or PNG); an item may lack one
  interactions.csv   header user_id,item_id,timestamp (int seconds or ISO 8601)

Both files are UTF-8 (a leading BOM is accepted). Unrecoverable problems raise DatasetError
naming the file and line; recoverable ones (an empty title, an item without a usable image) are
counted in `warnings` and reported in the stats. Image files are checked when read
(`validate_images`, see shards.images.check_image): an item whose image file is missing or
unreadable is kept, counted (`images_missing`, `images_unreadable`) and treated as having no
image by every later stage (its `image` is None).
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Iterator

from shards.images import IMAGE_CHECKS, check_image

log = logging.getLogger(__name__)


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
    image_check: str = "header"  # how image files were validated (shards.images.IMAGE_CHECKS)


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


def utf8_lines(path: Path, f: BinaryIO) -> Iterator[str]:
    """The lines of a file opened in binary mode, decoded as UTF-8 (a BOM on line 1 is dropped);
    a byte that is not UTF-8 is a DatasetError naming the line."""
    for line_no, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(path, line_no, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _image_path(path: Path, line_no: int, item_id: str, image, warnings: Counter, validate: str) -> str | None:
    """The image's absolute path, or None (counted) when there is none, or it is missing or unreadable."""
    if image is not None and not isinstance(image, str):
        raise DatasetError(path, line_no, f"'image' must be a path string or null, got {image!r}")
    if image:
        image_path = path.parent / image
        if not image_path.is_file():
            warnings["images_missing"] += 1
            log.warning("%s:%d: item %r: image %s not found; treated as having no image", path, line_no, item_id,
                        image_path)
        elif reason := check_image(image_path, validate):
            warnings["images_unreadable"] += 1
            log.warning("%s:%d: item %r: image %s unreadable (%s); treated as having no image", path, line_no,
                        item_id, image_path, reason)
        else:
            return str(image_path.resolve())
    warnings["items_without_image"] += 1
    return None


def read_items(path: Path, warnings: Counter, validate_images: str = "header") -> dict[str, RawItem]:
    if not path.exists():
        raise DatasetError(path, None, "missing items file")
    items: dict[str, RawItem] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(utf8_lines(path, f), 1):
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
            image = _image_path(path, line_no, item_id, rec.get("image"), warnings, validate_images)
            items[item_id] = RawItem(item_id, title, image)
    if not items:
        raise DatasetError(path, None, "no items")
    return items


COLUMNS = ("user_id", "item_id", "timestamp")


def read_interactions(path: Path, items: dict[str, RawItem]) -> list[Interaction]:
    if not path.exists():
        raise DatasetError(path, None, "missing interactions file")
    out = []
    with open(path, "rb") as f:
        reader = csv.reader(utf8_lines(path, f))
        try:
            header = next(reader, [])
            missing = set(COLUMNS) - set(header)
            if missing:
                raise DatasetError(path, 1, f"missing column(s) {sorted(missing)}; header must be {','.join(COLUMNS)}")
            columns = [header.index(c) for c in COLUMNS]
            for row in reader:
                if not row:
                    continue
                line_no = reader.line_num
                if len(row) != len(header):
                    raise DatasetError(path, line_no, f"{len(row)} fields, but the header has {len(header)} "
                                                      f"({','.join(header)})")
                user_id, item_id, timestamp = (row[i] for i in columns)
                if item_id not in items:
                    raise DatasetError(path, line_no, f"unknown item_id {item_id!r} (not in items.jsonl)")
                if not user_id:
                    raise DatasetError(path, line_no, "empty user_id")
                try:
                    ts = parse_timestamp(timestamp)
                except ValueError as e:
                    raise DatasetError(path, line_no, str(e)) from None
                out.append(Interaction(user_id, item_id, ts, len(out)))
        except csv.Error as e:
            raise DatasetError(path, reader.line_num, f"malformed CSV ({e})") from None
    if not out:
        raise DatasetError(path, None, "no interactions")
    return out


def read_canonical(root: str | Path, validate_images: str = "header") -> CanonicalDataset:
    """`validate_images` (header | full | none) is how image files are checked; see shards.images."""
    root = Path(root)
    if validate_images not in IMAGE_CHECKS:
        raise ValueError(f"data.validate_images must be one of {', '.join(IMAGE_CHECKS)}, got {validate_images!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    warnings: Counter = Counter()
    items = read_items(root / "items.jsonl", warnings, validate_images)
    interactions = read_interactions(root / "interactions.csv", items)
    return CanonicalDataset(items, interactions, warnings, validate_images)


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

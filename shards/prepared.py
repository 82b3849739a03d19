"""The prepared dataset every stage after `prepare` reads.

Layout of `<run_dir>/prepare/`:
  items.jsonl      {"item": dense id 1..N, "item_id": str, "title": str, "image": abs path | null}
                   (null also when the raw image file was missing or unreadable: such items are
                   text-only in every later stage)
  sequences.jsonl  {"user": dense id 1..U, "user_id": str, "train": [ids], "valid": id, "test": id}
  stats.json       dataset statistics (Table 3 of the paper) and counted warnings: over all raw
                   items items_without_title, items_without_image = no image given +
                   images_missing + images_unreadable; over the prepared items items_with_image
Dense id 0 is padding for items and users. The split is leave-one-out: the last interaction
is the test target, the second-last the validation target, the rest is training history.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    item: int
    item_id: str
    title: str
    image: str | None


@dataclass(frozen=True)
class UserSequence:
    user: int
    user_id: str
    train: list[int]
    valid: int
    test: int

    def history(self, split: str) -> list[int]:
        """Items the model sees before predicting the target of `split` (train|valid|test)."""
        if split == "train":
            return self.train[:-1]
        if split == "valid":
            return self.train
        if split == "test":
            return self.train + [self.valid]
        raise ValueError(f"unknown split {split!r}; expected train, valid or test")

    def target(self, split: str) -> int:
        return {"train": self.train[-1], "valid": self.valid, "test": self.test}[split]


def read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


class PreparedDataset:
    """Items and leave-one-out sequences with dense ids; index 0 of `items` is padding."""

    def __init__(self, items: list[Item], users: list[UserSequence], stats: dict | None = None):
        self.items = [Item(0, "", "", None)] + sorted(items, key=lambda i: i.item)
        if [i.item for i in self.items] != list(range(len(self.items))):
            raise ValueError("item ids must be dense 1..N")
        self.users = users
        self.stats = stats or {}

    @property
    def num_items(self) -> int:
        """N: real items are 1..N, 0 is padding."""
        return len(self.items) - 1

    @property
    def num_users(self) -> int:
        return len(self.users)

    def titles(self) -> list[str]:
        return [i.title for i in self.items]

    @classmethod
    def load(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        if not (root / "items.jsonl").exists():
            raise FileNotFoundError(f"{root} holds no prepared dataset (run `launcher prepare` first)")
        items = [Item(**r) for r in read_jsonl(root / "items.jsonl")]
        users = [UserSequence(**r) for r in read_jsonl(root / "sequences.jsonl")]
        stats_path = root / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        return cls(items, users, stats)

    def save(self, root: str | Path) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / "items.jsonl", (vars(i) for i in self.items[1:]))
        write_jsonl(root / "sequences.jsonl", (vars(u) for u in self.users))
        (root / "stats.json").write_text(json.dumps(self.stats, indent=2) + "\n")

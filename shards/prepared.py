"""The prepared dataset every stage after `prepare` reads.

Layout of `<run_dir>/prepare/`:
  items.jsonl      {"item": dense id 1..N, "item_id": str, "title": str, "image": abs path | null}
                   (null also when the raw image file was missing or unreadable: such items are
                   text-only in every later stage)
  sequences.jsonl  {"user": dense id 1..U, "user_id": str, "train": [ids], "valid": id, "test": id}
                   the canonical, human-readable sequences (later stages fingerprint this file)
  sequences.*.npy  the same sequences as columns (the sequence store, see SequenceStore), which
                   `PreparedDataset.load` memory-maps: items (int32, every user's train items
                   concatenated), offsets (int64, U+1: user row r's train items are
                   items[offsets[r]:offsets[r+1]]), valid and test (int32, U), user_ids (uint8,
                   the UTF-8 user ids concatenated) and user_id_offsets (int64, U+1)
  stats.json       dataset statistics (Table 3 of the paper) and counted warnings: over all raw
                   items items_without_title, items_without_image = no image given +
                   images_missing + images_unreadable; over the prepared items items_with_image
Dense id 0 is padding for items and users; user row r (0-based) is user r + 1. The split is
leave-one-out: the last interaction is the test target, the second-last the validation target,
the rest is training history.

Memory: a loaded dataset's `users` is a read-only, lazy sequence (UserSequences) over the
memory-mapped store: every process on a node that loads the same prepare dir shares its pages
through the OS page cache, and a process holds no per-user Python objects (a UserSequence is
made when a user is indexed or iterated over). A prepare dir written before the store existed
(no sequences.*.npy) still loads: its sequences.jsonl is read once into the same arrays, in this
process's memory (~4 bytes per interaction instead of ~80; nothing is written, the prepare dir
may be read-only or shared by several ranks); re-running `prepare --force` writes the store.
"""
from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sicsrec.runtime.rundir import Upstream

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------
# The sequence store.

STORE_FILES = {name: f"sequences.{name}.npy" for name in
               ("items", "offsets", "valid", "test", "user_ids", "user_id_offsets")}
_DTYPES = {"items": np.int32, "offsets": np.int64, "valid": np.int32, "test": np.int32, "user_ids": np.uint8,
           "user_id_offsets": np.int64}
_CHUNK = 4096  # users per block when iterating
_MAX_STEP = 64  # iterating rows with a larger step reads them one by one


def _not_dense(row: int, user: int) -> ValueError:
    return ValueError(f"user ids must be dense 1..U in order: row {row} holds user {user}, expected {row + 1}")


def _array(values: array, dtype) -> np.ndarray:
    return np.frombuffer(values, dtype) if len(values) else np.zeros(0, dtype)


def _encode_ids(user_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in user_ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class SequenceStore:
    """All users' leave-one-out sequences as six flat arrays (see the module docstring), in
    memory or memory-mapped from a prepare dir (`root`)."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, valid: np.ndarray, test: np.ndarray,
                 user_ids: np.ndarray, user_id_offsets: np.ndarray, root: Path | None = None):
        self.items, self.offsets, self.valid, self.test = items, offsets, valid, test
        self.user_ids, self.user_id_offsets, self.root = user_ids, user_id_offsets, root
        u = len(valid)
        if (len(offsets) != u + 1 or len(test) != u or len(user_id_offsets) != u + 1 or int(offsets[0]) != 0
                or int(offsets[-1]) != len(items) or int(user_id_offsets[-1]) != len(user_ids)):
            where = f" in {root}" if root else ""
            raise ValueError(f"inconsistent sequence store{where}: {len(items)} items, {len(offsets)} offsets, "
                             f"{u} valid, {len(test)} test, {len(user_id_offsets)} user id offsets")

    @property
    def num_users(self) -> int:
        return len(self.valid)

    # -- building

    @classmethod
    def from_sequences(cls, user_ids: list[str], lengths: np.ndarray, sequences: np.ndarray) -> "SequenceStore":
        """From every user's whole sequence (train items, valid, test) concatenated in user order,
        with the users' sequence lengths (each >= 2)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        keep = np.ones(len(sequences), dtype=bool)
        keep[ends - 1] = False
        keep[ends - 2] = False
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths - 2, out=offsets[1:])
        seq = np.asarray(sequences)
        return cls(seq[keep].astype(np.int32), offsets, seq[ends - 2].astype(np.int32),
                   seq[ends - 1].astype(np.int32), *_encode_ids(user_ids))

    @classmethod
    def from_users(cls, users: Iterable[UserSequence]) -> "SequenceStore":
        """From UserSequence objects (users 1..U in order)."""
        return cls._build((u.user, u.user_id, u.train, u.valid, u.test) for u in users)

    @classmethod
    def from_jsonl(cls, path: Path) -> "SequenceStore":
        """sequences.jsonl read into the arrays in memory (prepare dirs without the store)."""
        return cls._build((r["user"], r["user_id"], r["train"], r["valid"], r["test"]) for r in read_jsonl(path))

    @classmethod
    def _build(cls, users: Iterable[tuple[int, str, list[int], int, int]]) -> "SequenceStore":
        """From (user, user_id, train, valid, test), users 1..U in order; grown in typed buffers
        (about 4 bytes an item), no Python object kept per user."""
        items, lengths, valid, test = array("i"), array("q", [0]), array("i"), array("i")
        ids, id_lengths = bytearray(), array("q", [0])
        for row, (user, user_id, train, v, t) in enumerate(users):
            if user != row + 1:
                raise _not_dense(row, user)
            items.extend(train)
            lengths.append(len(train))
            valid.append(v)
            test.append(t)
            encoded = user_id.encode("utf-8")
            ids += encoded
            id_lengths.append(len(encoded))
        return cls(_array(items, np.int32), np.cumsum(_array(lengths, np.int64)), _array(valid, np.int32),
                   _array(test, np.int32), np.frombuffer(bytes(ids), np.uint8),
                   np.cumsum(_array(id_lengths, np.int64)))

    # -- files

    @staticmethod
    def exists(root: str | Path) -> bool:
        return all((Path(root) / name).exists() for name in STORE_FILES.values())

    @classmethod
    def open(cls, root: str | Path) -> "SequenceStore":
        """The store in `root`, memory-mapped (read-only)."""
        root = Path(root)
        # plain ndarray views of the maps (np.memmap's Python-level indexing costs ~3x per access)
        arrays = {name: np.asarray(np.load(root / file, mmap_mode="r")) for name, file in STORE_FILES.items()}
        for name, a in arrays.items():
            if a.dtype != _DTYPES[name] or a.ndim != 1:
                raise ValueError(f"{root / STORE_FILES[name]}: expected a 1-d {np.dtype(_DTYPES[name])} array, "
                                 f"got {a.ndim}-d {a.dtype}")
        return cls(**arrays, root=root)

    def save(self, root: str | Path) -> None:
        """Writes the six files (each to a temporary name, then renamed: a process that has the
        old files mapped keeps reading them)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for name, file in STORE_FILES.items():
            tmp = root / f".{file}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(getattr(self, name), dtype=_DTYPES[name]))
            os.replace(tmp, root / file)

    def __reduce__(self):  # a pickled mapped store is reopened from its files, not copied
        if self.root is not None:
            return SequenceStore.open, (self.root,)
        return SequenceStore, (self.items, self.offsets, self.valid, self.test, self.user_ids,
                               self.user_id_offsets)

    # -- reading

    def train_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_id(self, row: int) -> str:
        a, b = int(self.user_id_offsets[row]), int(self.user_id_offsets[row + 1])
        return self.user_ids[a:b].tobytes().decode("utf-8")

    def user(self, row: int) -> UserSequence:
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        return UserSequence(row + 1, self.user_id(row), self.items[a:b].tolist(), int(self.valid[row]),
                            int(self.test[row]))

    def block(self, start: int, stop: int, step: int = 1) -> Iterator[UserSequence]:
        """Users of rows start, start+step, ... < stop (step >= 1), reading each array's span once."""
        offsets = self.offsets[start:stop + 1].tolist()
        base = offsets[0]
        items = self.items[base:offsets[-1]].tolist()
        id_offsets = self.user_id_offsets[start:stop + 1].tolist()
        id_base = id_offsets[0]
        ids = self.user_ids[id_base:id_offsets[-1]].tobytes()
        valid, test = self.valid[start:stop].tolist(), self.test[start:stop].tolist()
        for k in range(0, stop - start, step):
            yield UserSequence(start + k + 1, ids[id_offsets[k] - id_base:id_offsets[k + 1] - id_base].decode("utf-8"),
                               items[offsets[k] - base:offsets[k + 1] - base], valid[k], test[k])


class StoreWriter:
    """Writes a SequenceStore record by record (sequences.jsonl's records, users 1..U in order)
    straight into its files, memory-mapped: for sequences that are streamed (prepare_ray), so the
    writer holds no sequence in memory. `tee` passes the records on (to write_jsonl)."""

    def __init__(self, root: str | Path, user_ids: list[str], num_train_items: int):
        self.root, self.row, self.pos = Path(root), 0, 0
        self.root.mkdir(parents=True, exist_ok=True)
        self.ids = _encode_ids(user_ids)
        u = len(user_ids)
        self.arrays = {name: np.lib.format.open_memmap(self._tmp(name), "w+", _DTYPES[name], (n,)) for name, n in
                       (("items", num_train_items), ("offsets", u + 1), ("valid", u), ("test", u))}
        self.arrays["offsets"][0] = 0

    def _tmp(self, name: str) -> Path:
        return self.root / f".{STORE_FILES[name]}.tmp"

    def add(self, record: dict) -> None:
        row, train, a = self.row, record["train"], self.arrays
        if record["user"] != row + 1:
            raise _not_dense(row, record["user"])
        a["items"][self.pos:self.pos + len(train)] = train
        self.pos += len(train)
        a["offsets"][row + 1] = self.pos
        a["valid"][row], a["test"][row] = record["valid"], record["test"]
        self.row += 1

    def tee(self, records: Iterable[dict]) -> Iterator[dict]:
        for r in records:
            self.add(r)
            yield r

    def close(self) -> None:
        if self.row != len(self.arrays["valid"]) or self.pos != len(self.arrays["items"]):
            raise ValueError(f"StoreWriter got {self.row} users and {self.pos} train items, expected "
                             f"{len(self.arrays['valid'])} and {len(self.arrays['items'])}")
        for a in self.arrays.values():
            a.flush()
        self.arrays = {}
        for name in ("items", "offsets", "valid", "test"):
            os.replace(self._tmp(name), self.root / STORE_FILES[name])
        for name, a in zip(("user_ids", "user_id_offsets"), self.ids):
            with open(self._tmp(name), "wb") as f:
                np.save(f, a)
            os.replace(self._tmp(name), self.root / STORE_FILES[name])


class UserSequences(Sequence):
    """A read-only, lazy list of UserSequence over a SequenceStore's rows (a range): len(),
    indexing, slicing (another UserSequences, whatever its step), iteration, and == with a list."""

    def __init__(self, store: SequenceStore, rows: range | None = None):
        self.store = store
        self.rows = range(store.num_users) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return UserSequences(self.store, self.rows[index])
        return self.store.user(self.rows[index])

    def __iter__(self) -> Iterator[UserSequence]:
        rows = self.rows
        if not 1 <= rows.step <= _MAX_STEP:
            return (self.store.user(r) for r in rows)
        n = max(1, _CHUNK // rows.step)  # users per block: spans of about _CHUNK rows
        return (u for c in range(0, len(rows), n) for sub in (rows[c:c + n],)
                for u in self.store.block(sub.start, sub[-1] + 1, sub.step))

    def __eq__(self, other) -> bool:
        if isinstance(other, (UserSequences, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        where = f" of {self.store.root}" if self.store.root else ""
        return f"UserSequences({len(self)} users{where})"

    def covers_store(self) -> bool:
        """Whether these are all the store's users, in order."""
        return self.rows == range(self.store.num_users)


# ---------------------------------------------------------------------------------------------

def prepared_input(folder: str | Path) -> Upstream:
    """The `prepare` stage as another stage's input (a folder made outside the launcher is
    identified by its two JSONL files)."""
    return Upstream("prepare", Path(folder), ("items.jsonl", "sequences.jsonl"))


class PreparedDataset:
    """Items and leave-one-out sequences with dense ids; index 0 of `items` is padding. `users`
    is a list of UserSequence (as given) or, loaded from a prepare dir, a lazy UserSequences."""

    def __init__(self, items: list[Item], users: list[UserSequence] | UserSequences, stats: dict | None = None):
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

    def sequence_store(self) -> SequenceStore:
        """The users' sequences as arrays: the store `users` is backed by, or built from the list."""
        if isinstance(self.users, UserSequences) and self.users.covers_store():
            return self.users.store
        return SequenceStore.from_users(self.users)

    @classmethod
    def load(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        if not (root / "items.jsonl").exists():
            raise FileNotFoundError(f"{root} holds no prepared dataset (run `launcher prepare` first)")
        items = [Item(**r) for r in read_jsonl(root / "items.jsonl")]
        stats_path = root / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        if SequenceStore.exists(root):
            store = SequenceStore.open(root)
            if "users" in stats and stats["users"] != store.num_users:
                raise ValueError(f"{root}: the sequence store holds {store.num_users} users, stats.json "
                                 f"{stats['users']}; re-run prepare (--force)")
        else:
            log.info("%s has no sequence store (sequences.*.npy, written by prepare since issue #15): reading "
                     "sequences.jsonl into memory; re-run prepare --force to write it", root)
            store = SequenceStore.from_jsonl(root / "sequences.jsonl")
        return cls(items, UserSequences(store), stats)

    def save(self, root: str | Path) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / "items.jsonl", (vars(i) for i in self.items[1:]))
        store = self.sequence_store()
        write_jsonl(root / "sequences.jsonl", (vars(u) for u in self.users))
        store.save(root)
        (root / "stats.json").write_text(json.dumps(self.stats, indent=2) + "\n")

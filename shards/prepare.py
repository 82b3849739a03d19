"""`prepare`: canonical dataset -> PreparedDataset (k-core, time order, dense ids, leave-one-out).

The rules (`prepare_python` states them in plain Python, one object per interaction):
- k-core: repeatedly drop users and items with fewer than k interactions until none is left;
- users are ordered by their first interaction left in the file; each user's interactions are
  sorted by (timestamp, file order): equal timestamps keep the file's order, as RecBole does;
- users left with fewer than 3 interactions are dropped (leave-one-out needs train, valid, test);
- items are numbered 1..N in order of first appearance over the users' sequences in that order.

`prepare_columns` applies the same rules vectorised (numpy over integer codes: bincount for the
k-core rounds, one lexsort, first occurrences for the dense ids) to columns read by pyarrow
(shards.canonical.read_columns), and writes the same files byte for byte; it is what the
`prepare` stage runs, and `prepare` (the in-memory API) runs it too. `prepare_python` is kept as
the reference the vectorised path is tested against (tests/test_prepare_fast.py) and the baseline
of benchmarks/scale_prepare.py. `prepare_ray` gives the same result with the per-interaction work
on a Ray cluster (Ray Data), for inputs that outgrow one machine.

Columnar library: pyarrow. Ray Data needs it anyway (ray[data] requires pyarrow; Ray Data's join
would add polars, which this module avoids), so the fast path adds no second dependency; its CSV
and Parquet readers are multithreaded C++, and once ids are integer codes the group-bys, sorts and
first occurrences this needs are a few numpy calls, for which polars or duckdb would bring little.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from shards.canonical import (COLUMNS, BadRow, CanonicalColumns, CanonicalDataset, DatasetError, Interaction,
                              RawItem, check_folder, csv_options, check_csv, check_parquet_schema,
                              csv_reads_like_python, encode_table, interactions_path, read_columns, read_items,
                              string_columns)
from shards.prepared import Item, PreparedDataset, SequenceStore, StoreWriter, UserSequence, write_jsonl

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The reference: the rules in plain Python.

def kcore(interactions: list[Interaction], k: int) -> list[Interaction]:
    """Repeatedly drop users and items with fewer than k interactions until none is left."""
    while k > 1:
        users = Counter(x.user_id for x in interactions)
        items = Counter(x.item_id for x in interactions)
        kept = [x for x in interactions if users[x.user_id] >= k and items[x.item_id] >= k]
        if len(kept) == len(interactions):
            break
        interactions = kept
    return interactions


def prepare_python(data: CanonicalDataset, k: int = 5) -> PreparedDataset:
    """Users are ordered by first appearance in the file; items are numbered in order of first
    interaction of that ordering, so ids are deterministic. Each user's interactions are sorted
    by (timestamp, file order): equal timestamps keep the file's order, as RecBole does."""
    if k < 1:
        raise ValueError(f"kcore must be >= 1, got {k}")
    stats = Counter(data.warnings)
    for key in RAW_ITEM_COUNTS:
        stats[key] += 0  # listed in stats.json even when zero
    raw_count = len(data.interactions)
    kept = kcore(data.interactions, k)
    stats["interactions_dropped_by_kcore"] = raw_count - len(kept)

    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for x in kept:
        by_user[x.user_id].append(x)
    sequences = []
    for user_id, rows in by_user.items():
        rows.sort(key=lambda x: (x.timestamp, x.order))
        if len(rows) < 3:  # leave-one-out needs one train, one valid and one test item
            stats["users_dropped_too_short"] += 1
            stats["interactions_dropped_too_short"] += len(rows)
            continue
        sequences.append((user_id, [x.item_id for x in rows]))
    if not sequences:
        raise ValueError(f"no user has >= 3 interactions after {k}-core filtering; lower data.kcore")

    dense: dict[str, int] = {}
    for _, seq in sequences:
        for item_id in seq:
            dense.setdefault(item_id, len(dense) + 1)
    items = [Item(i, item_id, data.items[item_id].title, data.items[item_id].image) for item_id, i in dense.items()]
    users = []
    for u, (user_id, seq) in enumerate(sequences, 1):
        ids = [dense[x] for x in seq]
        users.append(UserSequence(u, user_id, ids[:-2], ids[-2], ids[-1]))

    n_inter = sum(len(s) for _, s in sequences)
    stats = {
        **stats,
        "users": len(users),
        "items": len(items),
        "interactions": n_inter,
        "sparsity": round(1 - n_inter / (len(users) * len(items)), 6),
        "avg_sequence_length": round(n_inter / len(users), 3),
        "items_with_image": sum(1 for i in items if i.image),  # readable images only
        "kcore": k,
        "image_check": data.image_check,
        "raw_interactions": raw_count,
        "raw_items": len(data.items),
        "items_unused": len(data.items) - len(items),
    }
    return PreparedDataset(items, users, stats)


# ---------------------------------------------------------------------------------------------
# The same rules, vectorised.

def kcore_rows(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Positions of the rows kcore() keeps, by the same rounds over integer codes."""
    rows = np.arange(len(users))
    while k > 1:
        u, i = users[rows], items[rows]
        keep = (np.bincount(u)[u] >= k) & (np.bincount(i)[i] >= k)
        if keep.all():
            break
        rows = rows[keep]
    return rows


def user_order(counts: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, int, int]:
    """From each user's number of interactions left by the k-core and the file position of the
    first of them: the users kept (>= 3 interactions) in order of that position, the number of
    users dropped as too short and the number of their interactions."""
    short = (counts > 0) & (counts < 3)
    kept = np.flatnonzero(counts >= 3)
    return kept[np.argsort(first[kept])], int(short.sum()), int(counts[short].sum())


class DenseIds:
    """Dense item ids 1..N by first appearance in a stream of raw item codes, fed in order."""

    def __init__(self, num_raw_items: int):
        self.dense = np.zeros(num_raw_items, dtype=np.int64)
        self.chunks: list[np.ndarray] = []  # raw codes of ids 1..N

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        new = codes[self.dense[codes] == 0]
        if len(new):
            distinct, first = np.unique(new, return_index=True)
            fresh = distinct[np.argsort(first)]
            n = sum(len(c) for c in self.chunks)
            self.dense[fresh] = np.arange(n + 1, n + 1 + len(fresh))
            self.chunks.append(fresh)
        return self.dense[codes]

    def raw_codes(self) -> list[int]:
        return np.concatenate(self.chunks).tolist() if self.chunks else []


def sequence_records(user_ids: list[str], lengths: np.ndarray, id_batches: Iterable[np.ndarray]) -> Iterator[dict]:
    """sequences.jsonl's records, users 1..U in order; their dense ids come concatenated in one
    stream, cut into batches anywhere."""
    ends = np.cumsum(lengths).tolist()
    buf: list[int] = []
    done = u = 0  # done: stream position of buf[0]; u: the next user
    for batch in id_batches:
        buf.extend(batch.tolist())
        start = 0
        while u < len(user_ids) and ends[u] - done <= len(buf):
            end = ends[u] - done
            seq = buf[start:end]
            yield {"user": u + 1, "user_id": user_ids[u], "train": seq[:-2], "valid": seq[-2], "test": seq[-1]}
            start, u = end, u + 1
        del buf[:start]
        done += start


def item_records(items: list[RawItem]) -> Iterator[dict]:
    """items.jsonl's records: `items` in dense id order."""
    for i, it in enumerate(items, 1):
        yield {"item": i, "item_id": it.item_id, "title": it.title, "image": it.image}


def write_stats(root: Path, stats: dict) -> None:
    (root / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _stats(warnings: Counter, image_check: str, k: int, raw_items: int, raw_interactions: int, kept: int,
           short_users: int, short_interactions: int, users: int, items: list[RawItem], interactions: int) -> dict:
    """stats.json, with prepare_python's keys in its order."""
    stats = Counter(warnings)
    for key in RAW_ITEM_COUNTS:
        stats[key] += 0
    stats["interactions_dropped_by_kcore"] = raw_interactions - kept
    if short_users:
        stats["users_dropped_too_short"] += short_users
        stats["interactions_dropped_too_short"] += short_interactions
    return {
        **stats,
        "users": users,
        "items": len(items),
        "interactions": interactions,
        "sparsity": round(1 - interactions / (users * len(items)), 6),
        "avg_sequence_length": round(interactions / users, 3),
        "items_with_image": sum(1 for i in items if i.image),
        "kcore": k,
        "image_check": image_check,
        "raw_interactions": raw_interactions,
        "raw_items": raw_items,
        "items_unused": raw_items - len(items),
    }


def _no_users(k: int) -> ValueError:
    return ValueError(f"no user has >= 3 interactions after {k}-core filtering; lower data.kcore")


@dataclass
class PreparedColumns:
    """prepare's result as arrays: the items in dense id order, the users in order with their
    sequence lengths, and all sequences' dense ids concatenated. Saved in PreparedDataset's format
    (the sequence store straight from these arrays)."""
    items: list[RawItem]
    user_ids: list[str]
    lengths: np.ndarray
    sequences: np.ndarray
    stats: dict

    def records(self) -> Iterator[dict]:
        step = 1 << 16
        return sequence_records(self.user_ids, self.lengths,
                                (self.sequences[i:i + step] for i in range(0, len(self.sequences), step)))

    def save(self, root: str | Path) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / "items.jsonl", item_records(self.items))
        write_jsonl(root / "sequences.jsonl", self.records())
        SequenceStore.from_sequences(self.user_ids, self.lengths, self.sequences).save(root)
        write_stats(root, self.stats)

    def to_dataset(self) -> PreparedDataset:
        items = [Item(i, it.item_id, it.title, it.image) for i, it in enumerate(self.items, 1)]
        return PreparedDataset(items, [UserSequence(**r) for r in self.records()], self.stats)


def prepare_columns(data: CanonicalColumns, k: int = 5) -> PreparedColumns:
    """prepare_python's result, vectorised over the columns of shards.canonical.read_columns."""
    if k < 1:
        raise ValueError(f"kcore must be >= 1, got {k}")
    x = data.interactions
    rows = kcore_rows(x.users, x.items, k)
    users = x.users[rows]
    counts = np.bincount(users, minlength=len(x.user_ids))
    first = np.full(len(x.user_ids), len(x), dtype=np.int64)
    np.minimum.at(first, users, rows)
    kept_users, short_users, short_interactions = user_order(counts, first)
    if not len(kept_users):
        raise _no_users(k)
    rank = np.full(len(x.user_ids), -1, dtype=np.int64)
    rank[kept_users] = np.arange(len(kept_users))
    user_rank = rank[users]
    long = user_rank >= 0
    rows, user_rank = rows[long], user_rank[long]
    rows = rows[np.lexsort((rows, x.timestamps[rows], user_rank))]  # by user, then time, then file order
    dense = DenseIds(len(data.items))
    sequences = dense(x.items[rows])
    raw_items = list(data.items.values())
    items = [raw_items[c] for c in dense.raw_codes()]
    stats = _stats(data.warnings, data.image_check, k, len(raw_items), len(x), int(counts.sum()), short_users,
                   short_interactions, len(kept_users), items, len(sequences))
    return PreparedColumns(items, [x.user_ids[c] for c in kept_users.tolist()], counts[kept_users], sequences, stats)


def prepare(data: CanonicalDataset | CanonicalColumns, k: int = 5) -> PreparedDataset:
    """The prepared dataset in memory, by the vectorised path."""
    if isinstance(data, CanonicalDataset):
        data = CanonicalColumns.from_dataset(data)
    return prepare_columns(data, k).to_dataset()


def prepare_dir(root: str | Path, out: str | Path, k: int = 5, validate_images: str = "header") -> dict:
    """Read the canonical dataset in `root`, write the prepared one to `out`; returns its stats."""
    ds = prepare_columns(read_columns(root, validate_images), k)
    ds.save(out)
    return ds.stats


# ---------------------------------------------------------------------------------------------
# The same result on a Ray cluster.

def prepare_ray(root: str | Path, out: str | Path, k: int = 5, validate_images: str = "header",
                address: str = "") -> dict:
    """prepare_dir(root, out, ...) with the per-interaction work on a Ray cluster: Ray Data reads
    the interactions file in blocks; Ray tasks check and encode each block (as read_columns does)
    and count users and items for each k-core round; Ray Data sorts the rows left by (user, time,
    file order); the driver streams the sorted item codes into sequences.jsonl and the sequence
    store (dense ids are assigned in that order). The driver holds per-user and per-item arrays
    (codes, counts), never the interactions. Every node reads the dataset folder's path (a shared filesystem). Connects
    to `address` ("auto" or host:port) unless Ray is initialised already."""
    import ray

    root, out = Path(root), Path(out)
    if k < 1:
        raise ValueError(f"kcore must be >= 1, got {k}")
    check_folder(root, validate_images)
    warnings: Counter = Counter()
    items = read_items(root / "items.jsonl", warnings, validate_images)
    path = interactions_path(root)
    if path.suffix == ".csv" and not (path.exists() and csv_reads_like_python(path)):
        return prepare_dir(root, out, k, validate_images)  # read by Python's csv module, as read_columns does
    started = not ray.is_initialized()
    if started:
        if not address:
            raise ValueError("prepare_ray needs a Ray cluster: data.ray_address (auto or host:port)")
        ray.init(address=address, configure_logging=False)
    try:
        blocks, user_ids, raw_count = _ray_encode(path, items)
        out.mkdir(parents=True, exist_ok=True)
        return _ray_prepare(blocks, user_ids, raw_count, items, warnings, validate_images, k, out)
    finally:
        if started:
            ray.shutdown()


def _ray_encode(path: Path, items: dict[str, RawItem]):
    """The interactions file as Ray object refs of encoded blocks (users, items, timestamps,
    order) in file order, the distinct user ids and the number of rows; a bad row raises the
    DatasetError that read_columns raises."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # blocks in file order
    if not path.exists():
        raise DatasetError(path, None, "missing interactions file")
    if path.suffix == ".parquet":
        check_parquet_schema(path)
    try:
        if path.suffix == ".parquet":
            raw = ray.data.read_parquet(str(path), columns=list(COLUMNS)).map_batches(
                string_columns, batch_format="pyarrow", batch_size=None)
        else:
            raw = ray.data.read_csv(str(path), convert_options=csv_options())
        blocks = raw.to_arrow_refs()
        sizes_and_users = ray.get([ray.remote(_size_and_users).remote(b) for b in blocks])
        raw_count = sum(n for n, _ in sizes_and_users)
        if not raw_count:
            raise DatasetError(path, None, "no interactions")
        user_ids = pc.unique(pa.chunked_array([u for _, u in sizes_and_users], pa.string()))
        starts = np.cumsum([0] + [n for n, _ in sizes_and_users])[:-1].tolist()
        item_ref, user_ref = ray.put(pa.array(list(items), pa.string())), ray.put(user_ids)
        encode = ray.remote(_encode_block)
        blocks = [encode.remote(b, start, item_ref, user_ref) for b, start in zip(blocks, starts)]
        ray.get([ray.remote(_num_rows).remote(b) for b in blocks])  # raises a block's BadRow here
    except DatasetError:
        raise
    except Exception as e:  # a parse error or a bad row: named as the local path names it
        if path.suffix == ".csv":
            check_csv(path, items)  # the Python reader's file:line error
        cause = getattr(e, "cause", e)
        if isinstance(cause, BadRow):
            raise DatasetError(path, None, f"row {cause.row + 1}: {cause}") from None
        raise
    return blocks, user_ids.to_pylist(), raw_count


def _num_rows(block) -> int:
    return len(block)


def _size_and_users(block):
    import pyarrow.compute as pc

    return len(block), pc.unique(block.column("user_id"))


def _encode_block(block, start: int, item_ids, user_ids):
    import pyarrow as pa

    try:
        encoded = encode_table(block, item_ids, user_ids)
    except BadRow as e:
        raise BadRow(start + e.row, str(e)) from None
    return pa.table({**encoded, "order": np.arange(start, start + len(block))})


def _block_counts(block, num_users: int, num_items: int):
    """Interactions per user and per item, and each user's first row."""
    users, items, order = (block.column(c).to_numpy() for c in ("users", "items", "order"))
    first = np.full(num_users, np.iinfo(np.int64).max)
    np.minimum.at(first, users, order)
    return np.bincount(users, minlength=num_users), np.bincount(items, minlength=num_items), first


def _block_keep(block, user_ok: np.ndarray, item_ok: np.ndarray):
    import pyarrow as pa

    return block.filter(pa.array(user_ok[block.column("users").to_numpy()] & item_ok[block.column("items").to_numpy()]))


def _block_rank(block, rank: np.ndarray):
    """The block with each row's user rank; rows of dropped users left out."""
    import pyarrow as pa

    r = rank[block.column("users").to_numpy()]
    return block.append_column("rank", pa.array(r)).filter(pa.array(r >= 0))


def _ray_prepare(blocks, user_ids: list[str], raw_count: int, items: dict[str, RawItem], warnings: Counter,
                 image_check: str, k: int, out: Path) -> dict:
    import ray
    import ray.data

    num_users, num_items = len(user_ids), len(items)
    count, keep, rank_of = (ray.remote(f) for f in (_block_counts, _block_keep, _block_rank))

    def counts(blocks):
        refs = [count.remote(b, num_users, num_items) for b in blocks]
        users, items_, first = ray.get(refs[0])
        for ref in refs[1:]:  # one block's arrays at a time
            u, i, f = ray.get(ref)
            users, items_, first = users + u, items_ + i, np.minimum(first, f)
        return users, items_, first

    users, item_counts, first = counts(blocks)
    while k > 1 and (((users > 0) & (users < k)).any() or ((item_counts > 0) & (item_counts < k)).any()):
        user_ok, item_ok = ray.put(users >= k), ray.put(item_counts >= k)  # the same rounds as kcore_rows
        blocks = [keep.remote(b, user_ok, item_ok) for b in blocks]
        users, item_counts, first = counts(blocks)
    kept_users, short_users, short_interactions = user_order(users, first)
    if not len(kept_users):
        raise _no_users(k)
    rank = np.full(num_users, -1, dtype=np.int64)
    rank[kept_users] = np.arange(len(kept_users))
    rank_ref = ray.put(rank)
    rows = ray.data.from_arrow_refs([rank_of.remote(b, rank_ref) for b in blocks])
    rows = rows.sort(["rank", "timestamps", "order"]).select_columns(["items"])
    dense = DenseIds(num_items)
    lengths = users[kept_users]
    id_batches = (dense(b["items"]) for b in rows.iter_batches(batch_format="numpy", batch_size=1 << 16))
    kept_ids = [user_ids[c] for c in kept_users.tolist()]
    store = StoreWriter(out, kept_ids, int(lengths.sum()) - 2 * len(kept_ids))  # the sequence store, as streamed
    write_jsonl(out / "sequences.jsonl", store.tee(sequence_records(kept_ids, lengths, id_batches)))
    store.close()
    raw_items = list(items.values())
    prepared = [raw_items[c] for c in dense.raw_codes()]
    write_jsonl(out / "items.jsonl", item_records(prepared))
    stats = _stats(warnings, image_check, k, num_items, raw_count, int(users.sum()), short_users,
                   short_interactions, len(kept_users), prepared, int(lengths.sum()))
    write_stats(out, stats)
    return stats


# Counted over all raw items (data.warnings), before any filtering.
RAW_ITEM_COUNTS = ("items_without_title", "items_without_image", "images_missing", "images_unreadable")


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def stats_table(stats: dict) -> str:
    """stats.json as text. Each section has one denominator, named in its title; a count that is
    a share of it is printed with its percentage."""
    g = lambda key: stats.get(key, 0)  # noqa: E731
    k, users_after_kcore = g("kcore"), g("users") + g("users_dropped_too_short")
    sections = [
        (f"Raw input: {_fmt(g('raw_items'))} items (items.jsonl)", g("raw_items"), [
            ("without title", g("items_without_title"), True),
            ("without usable image", g("items_without_image"), True),
            ("  image file missing", g("images_missing"), True),
            (f"  image unreadable ({stats.get('image_check', 'no')} check)", g("images_unreadable"), True),
            ("in no prepared sequence", g("items_unused"), True),
        ]),
        (f"Raw input: {_fmt(g('raw_interactions'))} interactions (interactions.csv)", g("raw_interactions"), [
            (f"dropped by {k}-core", g("interactions_dropped_by_kcore"), True),
            ("dropped with their user (< 3 left)", g("interactions_dropped_too_short"), True),
        ]),
        (f"After {k}-core: {_fmt(users_after_kcore)} users", users_after_kcore, [
            ("dropped (< 3 interactions)", g("users_dropped_too_short"), True),
        ]),
        (f"Prepared dataset: {_fmt(g('items'))} items", g("items"), [
            ("#Users", g("users"), False),
            ("#Items", g("items"), False),
            ("#Interactions", g("interactions"), False),
            ("Sparsity", f"{g('sparsity'):.4%}", False),
            ("Avg. length", g("avg_sequence_length"), False),
            ("Items with image", g("items_with_image"), True),
        ]),
    ]
    width = max(len(label) for _, _, rows in sections for label, _, _ in rows)
    lines = []
    for title, total, rows in sections:
        lines.append(title)
        for label, value, is_share in rows:
            pct = f"  {value / total:8.2%}" if is_share and total else ""
            lines.append(f"  {label:<{width}}  {_fmt(value):>12}{pct}")
    return "\n".join(lines)

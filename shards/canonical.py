"""Read and validate a dataset in the canonical format (docs/architecture.md):

  items.jsonl        {"item_id": str, "title": str, "image": "images/<file>" | absolute path | null}
  images/            one image per item (JPEG or PNG); an item may lack one
  interactions.csv   header user_id,item_id,timestamp (int seconds or ISO 8601)
  (or interactions.parquet: the same three columns; ids strings or integers, timestamp integer
   seconds or strings as in the CSV; row order is the file order)

Both text files are UTF-8 (a leading BOM is accepted). Unrecoverable problems raise DatasetError
naming the file and line; recoverable ones (an empty title, an item without a usable image) are
counted in `warnings` and reported in the stats. Image files are checked when read
(`validate_images`, see shards.images.check_image): an item whose image file is missing or
unreadable is kept, counted (`images_missing`, `images_unreadable`) and treated as having no
image by every later stage (its `image` is None).

Two readers of the interactions, one set of rules: `read_canonical` (plain Python, one object a
row) and `read_columns` (pyarrow's CSV/Parquet reader into numpy columns, for `prepare` at scale).
The columnar reader checks the same rules vectorised; when a check fails, or the file has
something pyarrow's CSV dialect reads differently from Python's csv module (a blank or unusual
header line, a bare carriage return), it hands the file to the Python reader, which names the
file and line of the problem (or reads the file it accepts), so both give the same result.
"""
from __future__ import annotations

import csv
import json
import logging
import mmap
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

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
    out = list(_iter_interactions(path, items))
    if not out:
        raise DatasetError(path, None, "no interactions")
    return out


def _iter_interactions(path: Path, items: dict[str, RawItem]) -> Iterator[Interaction]:
    if not path.exists():
        raise DatasetError(path, None, "missing interactions file")
    n = 0
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
                yield Interaction(user_id, item_id, ts, n)
                n += 1
        except csv.Error as e:
            raise DatasetError(path, reader.line_num, f"malformed CSV ({e})") from None


def check_folder(root: Path, validate_images: str) -> None:
    if validate_images not in IMAGE_CHECKS:
        raise ValueError(f"data.validate_images must be one of {', '.join(IMAGE_CHECKS)}, got {validate_images!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")


def interactions_path(root: str | Path) -> Path:
    """interactions.parquet when the folder has one, else interactions.csv (both: an error)."""
    root = Path(root)
    csv_path, parquet_path = root / "interactions.csv", root / "interactions.parquet"
    if parquet_path.exists() and csv_path.exists():
        raise DatasetError(root, None, "has both interactions.csv and interactions.parquet; keep one")
    return parquet_path if parquet_path.exists() else csv_path


def read_canonical(root: str | Path, validate_images: str = "header") -> CanonicalDataset:
    """`validate_images` (header | full | none) is how image files are checked; see shards.images."""
    root = Path(root)
    check_folder(root, validate_images)
    warnings: Counter = Counter()
    items = read_items(root / "items.jsonl", warnings, validate_images)
    path = interactions_path(root)
    interactions = (read_parquet(path, items).to_interactions(items) if path.suffix == ".parquet"
                    else read_interactions(path, items))
    return CanonicalDataset(items, interactions, warnings, validate_images)


# ---------------------------------------------------------------------------------------------
# The columnar reader (pyarrow + numpy): the same rules over whole columns.

@dataclass
class InteractionColumns:
    """The interactions as columns, rows in file order (a row's position is its tie-break).
    `users` and `items` are integer codes: into `user_ids`, and into the items in items.jsonl order."""
    user_ids: list[str]
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray  # float64 seconds

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_interactions(cls, interactions: list[Interaction], items: dict[str, RawItem]) -> "InteractionColumns":
        item_code = {item_id: i for i, item_id in enumerate(items)}
        user_code: dict[str, int] = {}
        users = [user_code.setdefault(x.user_id, len(user_code)) for x in interactions]
        return cls(list(user_code), np.array(users, dtype=np.int64),
                   np.array([item_code[x.item_id] for x in interactions], dtype=np.int64),
                   np.array([x.timestamp for x in interactions], dtype=np.float64))

    def to_interactions(self, items: dict[str, RawItem]) -> list[Interaction]:
        item_ids = list(items)
        return [Interaction(self.user_ids[u], item_ids[i], t, n) for n, (u, i, t) in
                enumerate(zip(self.users.tolist(), self.items.tolist(), self.timestamps.tolist()))]


@dataclass
class CanonicalColumns:
    """read_canonical's result with the interactions as columns (items are few: kept as objects)."""
    items: dict[str, RawItem]
    interactions: InteractionColumns
    warnings: Counter = field(default_factory=Counter)
    image_check: str = "header"

    @classmethod
    def from_dataset(cls, data: CanonicalDataset) -> "CanonicalColumns":
        return cls(data.items, InteractionColumns.from_interactions(data.interactions, data.items), data.warnings,
                   data.image_check)


def read_columns(root: str | Path, validate_images: str = "header") -> CanonicalColumns:
    """What read_canonical reads, with the same checks and errors, as columns."""
    root = Path(root)
    check_folder(root, validate_images)
    warnings: Counter = Counter()
    items = read_items(root / "items.jsonl", warnings, validate_images)
    path = interactions_path(root)
    interactions = read_parquet(path, items) if path.suffix == ".parquet" else read_csv_columns(path, items)
    return CanonicalColumns(items, interactions, warnings, validate_images)


class BadRow(ValueError):
    """The first data row (0-based, in file order) that breaks a rule, with read_interactions' message."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


def encode_table(table, item_ids, user_ids) -> dict[str, np.ndarray]:
    """Check and encode a pyarrow table of interactions (columns user_id, item_id: strings;
    timestamp: strings or integers): {"users", "items", "timestamps"}, codes into the pyarrow
    string arrays `user_ids` and `item_ids`. The first row that breaks a rule raises BadRow; at
    one row the item is checked first, then the user, then the time, as read_interactions does."""
    import pyarrow.compute as pc

    user, item, timestamp = (table.column(c) for c in COLUMNS)
    item_codes = pc.index_in(item, value_set=item_ids)
    timestamps, bad_time = _timestamps(timestamp)
    bad = [_first(pc.is_null(item_codes)), _first(pc.equal(user, "")), bad_time]
    if any(b is not None for b in bad):
        row = min(b for b in bad if b is not None)
        kind = bad.index(row)
        raise BadRow(row, f"unknown item_id {item[row].as_py()!r} (not in items.jsonl)" if kind == 0 else
                     "empty user_id" if kind == 1 else _timestamp_error(timestamp[row].as_py()))
    return {"users": _numpy(pc.index_in(user, value_set=user_ids)), "items": _numpy(item_codes),
            "timestamps": timestamps}


def _numpy(column) -> np.ndarray:
    return column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(column)


def _first(mask) -> int | None:
    import pyarrow.compute as pc

    i = pc.index(mask, True).as_py()
    return None if i < 0 else i


def _timestamp_error(raw) -> str:
    try:
        parse_timestamp(str(raw))
    except ValueError as e:
        return str(e)
    raise AssertionError(f"timestamp {raw!r} parses")


def _timestamps(column) -> tuple[np.ndarray, int | None]:
    """Seconds as float64 by parse_timestamp's rules, and the first row that has none (or None).
    Plain decimal integers are cast in one go; anything else is parsed once per distinct value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):  # Parquet (without nulls: see string_columns)
        return _numpy(column).astype(np.float64), None
    if pc.all(pc.match_substring_regex(column, r"^-?[0-9]{1,18}$")).as_py():  # (pyarrow's cast also takes 0x..)
        return _numpy(pc.cast(column, pa.int64())).astype(np.float64), None
    distinct = pc.unique(column)
    seconds = np.array([_seconds_or_nan(v) for v in distinct.to_pylist()], dtype=np.float64)
    values = seconds[_numpy(pc.index_in(column, value_set=distinct))]
    bad = np.flatnonzero(np.isnan(values))
    return values, int(bad[0]) if len(bad) else None


def _seconds_or_nan(raw: str) -> float:
    try:
        return parse_timestamp(raw)
    except ValueError:
        return float("nan")


def csv_reads_like_python(path: Path) -> bool:
    """True when pyarrow's CSV parser reads the file as the csv module does in read_interactions:
    line 1 is a UTF-8 header naming every column of COLUMNS, none twice, and every carriage
    return is part of a \\r\\n line end. (pyarrow would skip a blank line 1 and break lines at a
    bare \\r, where read_interactions stops with an error.)"""
    with open(path, "rb") as f:
        try:
            header = next(csv.reader([f.readline().decode("utf-8-sig")]), [])
        except (UnicodeDecodeError, csv.Error):
            return False
        if len(set(header)) != len(header) or not set(COLUMNS) <= set(header):
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b"\r") < 0:
                return True
            step = 1 << 26
            return all(mm[i:i + step].count(b"\r") == mm[i:i + step + 1].count(b"\r\n")
                       for i in range(0, len(mm), step))


def csv_options():
    import pyarrow as pa
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(column_types=dict.fromkeys(COLUMNS, pa.string()), include_columns=list(COLUMNS))


def read_csv_columns(path: Path, items: dict[str, RawItem]) -> InteractionColumns:
    """interactions.csv through pyarrow. On anything the fast path does not accept, the Python
    reader names the file and line of the problem (check_csv keeps no rows), or reads the file if
    it accepts it."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if path.exists() and csv_reads_like_python(path):
        try:
            table = pacsv.read_csv(path, convert_options=csv_options())
            if len(table):
                return _columns(table, items)
        except (pa.ArrowException, BadRow):
            check_csv(path, items)
    return InteractionColumns.from_interactions(read_interactions(path, items), items)


def check_csv(path: Path, items: dict[str, RawItem]) -> None:
    """read_interactions' checks without keeping the rows: raises its DatasetError, if any."""
    for _ in _iter_interactions(path, items):
        pass


def _columns(table, items: dict[str, RawItem]) -> InteractionColumns:
    import pyarrow as pa
    import pyarrow.compute as pc

    user_ids = pc.unique(table.column("user_id"))
    return InteractionColumns(user_ids.to_pylist(), **encode_table(table, pa.array(list(items), pa.string()), user_ids))


def check_parquet_schema(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(path, None, f"unreadable Parquet file ({e})") from None
    missing = set(COLUMNS) - set(names)
    if missing:
        raise DatasetError(path, None, f"missing column(s) {sorted(missing)}; needs {','.join(COLUMNS)}")


def string_columns(table):
    """A Parquet table's three columns as encode_table takes them: ids as strings (integers
    converted), timestamps as strings or integers, nulls as empty strings (which fail the checks)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.select(list(COLUMNS))
    columns = [c if name == "timestamp" and pa.types.is_integer(c.type) and not c.null_count
               else pc.cast(c, pa.string()).fill_null("") for name, c in zip(COLUMNS, table.columns)]
    return pa.table(dict(zip(COLUMNS, columns)))


def read_parquet(path: Path, items: dict[str, RawItem]) -> InteractionColumns:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DatasetError(path, None, "missing interactions file")
    check_parquet_schema(path)
    try:
        table = string_columns(pq.read_table(path, columns=list(COLUMNS)))
    except pa.ArrowException as e:
        raise DatasetError(path, None, f"columns must hold strings or integers ({e})") from None
    if not len(table):
        raise DatasetError(path, None, "no interactions")
    try:
        return _columns(table, items)
    except BadRow as e:
        raise DatasetError(path, None, f"row {e.row + 1}: {e}") from None


def write_canonical(root: str | Path, items: list[dict], interactions: list[tuple], parquet: bool = False) -> None:
    """Write items (dicts with item_id, title, image) and (user_id, item_id, timestamp) rows, to
    interactions.csv or (parquet=True, integer timestamps) interactions.parquet."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        users, item_ids, timestamps = zip(*interactions) if interactions else ((), (), ())
        pq.write_table(pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(item_ids, pa.string()),
                                 "timestamp": pa.array(timestamps, pa.int64())}), root / "interactions.parquet")
        return
    with open(root / "interactions.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(interactions)

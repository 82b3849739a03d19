"""Converters from the real datasets' own formats to the canonical format (written at run time;
the source files are never modified or copied into the repository)."""
from __future__ import annotations

import csv
from pathlib import Path

from shards.canonical import write_canonical


def convert_ninerec(source: str | Path, out: str | Path, title_field: str = "english") -> None:
    """NineRec Bili_* subset: `sequential_data.txt` (user item item ..., chronological, no
    timestamps: the position is the timestamp) and `Bili_<X>_item.csv` (id, chinese, english)."""
    source = Path(source)
    if title_field not in ("english", "chinese"):
        raise ValueError(f"title_field must be english or chinese, got {title_field!r}")
    item_files = sorted(source.glob("*_item.csv"))
    seq_file = source / "sequential_data.txt"
    if not item_files or not seq_file.exists():
        raise FileNotFoundError(f"{source} is not a NineRec subset (needs sequential_data.txt and *_item.csv)")
    items = []
    with open(item_files[0], encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if len(row) != 3:
                raise ValueError(f"{item_files[0]}:{line_no}: expected 3 columns (id, chinese, english), got {len(row)}")
            items.append({"item_id": row[0], "title": row[2] if title_field == "english" else row[1], "image": None})
    rows = []
    with open(seq_file, encoding="utf-8") as f:
        for line in f:
            user, *seq = line.split()
            rows.extend((user, item, t) for t, item in enumerate(seq))
    write_canonical(out, items, rows)


def recbole_ml100k_dir() -> Path:
    import recbole

    path = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise FileNotFoundError(f"MovieLens-100K not found in the recbole package at {path}")
    return path


def _read_atomic(path: Path):
    """RecBole atomic file: TSV whose header names are `field:type`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        for line in f:
            yield dict(zip(header, line.rstrip("\n").split("\t")))


def convert_ml100k(posters: str | Path | None, out: str | Path) -> None:
    """MovieLens-100K from recbole's bundled atomic files; posters from
    `<posters>/item_posters.csv` (item_id,poster). Titles are "<title> (<year>)"."""
    ml = recbole_ml100k_dir()
    poster_of = {}
    if posters:
        posters = Path(posters)
        with open(posters / "item_posters.csv", encoding="utf-8", newline="") as f:
            poster_of = {r["item_id"]: str((posters / r["poster"]).resolve()) for r in csv.DictReader(f)}
    items = []
    for r in _read_atomic(ml / "ml-100k.item"):
        year = r.get("release_year", "").strip()
        title = r["movie_title"].strip() + (f" ({year})" if year else "")
        items.append({"item_id": r["item_id"], "title": title, "image": poster_of.get(r["item_id"])})
    rows = [(r["user_id"], r["item_id"], int(float(r["timestamp"]))) for r in _read_atomic(ml / "ml-100k.inter")]
    write_canonical(out, items, rows)

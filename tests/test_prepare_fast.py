"""The vectorised prepare (pyarrow + numpy) and its Ray version give exactly what the Python
prepare gives: the same files (the three JSON files and the sequence store), byte for byte, and
the same file:line errors."""
import json
import random

import pytest
from PIL import Image

from shards.canonical import DatasetError, read_canonical, read_columns, write_canonical
from shards.config import SynthConfig
from shards.prepare import kcore, kcore_rows, prepare, prepare_dir, prepare_python, prepare_ray
from shards.prepared import STORE_FILES
from shards.synth import synthesize
from tests.helpers import SHARED_DATA

FILES = ("items.jsonl", "sequences.jsonl", "stats.json", *STORE_FILES.values())


def python_files(root, out, k):
    prepare_python(read_canonical(root), k).save(out)
    return {name: (out / name).read_bytes() for name in FILES}


def fast_files(root, out, k):
    prepare_dir(root, out, k)
    return {name: (out / name).read_bytes() for name in FILES}


def assert_same(root, tmp_path, k):
    old = python_files(root, tmp_path / f"old{k}", k)
    assert fast_files(root, tmp_path / f"new{k}", k) == old
    return old


def write(root, items, lines: str):
    """A dataset from item ids (or item dicts) and the raw text of interactions.csv."""
    root.mkdir(parents=True, exist_ok=True)
    items = [it if isinstance(it, dict) else {"item_id": it, "title": f"T {it}", "image": None} for it in items]
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "interactions.csv").write_bytes(lines.encode() if isinstance(lines, str) else lines)
    return root


def test_tiny_synth_same_files(tmp_path):
    synthesize(SynthConfig(seed=3, num_users=70, num_items=40, num_topics=4, image_size=8, min_seq_len=3,
                           max_seq_len=9), tmp_path / "synth")
    for k in (1, 2, 3, 5):
        assert_same(tmp_path / "synth", tmp_path, k)


def test_ties_cascades_and_first_kept_row(tmp_path):
    # At k=2, u0's first row (item z, seen once) goes, so u1 (whose first kept row is earlier) comes
    # first; dropping q leaves u9 one row, which goes in round 2 (a cascade); ties at t=5 and t=7 keep
    # the file order; an ISO timestamp; columns in another order, one extra; an unused item.
    lines = ("extra,item_id,timestamp,user_id\n"
             "x,z,1,u0\n" "x,b,5,u1\n" "x,a,5,u1\n" "x,c,5,u1\n" "x,a,9,u0\n" "x,b,3,u0\n" "x,c,3,u0\n"
             "x,q,2,u9\n" "x,a,2024-01-01T00:00:00Z,u9\n"
             "x,c,1,u2\n" "x,a,1,u2\n" "x,b,0,u2\n" "x,a,7,u3\n" "x,b,7,u3\n")
    root = write(tmp_path / "d", ["a", "b", "c", "q", "z", "unused"], lines)
    files = {k: assert_same(root, tmp_path, k) for k in (1, 2, 3)}
    users = [json.loads(x)["user_id"] for x in files[2]["sequences.jsonl"].decode().splitlines()]
    assert users == ["u1", "u0", "u2"]  # u3 (two rows) is too short
    stats = json.loads(files[2]["stats.json"])
    assert stats["interactions_dropped_by_kcore"] == 3 and stats["users_dropped_too_short"] == 1  # u3
    assert list(stats) == list(json.loads(python_files(root, tmp_path / "again", 2)["stats.json"]))


@pytest.mark.parametrize("seed", range(6))
def test_random_datasets_with_many_ties(tmp_path, seed):
    rng = random.Random(seed)
    items = [f"i{n}" for n in range(rng.randint(3, 25))]
    rows = [(f"u{rng.randint(0, 30)}", rng.choice(items), rng.randint(0, 6)) for _ in range(rng.randint(20, 300))]
    root = write(tmp_path / "d", items, "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    for k in (1, 2, 3, 4):
        try:
            old = python_files(root, tmp_path / f"old{k}", k)
        except ValueError as e:  # nobody left: both paths say so
            with pytest.raises(ValueError, match=str(e)):
                fast_files(root, tmp_path / f"new{k}", k)
            continue
        assert fast_files(root, tmp_path / f"new{k}", k) == old


def test_in_memory_prepare_and_kcore_rows_match_python(tmp_path):
    synthesize(SynthConfig(seed=1, num_users=40, num_items=30, num_topics=3, image_size=8), tmp_path / "s")
    data = read_canonical(tmp_path / "s")
    new, old = prepare(data, 3), prepare_python(data, 3)
    assert new.items == old.items and new.users == old.users and new.stats == old.stats
    cols = read_columns(tmp_path / "s").interactions
    for k in (2, 4, 9):
        assert kcore_rows(cols.users, cols.items, k).tolist() == [x.order for x in kcore(data.interactions, k)]


def test_parquet_input_gives_the_csv_result(tmp_path):
    rows = [(f"u{u}", f"i{(u * 7 + t) % 11}", 100 + t // 2) for u in range(15) for t in range(u % 6 + 2)]
    items = [{"item_id": f"i{n}", "title": f"T{n}", "image": None} for n in range(11)]
    write_canonical(tmp_path / "csv", items, rows)
    write_canonical(tmp_path / "pq", items, rows, parquet=True)
    assert not (tmp_path / "pq" / "interactions.csv").exists()
    csv_files = fast_files(tmp_path / "csv", tmp_path / "a", 2)
    assert fast_files(tmp_path / "pq", tmp_path / "b", 2) == csv_files
    assert python_files(tmp_path / "pq", tmp_path / "c", 2) == csv_files  # read_canonical reads Parquet too


def test_parquet_errors_name_the_row(tmp_path):
    items = [{"item_id": "a", "title": "A", "image": None}]
    write_canonical(tmp_path / "d", items, [("u", "a", 1), ("u", "zz", 2)], parquet=True)
    with pytest.raises(DatasetError, match=r"interactions.parquet: row 2: unknown item_id 'zz'"):
        read_columns(tmp_path / "d")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [1, 2], "item_id": ["a", "a"], "timestamp": pa.array([5, None], pa.int64())}),
                   tmp_path / "d" / "interactions.parquet")  # integer ids are read as strings
    with pytest.raises(DatasetError, match=r"row 2: timestamp '' is neither integer seconds nor ISO 8601"):
        read_columns(tmp_path / "d")
    write_canonical(tmp_path / "d", items, [("u", "a", 1)])
    with pytest.raises(DatasetError, match="both interactions.csv and interactions.parquet"):
        read_columns(tmp_path / "d")


BAD_CSV = {
    "unknown_item": ("user_id,item_id,timestamp\nu,a,1\n\nu,zz,2\n", "interactions.csv:4: unknown item_id 'zz'"),
    "empty_user": ("user_id,item_id,timestamp\nu,a,1\n,a,2\n", "interactions.csv:3: empty user_id"),
    "bad_timestamp": ("user_id,item_id,timestamp\nu,a,1\nu,a,soon\n",
                      "interactions.csv:3: timestamp 'soon' is neither integer seconds nor ISO 8601"),
    "hex_timestamp": ("user_id,item_id,timestamp\nu,a,0x10\n", "interactions.csv:2: timestamp '0x10' is neither"),
    "field_count": ("user_id,item_id,timestamp\nu,a,1\nu,a\n", "interactions.csv:3: 2 fields, but the header has 3"),
    "missing_column": ("user_id,item_id\nu,a\n", "interactions.csv:1: missing column(s) ['timestamp']"),
    "blank_first_line": ("\nuser_id,item_id,timestamp\nu,a,1\n", "interactions.csv:1: missing column(s)"),
    "bare_cr": ("user_id,item_id,timestamp\nu,a,1\ru,a,2\n", "interactions.csv:2: malformed CSV"),
    "not_utf8": (b"user_id,item_id,timestamp\nu,a\xff,1\n", "interactions.csv:2: not valid UTF-8 (byte 0xff)"),
    "empty": ("user_id,item_id,timestamp\n", "interactions.csv: no interactions"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_csv_errors_are_the_python_readers(tmp_path, case):
    text, message = BAD_CSV[case]
    root = write(tmp_path / "d", ["a"], text)
    with pytest.raises(DatasetError) as python_error:
        read_canonical(root)
    with pytest.raises(DatasetError) as fast_error:
        read_columns(root)
    assert message in str(python_error.value) and str(fast_error.value) == str(python_error.value)


def test_what_pyarrow_reads_differently_goes_through_python(tmp_path):
    # a BOM, CRLF line ends, a quoted field, ISO and padded timestamps, a duplicate header column
    for name, text in {"bom_crlf": "\ufeffuser_id,item_id,timestamp\r\nu,a,1\r\nu,\"b\",2\r\nu,a, 3\r\n",
                       "dup_column": "user_id,item_id,timestamp,user_id\nu,a,1,x\nu,b,2024-05-01T10:00:00,y\n"
                                     "u,a,+3,z\n"}.items():
        root = write(tmp_path / name, ["a", "b"], text)
        assert fast_files(root, tmp_path / f"{name}_new", 1) == python_files(root, tmp_path / f"{name}_old", 1)


def test_images_and_warnings_counted_alike(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(tmp_path / "d" / "images" / "a.jpg")
    (tmp_path / "d" / "images" / "b.jpg").write_bytes(b"not an image")
    items = [{"item_id": "a", "title": "", "image": "images/a.jpg"},
             {"item_id": "b", "title": "B", "image": "images/b.jpg"},
             {"item_id": "c", "title": "C", "image": "images/gone.jpg"}, {"item_id": "d", "title": "D", "image": None}]
    root = write(tmp_path / "d", items, "user_id,item_id,timestamp\n" + "".join(
        f"u{u},{i},{t}\n" for u in range(3) for t, i in enumerate("abcd")))
    files = assert_same(root, tmp_path, 1)
    stats = json.loads(files["stats.json"])
    assert (stats["images_unreadable"], stats["images_missing"], stats["items_with_image"]) == (1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ninerec_food", "ml100k"])
def test_real_datasets_same_files(tmp_path, name):
    from shards import sources

    if name == "ninerec_food":
        source = SHARED_DATA / "ninerec" / "Bili_Food"
        if not source.is_dir():
            pytest.skip(f"{source} is absent")
        sources.convert_ninerec(source, tmp_path / "raw")
    else:
        posters = SHARED_DATA / "movielens-100k-posters"
        if not posters.is_dir():
            pytest.skip(f"{posters} is absent")
        pytest.importorskip("recbole")
        sources.convert_ml100k(posters, tmp_path / "raw")
    files = assert_same(tmp_path / "raw", tmp_path, 5)
    assert json.loads(files["stats.json"])["users"] > 900


@pytest.mark.slow
def test_ray_path_gives_the_local_files(ray_session, tmp_path):
    cfg = SynthConfig(seed=4, num_users=120, num_items=60, num_topics=4, images=False, min_seq_len=2, max_seq_len=7)
    synthesize(cfg, tmp_path / "csv")
    synthesize(SynthConfig(**{**vars(cfg), "parquet": True}), tmp_path / "pq")
    local = fast_files(tmp_path / "csv", tmp_path / "local", 2)
    assert json.loads(local["stats.json"])["users_dropped_too_short"] > 0  # the k-core and the drop both bite
    for source in ("csv", "pq"):
        prepare_ray(tmp_path / source, tmp_path / f"ray_{source}", 2)
        assert {name: (tmp_path / f"ray_{source}" / name).read_bytes() for name in FILES} == local
    # a bad line is named as the local path names it
    (tmp_path / "csv" / "interactions.csv").write_text(
        (tmp_path / "csv" / "interactions.csv").read_text() + "u1,nope,5\n")
    n = len((tmp_path / "csv" / "interactions.csv").read_text().splitlines())
    with pytest.raises(DatasetError, match=rf"interactions.csv:{n}: unknown item_id 'nope'"):
        prepare_ray(tmp_path / "csv", tmp_path / "bad", 2)

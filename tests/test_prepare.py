import json

import pytest
from PIL import Image

from shards.canonical import DatasetError, read_canonical, write_canonical
from shards.prepare import kcore, prepare
from shards.prepared import PreparedDataset


def make_dataset(root, interactions, items=None, header="user_id,item_id,timestamp"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    items = items if items is not None else [{"item_id": x, "title": f"title {x}", "image": f"images/{x}.jpg"} for x in "abcde"]
    for it in items:
        if it.get("image"):
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / it["image"])
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "interactions.csv").write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in interactions))
    return root


def test_exact_split_with_time_order_ties_and_iso_timestamps(tmp_path):
    rows = [
        ("u1", "c", 30), ("u1", "a", 10), ("u1", "b", 20), ("u1", "d", 40),  # out of order in the file
        ("u2", "b", 5), ("u2", "a", 5), ("u2", "e", 7),  # tie at 5: file order (b then a) is kept
        ("u3", "a", "2024-01-01T00:00:00"), ("u3", "c", "2024-01-02T00:00:00Z"), ("u3", "b", "2024-01-01T12:00:00"),
        ("u4", "a", 1), ("u4", "b", 2),  # too short for leave-one-out: dropped and counted
    ]
    ds = prepare(read_canonical(make_dataset(tmp_path / "d", rows)), k=1)
    # items numbered by first appearance over users in file order: u1 a b c d, u2 e
    assert [i.item_id for i in ds.items[1:]] == ["a", "b", "c", "d", "e"]
    got = {u.user_id: (u.train, u.valid, u.test) for u in ds.users}
    assert got == {"u1": ([1, 2], 3, 4), "u2": ([2], 1, 5), "u3": ([1], 2, 3)}
    assert ds.stats["users_dropped_too_short"] == 1 and ds.stats["interactions_dropped_too_short"] == 2
    assert ds.stats["users"] == 3 and ds.stats["items"] == 5 and ds.stats["interactions"] == 10
    assert ds.stats["sparsity"] == pytest.approx(1 - 10 / 15, abs=1e-6)
    u1 = ds.users[0]
    assert (u1.history("train"), u1.target("train")) == ([1], 2)
    assert (u1.history("valid"), u1.target("valid")) == ([1, 2], 3)
    assert (u1.history("test"), u1.target("test")) == ([1, 2, 3], 4)


def test_kcore_is_iterative(tmp_path):
    # c has one interaction: dropping it leaves u3 with one, so u3 goes too (a cascade);
    # a single pass would keep u3's interaction with a.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2), ("u3", "c", 1), ("u3", "a", 2)]
    data = read_canonical(make_dataset(tmp_path / "d", rows))
    kept = kcore(data.interactions, 2)
    assert [(x.user_id, x.item_id) for x in kept] == [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]
    assert kcore(data.interactions, 3) == []
    assert kcore(data.interactions, 1) == data.interactions


def test_prepared_round_trip(tmp_path):
    rows = [("u1", x, t) for t, x in enumerate("abcd")]
    ds = prepare(read_canonical(make_dataset(tmp_path / "d", rows)), k=1)
    ds.save(tmp_path / "p")
    back = PreparedDataset.load(tmp_path / "p")
    assert back.users == ds.users and back.items == ds.items and back.num_items == 4


def test_recoverable_problems_are_counted_not_dropped(tmp_path):
    items = [{"item_id": "a", "title": "", "image": "images/a.jpg"},
             {"item_id": "b", "title": "B", "image": None},
             {"item_id": "c", "title": "C", "image": "images/missing.jpg"}]
    root = tmp_path / "d"
    root.mkdir()
    (root / "images").mkdir()
    Image.new("RGB", (4, 4)).save(root / "images" / "a.jpg")
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,c,3\n")
    ds = prepare(read_canonical(root), k=1)
    assert ds.stats["items_without_title"] == 1 and ds.stats["items_without_image"] == 2
    assert ds.num_items == 3 and ds.items[3].image is None and ds.items[1].image.endswith("a.jpg")


@pytest.mark.parametrize("case, message", [
    ("missing_column", "interactions.csv:1: missing column(s) ['timestamp']"),
    ("unknown_item", "interactions.csv:3: unknown item_id 'zz'"),
    ("bad_timestamp", "interactions.csv:2: timestamp 'yesterday' is neither integer seconds nor ISO 8601"),
    ("bad_json", "items.jsonl:2: invalid JSON"),
    ("duplicate_item", "items.jsonl:2: duplicate item_id 'a'"),
])
def test_bad_input_names_file_and_line(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "missing_column":
        make_dataset(root, [("u", "a")], header="user_id,item_id")
    elif case == "unknown_item":
        make_dataset(root, [("u", "a", 1), ("u", "zz", 2)])
    elif case == "bad_timestamp":
        make_dataset(root, [("u", "a", "yesterday")])
    else:
        make_dataset(root, [("u", "a", 1)])
        second = "{not json" if case == "bad_json" else json.dumps({"item_id": "a", "title": "again"})
        (root / "items.jsonl").write_text(json.dumps({"item_id": "a", "title": "A"}) + "\n" + second + "\n")
    with pytest.raises(DatasetError) as err:
        read_canonical(root)
    assert message in str(err.value)


def test_write_canonical_round_trip(tmp_path):
    write_canonical(tmp_path, [{"item_id": "x", "title": "X", "image": None}], [("u", "x", 5)])
    data = read_canonical(tmp_path)
    assert data.items["x"].title == "X" and data.interactions[0].timestamp == 5.0

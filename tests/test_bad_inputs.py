"""Bad input files (issue #16, reliability): broken images are counted, never fatal; broken text
files fail with one line naming the file and line."""
import io
import json
import logging
import random
import re
import struct
import warnings

import pytest
import webdataset as wds
from PIL import Image

from launcher.cli import main
from shards.canonical import DatasetError, read_canonical
from shards.config import ShardConfig
from shards.images import check_image
from shards.prepare import prepare, stats_table
from shards.prepared import Item, PreparedDataset, UserSequence
from shards.reader import stream
from shards.writer import item_key, write_shards


def image_bytes(size=(8, 8), noise=False, fmt="JPEG") -> bytes:
    img = Image.new("RGB", size, (200, 10, 10))
    if noise:  # incompressible pixels, so most of the file is pixel data
        rng = random.Random(0)
        img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def bomb_jpeg() -> bytes:
    """A tiny JPEG whose frame header claims 15000x15000 pixels (over twice PIL's bomb limit)."""
    data = bytearray(image_bytes())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = (15000).to_bytes(2, "big") * 2
    with pytest.raises(Image.DecompressionBombError, match="225000000 pixels"):
        Image.open(io.BytesIO(bytes(data)))
    return bytes(data)


BAD_IMAGES = {
    "truncated": image_bytes((96, 96), noise=True)[:4000],  # cut in the scan data: the header parses
    "text": b"this is a text file named .jpg\n",
    "empty": b"",
    "bomb": bomb_jpeg(),
    "png_cut": image_bytes((32, 32), noise=True, fmt="PNG")[:1500],
}


def image_dataset(root):
    """Items: two good images, five unreadable ones (BAD_IMAGES), one missing file, one with none."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "good.jpg").write_bytes(image_bytes())
    Image.new("L", (6, 6), 100).save(root / "images" / "good.png")
    for name, data in BAD_IMAGES.items():
        (root / "images" / f"{name}.jpg").write_bytes(data)
    files = ["good.jpg", "good.png", *(f"{n}.jpg" for n in BAD_IMAGES), "missing.jpg"]
    items = [{"item_id": f"i{n}", "title": f"title {n}", "image": f"images/{f}"} for n, f in enumerate(files)]
    items.append({"item_id": "noimg", "title": "no image", "image": None})
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    rows = [f"u{u},{it['item_id']},{t}" for u in range(3) for t, it in enumerate(items)]
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("how", ["header", "full"])
def test_unreadable_images_are_counted_in_stats_not_as_items_with_image(tmp_path, how, caplog):
    root = image_dataset(tmp_path / "d")
    with caplog.at_level(logging.WARNING):
        ds = prepare(read_canonical(root, validate_images=how), k=1)
    s = ds.stats
    assert s["raw_items"] == 9 and s["items"] == 9
    assert s["images_unreadable"] == 5 and s["images_missing"] == 1
    assert s["items_without_image"] == 7 and s["items_with_image"] == 2 and s["image_check"] == how
    with_image = sorted(i.item_id for i in ds.items[1:] if i.image)
    assert with_image == ["i0", "i1"]  # unreadable images are treated as no image downstream
    for n, name in enumerate(BAD_IMAGES, 2):  # one log line per item: id, path and reason
        assert any(f"'i{n}'" in r.message and f"{name}.jpg" in r.message and "unreadable (" in r.message
                   for r in caplog.records), name
    assert "DecompressionBombError" in caplog.text
    json.loads(json.dumps(s))  # stats.json-serialisable


def test_validate_images_none_skips_the_check_and_shard_still_copes(tmp_path):
    root = image_dataset(tmp_path / "d")
    ds = prepare(read_canonical(root, validate_images="none"), k=1)
    assert ds.stats["images_unreadable"] == 0 and ds.stats["items_with_image"] == 7
    metrics = write_shards(ds, tmp_path / "shards", ShardConfig())
    assert metrics["unreadable_images"] == 5
    with pytest.raises(ValueError, match="validate_images must be one of header, full, none"):
        read_canonical(root, validate_images="fast")


def test_check_image_modes(tmp_path):
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(image_bytes((96, 96), noise=True))
    cut.write_bytes(BAD_IMAGES["truncated"])
    assert check_image(good) is None and check_image(good, "full") is None
    assert "truncated" in check_image(cut) and check_image(cut, "none") is None


def test_stats_table_has_one_denominator_per_section(tmp_path):
    ds = prepare(read_canonical(image_dataset(tmp_path / "d")), k=1)
    table = stats_table(ds.stats)
    sections = [line for line in table.splitlines() if not line.startswith(" ")]
    assert sections == ["Raw input: 9 items (items.jsonl)", "Raw input: 27 interactions (interactions.csv)",
                        "After 1-core: 3 users", "Prepared dataset: 9 items"]
    rows = dict(re.fullmatch(r"\s+(.+?)\s{2,}(\S+(?:\s+\S+%)?)", line).groups()
                for line in table.splitlines() if line.startswith(" "))
    assert rows["image unreadable (header check)"].split() == ["5", "55.56%"]
    assert rows["without usable image"].split() == ["7", "77.78%"]
    assert rows["Items with image"].split() == ["2", "22.22%"]  # of the prepared items, not the raw ones
    assert rows["#Items"] == "9" and rows["Sparsity"] == "0.0000%"


def test_decompression_bomb_does_not_stop_shard(tmp_path, caplog):
    bomb, good = tmp_path / "bomb.jpg", tmp_path / "good.jpg"
    bomb.write_bytes(bomb_jpeg())
    good.write_bytes(image_bytes())
    ds = PreparedDataset([Item(1, "big", "Big", str(bomb)), Item(2, "ok", "Ok", str(good))],
                         [UserSequence(1, "u", [1], 2, 1)])
    with caplog.at_level(logging.WARNING):
        metrics = write_shards(ds, tmp_path / "shards", ShardConfig())
    assert metrics["unreadable_images"] == 1
    assert any("item big" in r.message and str(bomb) in r.message and "DecompressionBombError" in r.message
               for r in caplog.records)
    samples = {s["item"]: s for s in stream(tmp_path / "shards", "items")}
    assert samples[1]["image"] is None and samples[2]["image"].mode == "RGB"


@pytest.mark.parametrize("error", [SyntaxError("broken PNG file"), struct.error("unpack requires a buffer"),
                                   EOFError(), Image.DecompressionBombWarning("too many pixels")],
                         ids=lambda e: type(e).__name__)
def test_every_pil_error_class_is_counted_by_shard(tmp_path, monkeypatch, error):
    good = tmp_path / "good.jpg"
    good.write_bytes(image_bytes())
    ds = PreparedDataset([Item(1, "a", "A", str(good))], [UserSequence(1, "u", [1], 1, 1)])

    def broken_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", broken_open)
    assert write_shards(ds, tmp_path / "shards", ShardConfig())["unreadable_images"] == 1


def test_png_checksum_error_is_unreadable_in_header_check(tmp_path):
    data = bytearray(image_bytes((16, 16), noise=True, fmt="PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # one flipped byte: the chunk's CRC no longer matches
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(data))
    assert check_image(path).startswith("SyntaxError: broken PNG file")


def test_reader_catches_bomb_warning_raised_as_error(tmp_path, monkeypatch, caplog):
    shard = tmp_path / "items-00000.tar"
    with wds.TarWriter(str(shard)) as tar:
        for item, jpg in ((1, image_bytes()), (2, bomb_jpeg())):
            tar.write({"__key__": item_key(item), "txt": f"t{item}",
                       "json": {"item": item, "item_id": f"id{item}", "has_image": True}, "jpg": jpg})
    (tmp_path / "index.json").write_text(json.dumps({"items": {"shards": [shard.name], "counts": [2], "total": 2}}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 8x8 = 64 pixels: over the limit, under twice it
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        got = {s["item"]: s for s in stream(tmp_path, "items", split=False)}
    assert got[1]["image"] is None and got[1]["image_error"].startswith("DecompressionBombWarning")
    assert got[2]["image"] is None and got[2]["image_error"].startswith("DecompressionBombError")
    assert any("item 1 (id1)" in r.message and str(shard) in r.message for r in caplog.records)


def write_text_dataset(root, items: bytes, interactions: bytes):
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.jsonl").write_bytes(items)
    (root / "interactions.csv").write_bytes(interactions)
    return root


ITEMS = b'{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "B"}\n'
INTERACTIONS = b"user_id,item_id,timestamp\nu,a,1\nu,b,2\n"


@pytest.mark.parametrize("items, interactions, message", [
    (b'{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "caf\xe9"}\n', INTERACTIONS,
     "items.jsonl:2: not valid UTF-8 (byte 0xe9)"),
    (ITEMS, b"user_id,item_id,timestamp\nu,a,1\nu,\xff,2\n", "interactions.csv:3: not valid UTF-8 (byte 0xff)"),
    (ITEMS, b"user_id,item_id,timestamp\nu,a,1\nu,b,2,extra\n",
     "interactions.csv:3: 4 fields, but the header has 3 (user_id,item_id,timestamp)"),
    (ITEMS, b"user_id,item_id,timestamp\nu,a\nu,b,2\n", "interactions.csv:2: 2 fields, but the header has 3"),
    (ITEMS, b'user_id,item_id,timestamp\nu,a,1\nu,"b,2\n', "interactions.csv:3: 2 fields"),  # unclosed quote
    (b'{"item_id": "a", "image": 5}\n', INTERACTIONS, "items.jsonl:1: 'image' must be a path string or null"),
], ids=["items_latin1", "interactions_ff", "extra_field", "missing_field", "unclosed_quote", "image_not_str"])
def test_bad_text_names_file_and_line(tmp_path, items, interactions, message):
    root = write_text_dataset(tmp_path / "d", items, interactions)
    with pytest.raises(DatasetError) as err:
        read_canonical(root)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_utf8_bom_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    data = read_canonical(write_text_dataset(tmp_path / "d", bom + ITEMS, bom + INTERACTIONS))
    assert sorted(data.items) == ["a", "b"] and [x.item_id for x in data.interactions] == ["a", "b"]


def test_cli_prints_sections_and_one_line_errors(tmp_path, capsys):
    root = image_dataset(tmp_path / "d")
    args = ["prepare", "--set", "data.format=canonical", "--set", f"data.source={root}", "--set", "data.kcore=1"]
    assert main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Raw input: 9 items (items.jsonl)" in out and "Prepared dataset: 9 items" in out
    stats = json.loads((tmp_path / "run" / "prepare" / "stats.json").read_text())
    assert stats["images_unreadable"] == 5 and stats["items_with_image"] == 2

    (root / "items.jsonl").write_bytes((root / "items.jsonl").read_bytes().replace(b"title 3", b"title \x80"))
    assert main([*args, "--run-dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {root / 'items.jsonl'}:4: not valid UTF-8 (byte 0x80)"

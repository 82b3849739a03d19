import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from shards.config import ShardConfig
from shards.prepared import Item, PreparedDataset, UserSequence
from shards.reader import EqualBatches, load_index, stream
from shards.writer import item_key, write_shards


@pytest.fixture(scope="module")
def run(synth_run):
    return synth_run


def keys_seen(shard_dir, kind, monkeypatch, rank, world, worker, workers):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    field = "item" if kind == "items" else "user"
    return [s[field] for s in stream(shard_dir, kind, decode_images=False)]


@pytest.mark.parametrize("kind", ["items", "train"])
def test_every_sample_exactly_once_over_2_nodes_x_2_workers(run, monkeypatch, kind):
    root, ds = run
    assert len(load_index(root / "shards")[kind]["shards"]) >= 4
    seen = [k for rank in range(2) for w in range(2) for k in keys_seen(root / "shards", kind, monkeypatch, rank, 2, w, 2)]
    expected = list(range(1, (ds.num_items if kind == "items" else ds.num_users) + 1))
    assert sorted(seen) == expected  # no sample lost, none duplicated


def test_items_and_sequences_round_trip_exactly(run):
    root, ds = run
    items = {s["item"]: s for s in stream(root / "shards", "items")}
    for it in ds.items[1:]:
        s = items[it.item]
        assert (s["item_id"], s["title"]) == (it.item_id, it.title)
        assert (s["image"] is not None) == (it.image is not None)
        if s["image"] is not None:
            assert s["image"].mode == "RGB" and s["image"].size == Image.open(it.image).size
    sequences = {s["user"]: s["items"] for s in stream(root / "shards", "train")}
    assert sequences == {u.user: u.train for u in ds.users}


def test_real_dataloader_workers_split_shards(run, monkeypatch):
    root, ds = run
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = torch.utils.data.DataLoader(stream(root / "shards", "train"), batch_size=None, num_workers=2)
    got = [s["user"] for s in loader]
    monkeypatch.setenv("RANK", "0")
    got += [s["user"] for s in torch.utils.data.DataLoader(stream(root / "shards", "train"), batch_size=None, num_workers=2)]
    assert sorted(got) == list(range(1, ds.num_users + 1))


def corrupt_shards(tmp_path):
    """Three item shards (3, 3 and 2 items); item 5's JPEG bytes are truncated garbage."""
    good = Image.new("RGB", (8, 8), (200, 10, 10))
    import io
    buf = io.BytesIO()
    good.save(buf, format="JPEG")
    sizes, item, index = [3, 3, 2], 1, {"items": {"shards": [], "counts": [], "total": 8}}
    for n, size in enumerate(sizes):
        name = f"items-{n:05d}.tar"
        with wds.TarWriter(str(tmp_path / name)) as tar:
            for _ in range(size):
                jpg = buf.getvalue()[:40] if item == 5 else buf.getvalue()
                tar.write({"__key__": item_key(item), "txt": f"t{item}",
                           "json": {"item": item, "item_id": str(item), "has_image": True}, "jpg": jpg})
                item += 1
        index["items"]["shards"].append(name)
        index["items"]["counts"].append(size)
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    shard_dir = corrupt_shards(tmp_path)
    kept = list(stream(shard_dir, "items"))
    assert len(kept) == 8 and [s["item"] for s in kept if s["image_error"]] == [5]
    assert next(s for s in kept if s["item"] == 5)["image"] is None
    stats = Counter()
    skipped = list(stream(shard_dir, "items", skip_bad_images=True, stats=stats))
    assert [s["item"] for s in skipped] == [1, 2, 3, 4, 6, 7, 8] and stats["bad_images"] == 1
    train = EqualBatches(shard_dir, "items", batch_size=2, rank=0, world_size=1, shuffle_buffer=0)
    batches = list(train)
    assert len(batches) == 4 and all(s["item"] != 5 for b in batches for s in b)
    assert train.stats["bad_images"] >= 1


def test_unreadable_source_image_is_sharded_without_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    png_named_jpg = tmp_path / "gray.jpg"
    Image.new("L", (5, 5), 128).save(png_named_jpg, format="PNG")
    ds = PreparedDataset([Item(1, "a", "A", str(bad)), Item(2, "b", "B", str(png_named_jpg))],
                         [UserSequence(1, "u", [1], 2, 1)])
    metrics = write_shards(ds, tmp_path / "shards", ShardConfig())
    assert metrics["unreadable_images"] == 1
    samples = {s["item"]: s for s in stream(tmp_path / "shards", "items")}
    assert samples[1]["image"] is None and samples[1]["image_error"] is None
    assert samples[2]["image"].mode == "RGB"


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_batches_on_every_rank_despite_uneven_shards(run, workers):
    root, ds = run
    counts = load_index(root / "shards")["train"]["counts"]
    assert len(set(counts)) > 1  # shards are uneven
    batch, world = 4, 2
    per_rank = []
    for rank in range(world):
        data = EqualBatches(root / "shards", "train", batch, rank, world, num_workers=workers, decode_images=False)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers) if workers else data
        batches = list(loader)
        assert all(len(b) == batch for b in batches)
        per_rank.append(len(batches))
    assert per_rank == [ds.num_users // (batch * world)] * world


def test_equal_batches_reshuffles_per_epoch_and_checks_shard_count(run):
    root, _ = run
    data = EqualBatches(root / "shards", "train", 4, 0, 1, decode_images=False, seed=3)
    first = [s["user"] for b in data for s in b]
    assert first == [s["user"] for b in data for s in b]  # same epoch, same order
    data.set_epoch(1)
    assert first != [s["user"] for b in data for s in b]
    with pytest.raises(ValueError, match="cannot feed"):
        EqualBatches(root / "shards", "train", 4, 0, world_size=8, num_workers=4)


def test_pair_shards_join_text_and_images(run, tmp_path):
    from shards.pairs import write_pair_shards

    root, ds = run
    no_image = next(i.item for i in ds.items[1:] if i.image is None)
    with_image = [i.item for i in ds.items[1:] if i.image][:5]
    pairs = [(with_image[0], with_image[1]), (with_image[2], no_image), (with_image[3], with_image[4])]
    metrics = write_pair_shards(pairs, root / "shards", tmp_path, pairs_per_shard=2)
    assert metrics == {"pair_shards": 2, "pairs": 3}
    got = sorted(stream(tmp_path, "pairs"), key=lambda s: s["pair"])
    assert [(s["a"]["item"], s["b"]["item"]) for s in got] == pairs
    assert [(s["a"]["title"], s["b"]["title"]) for s in got] == [(ds.items[a].title, ds.items[b].title) for a, b in pairs]
    assert got[1]["b"]["image"] is None and got[1]["a"]["image"].mode == "RGB"
    batches = list(EqualBatches(tmp_path, "pairs", batch_size=1, rank=0, world_size=1, shuffle_buffer=0))
    assert len(batches) == 3
    with pytest.raises(ValueError, match="absent from"):
        write_pair_shards([(1, 10_000)], root / "shards", tmp_path / "bad")

"""The sequence store (shards.prepared.SequenceStore: the prepared sequences as memory-mapped
columns) gives exactly what sequences.jsonl gives, and the window index of shards.windows gives
exactly the windows of the plain list implementation it replaced (kept here as the reference)."""
import json
import pickle
import random

import numpy as np
import pytest
import torch

from shards.prepare import sequence_records
from shards.prepared import (STORE_FILES, Item, PreparedDataset, SequenceStore, StoreWriter, UserSequence,
                             UserSequences, read_jsonl)
from shards.windows import PrefixRow, TargetRow, TrainWindows, collate, epoch_batches, pad_left, rank_slice, train_windows
from sicsrec.evaluate import evaluate


def reference_windows(users, max_len: int, windows: str) -> list[list[int]]:
    """train_windows before the store: a Python list, user by user."""
    out = []
    for user in users:
        seq = user.train
        if len(seq) < 2:
            continue
        if windows == "last":
            out.append(seq[-(max_len + 1):])
            continue
        end = len(seq)
        while end > 1:
            out.append(seq[max(0, end - max_len - 1):end])
            end -= max_len
    return out


def reference_pad_left(sequences, max_len: int) -> torch.Tensor:
    """pad_left before it was vectorised: row by row."""
    out = torch.zeros(len(sequences), max_len, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[-max_len:]
        if seq:
            out[row, max_len - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return out


def random_dataset(seed: int, num_users: int = 60, num_items: int = 30, min_train: int = 0) -> PreparedDataset:
    rng = random.Random(seed)
    users = []
    for u in range(1, num_users + 1):
        n = max(min_train, rng.choice([0, 1, 1, 2, 3, rng.randint(2, 40)]))
        train = [rng.randint(1, num_items) for _ in range(n)]
        user_id = rng.choice([f"u{u}", f"usér-{u}-{'x' * rng.randint(0, 30)}", f"用户{u}"])
        users.append(UserSequence(u, user_id, train, rng.randint(1, num_items), rng.randint(1, num_items)))
    return PreparedDataset([Item(i, f"i{i}", f"item {i}", None) for i in range(1, num_items + 1)], users,
                           {"users": num_users})


def without_store(root):
    for name in STORE_FILES.values():
        (root / name).unlink()
    return root


@pytest.mark.parametrize("seed", range(3))
def test_store_round_trip_equals_the_jsonl(tmp_path, seed):
    ds = random_dataset(seed)
    ds.save(tmp_path)
    assert SequenceStore.exists(tmp_path)
    back = PreparedDataset.load(tmp_path)
    assert isinstance(back.users, UserSequences) and back.num_users == len(ds.users)
    records = [UserSequence(**r) for r in read_jsonl(tmp_path / "sequences.jsonl")]
    assert records == ds.users  # the canonical file is unchanged
    assert list(back.users) == records and back.users == records and records == back.users
    assert [back.users[r] for r in range(len(records))] == records  # indexing as iteration
    assert [u.user_id for u in back.users] == [u.user_id for u in ds.users]
    assert back.users[-1] == records[-1] and back.users[5:17] == records[5:17]
    assert list(back.users[3::4]) == records[3::4] and list(back.users[1::3][2:9]) == records[1::3][2:9]
    assert list(back.users[::100]) == records[::100] and list(back.users[::-3]) == records[::-3]
    assert back.items == ds.items and back.stats == ds.stats
    with pytest.raises(IndexError):
        back.users[len(records)]
    # an old prepare dir (no store) reads sequences.jsonl into the same arrays
    old = PreparedDataset.load(without_store(tmp_path))
    assert not SequenceStore.exists(tmp_path) and old.users == records


def test_store_is_memory_mapped_and_pickles_as_its_path(tmp_path):
    random_dataset(0).save(tmp_path)
    users = PreparedDataset.load(tmp_path).users
    assert isinstance(users.store.items.base, np.memmap) and users.store.root == tmp_path
    part = users[10:20]
    again = pickle.loads(pickle.dumps(part))
    assert again == part and isinstance(again.store.items.base, np.memmap)  # reopened, not copied
    assert len(pickle.dumps(part)) < 1000


def test_saving_a_loaded_dataset_again(tmp_path):
    ds = random_dataset(1)
    ds.save(tmp_path / "a")
    loaded = PreparedDataset.load(tmp_path / "a")
    loaded.save(tmp_path / "b")
    loaded.save(tmp_path / "a")  # over the files it maps: written aside, then renamed
    for name in ("sequences.jsonl", *STORE_FILES.values()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert PreparedDataset.load(tmp_path / "a").users == ds.users


def test_the_three_writers_agree(tmp_path):
    """PreparedDataset.save (from UserSequence), the vectorised prepare (from_sequences) and the
    streamed one of prepare_ray (StoreWriter) write the same store, byte for byte."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 200)
    sequences = rng.integers(1, 50, int(lengths.sum()))
    user_ids = [f"u{u}é" * (u % 4) for u in range(200)]
    records = list(sequence_records(user_ids, lengths, np.array_split(sequences, 7)))
    SequenceStore.from_sequences(user_ids, lengths, sequences).save(tmp_path / "columns")
    SequenceStore.from_users(UserSequence(**r) for r in records).save(tmp_path / "users")
    writer = StoreWriter(tmp_path / "stream", user_ids, int(lengths.sum()) - 2 * len(lengths))
    assert list(writer.tee(records)) == records
    writer.close()
    for name in STORE_FILES.values():
        data = (tmp_path / "columns" / name).read_bytes()
        assert data == (tmp_path / "users" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes()
    assert list(UserSequences(SequenceStore.open(tmp_path / "stream"))) == [UserSequence(**r) for r in records]
    assert not list((tmp_path / "stream").glob(".*.tmp"))


def test_bad_stores_are_refused(tmp_path):
    ds = random_dataset(2)
    with pytest.raises(ValueError, match="dense 1..U"):
        PreparedDataset(ds.items[1:], ds.users[1:]).save(tmp_path / "x")
    ds.save(tmp_path)
    stats = json.loads((tmp_path / "stats.json").read_text())
    (tmp_path / "stats.json").write_text(json.dumps({**stats, "users": stats["users"] + 1}))
    with pytest.raises(ValueError, match="re-run prepare"):  # a store from another prepare
        PreparedDataset.load(tmp_path)
    np.save(tmp_path / STORE_FILES["valid"], np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="inconsistent sequence store"):
        PreparedDataset.load(tmp_path)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["last", "all"])
def test_windows_equal_the_list_implementation(tmp_path, seed, mode):
    ds = random_dataset(seed, num_users=120)
    ds.save(tmp_path)
    loaded = PreparedDataset.load(tmp_path)
    for max_len in (1, 2, 3, 5, 8, 50):
        ref = reference_windows(ds.users, max_len, mode)
        for dataset in (ds, loaded):  # from a list of users and from the mapped store
            windows = train_windows(dataset, max_len, mode)
            assert len(windows) == len(ref) and windows == ref and list(windows) == ref
            assert [windows[i] for i in range(len(ref))] == ref
            assert [windows[torch.tensor(i)] for i in range(len(ref))] == ref  # train.py indexes with tensors
            assert windows[-1] == ref[-1]
            starts, ends = windows.bounds(np.arange(len(ref)))
            flat = dataset.sequence_store().items
            assert [flat[a:b].tolist() for a, b in zip(starts, ends)] == ref
        # the batches train.py makes from them
        for batch in epoch_batches(len(ref), 16, seed=seed, epoch=1):
            for r in range(2):
                idx = rank_slice(batch, r, 2)
                got = collate([windows[i] for i in idx], max_len)
                want = [reference_pad_left([w[:-1] for w in (ref[i] for i in idx)], max_len),
                        reference_pad_left([w[1:] for w in (ref[i] for i in idx)], max_len)]
                assert all(g.dtype == torch.long and torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(IndexError):
        train_windows(ds, 3, mode)[10_000]


def test_prefix_rows_one_per_target(tmp_path):
    ds = random_dataset(5, num_users=150)
    ds.save(tmp_path)
    loaded = PreparedDataset.load(tmp_path)
    targets = sum(max(len(u.train) - 1, 0) for u in ds.users)
    for max_len in (1, 3, 7, 50):
        rows = train_windows(loaded, max_len, "prefix")
        assert rows == train_windows(ds, max_len, "prefix")
        assert len(rows) == rows.num_targets() == targets
        expected = [u.train[max(0, j - max_len):j + 1] for u in ds.users for j in range(1, len(u.train))]
        assert rows == expected and all(isinstance(r, PrefixRow) for r in rows)
        assert all(isinstance(rows[i], PrefixRow) for i in range(len(rows)))
        inputs, target = collate([rows[i] for i in range(len(rows))], max_len)
        assert int((target > 0).sum()) == targets and not target[:, :-1].any()  # the loss on the last position only
        assert target[:, -1].tolist() == [r[-1] for r in expected]
        for row, want in zip(inputs.tolist(), expected):  # the up to max_len items before the target, left-padded
            context = want[:-1]
            assert row == [0] * (max_len - len(context)) + context
    # mixed with plain windows, only the prefix rows lose their other targets
    inputs, target = collate([[1, 2, 3], PrefixRow([4, 5, 6])], 4)
    assert target.tolist() == [[0, 0, 2, 3], [0, 0, 0, 6]] and inputs.tolist() == [[0, 0, 1, 2], [0, 0, 4, 5]]


@pytest.mark.parametrize("seed", range(3))
def test_strided_windows_give_every_target_once_with_context(tmp_path, seed):
    ds = random_dataset(seed, num_users=120)
    ds.save(tmp_path)
    loaded = PreparedDataset.load(tmp_path)
    for max_len, stride in ((1, 1), (3, 1), (5, 2), (8, 3), (8, 8), (50, 10)):
        for dataset in (ds, loaded):
            rows = train_windows(dataset, max_len, "all", stride)
            assert len(rows) == sum(1 for _ in rows)
            inputs, targets = collate(list(rows), max_len)
            assert [rows[i] for i in range(len(rows))] == list(rows)
            assert [getattr(rows[i], "keep", None) for i in range(len(rows))] == [getattr(r, "keep", None) for r in rows]
            # (context, target) pairs the loss sees, read off the collated batch
            seen = sorted((tuple(x for x in inp[:j + 1] if x), int(t))
                          for inp, tgt in zip(inputs.tolist(), targets) for j, t in enumerate(tgt.tolist()) if t)
            # every train item from each user's 2nd is a target once, with all of its history up
            # to max_len + 1 - stride items (and at most max_len)
            want, need = [], []
            for u in ds.users:
                for j in range(1, len(u.train)):
                    want.append(u.train[j])
                    need.append((u.train[max(0, j - max_len):j], u.train[j], min(j, max_len + 1 - stride)))
            assert sorted(t for _, t in seen) == sorted(want) and rows.num_targets() == len(want)
            for context, target, minimum in need:
                assert any(c == tuple(context[len(context) - len(c):]) and len(c) >= minimum and t == target
                           for c, t in seen)
        if stride == max_len:  # the plain "all" windows
            assert rows == reference_windows(ds.users, max_len, "all")
            assert not any(isinstance(r, TargetRow) for r in rows)
    for bad in (-1, 9):
        with pytest.raises(ValueError, match="stride"):
            train_windows(ds, 8, "all", bad)
    with pytest.raises(ValueError, match="stride"):
        train_windows(ds, 8, "prefix", 2)


def test_strided_window_rows_by_hand():
    items = np.arange(1, 13, dtype=np.int32)  # one user, train items 1..12
    rows = TrainWindows(items, np.array([0, 12]), 4, "all", 2)  # ends at items 12, 10, 8, 6, 4
    assert list(rows) == [[8, 9, 10, 11, 12], [6, 7, 8, 9, 10], [4, 5, 6, 7, 8], [2, 3, 4, 5, 6], [1, 2, 3, 4]]
    assert [getattr(r, "keep", None) for r in rows] == [2, 2, 2, 2, None]
    _, targets = collate(list(rows), 4)
    assert targets.tolist() == [[0, 0, 11, 12], [0, 0, 9, 10], [0, 0, 7, 8], [0, 0, 5, 6], [0, 2, 3, 4]]
    assert repr(rows) == "TrainWindows(5 rows, all, max_len=4, stride=2)"


def test_pad_left_equals_the_row_by_row_version():
    rng = random.Random(0)
    for max_len in (1, 2, 5, 50):
        seqs = [[rng.randint(1, 10**6) for _ in range(rng.randint(0, 70))] for _ in range(rng.randint(0, 40))]
        assert torch.equal(pad_left(seqs, max_len), reference_pad_left(seqs, max_len))
    assert pad_left([], 4).shape == (0, 4) and pad_left([[], [3]], 2).tolist() == [[0, 0], [0, 3]]


def test_window_modes_are_checked():
    ds = random_dataset(0)
    with pytest.raises(ValueError, match="last, all, prefix"):
        train_windows(ds, 4, "every")
    assert TrainWindows(np.zeros(0, np.int32), np.zeros(1, np.int64), 4, "all") == []


def test_evaluation_on_the_store_equals_the_list(tmp_path):
    ds = random_dataset(3, num_users=90, min_train=1)  # prepare leaves every user >= 1 train item
    ds.save(tmp_path)
    loaded = PreparedDataset.load(tmp_path)
    table = torch.randn(ds.num_items + 1, 8, generator=torch.Generator().manual_seed(0))

    def score(histories):
        return table[histories].sum(1) @ table.T

    for kwargs in ({}, {"user_sample": 25, "user_seed": 3}, {"rank": 1, "world_size": 3}):
        assert evaluate(score, loaded, "test", 6, batch_size=16, **kwargs) == \
            evaluate(score, ds, "test", 6, batch_size=16, **kwargs)

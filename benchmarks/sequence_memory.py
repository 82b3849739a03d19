"""Per-process memory of the ID trainers' training data at 10^5 and 10^6 users (~20 interactions
a user): `PreparedDataset.load` + `train_windows` + one epoch of `collate` batches (what every
torchrun rank of train-id does before and while training), for three paths:

  list      the code before the sequence store (reproduced here): sequences.jsonl read into a
            list of UserSequence, train_windows a list of item lists;
  fallback  today's code on a prepare dir without the store: sequences.jsonl read into the
            store's arrays in memory (PreparedDataset.load of an old prepare dir);
  store     today's code: the memory-mapped sequence store (sequences.*.npy) and its window index.

    .venv/bin/python benchmarks/sequence_memory.py                        # 1e5 and 1e6 users
    .venv/bin/python benchmarks/sequence_memory.py --users 100000 --windows all

The prepared dir is written once per user count by prepare's own writer (PreparedColumns.save:
sequences.jsonl, the store, stats.json) from random sequences (lengths 3..37, items uniform over
--items). Each path runs in a fresh subprocess, which samples its /proc/self/status every 20 ms
and reports, above its RSS after the imports (torch, ...): the peak RSS (VmRSS), the peak
anonymous (private) RSS and the file-backed RSS at the end (the mapped store: page cache, shared
by every process on the node that maps the same files), with the wall seconds of each phase. All
paths must give the same batches (a digest of every batch's inputs and targets: `same`). The
table is printed and written to benchmarks/results/sequence_memory_cpu.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = ("list", "fallback", "store")


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = status()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            self.sample()

    def sample(self):
        now = status()
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}


def make_prepared(root: Path, users: int, items: int, seed: int = 0) -> dict:
    import numpy as np

    from shards.canonical import RawItem
    from shards.prepare import PreparedColumns

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 38, users)
    sequences = rng.integers(1, items + 1, int(lengths.sum()), dtype=np.int64)
    raw = [RawItem(f"i{i}", f"item {i}", None) for i in range(1, items + 1)]
    stats = {"users": users, "items": items, "interactions": int(lengths.sum())}
    PreparedColumns(raw, [f"user{u:07d}" for u in range(users)], lengths, sequences, stats).save(root)
    return {"interactions": int(lengths.sum()),
            "jsonl_mb": round((root / "sequences.jsonl").stat().st_size / 2**20, 1),
            "store_mb": round(sum(p.stat().st_size for p in root.glob("sequences.*.npy")) / 2**20, 1)}


def old_load(root: Path):
    """PreparedDataset.load before the store: a list of UserSequence."""
    from shards.prepared import Item, PreparedDataset, UserSequence, read_jsonl

    items = [Item(**r) for r in read_jsonl(root / "items.jsonl")]
    return PreparedDataset(items, [UserSequence(**r) for r in read_jsonl(root / "sequences.jsonl")])


def old_train_windows(dataset, max_len: int, windows: str) -> list[list[int]]:
    """train_windows before the store: a list of item lists."""
    out = []
    for user in dataset.users:
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


def child(path: str, root: Path, windows: str, max_len: int, batch_size: int) -> dict:
    import torch

    from shards.prepared import Item, PreparedDataset, SequenceStore, UserSequences, read_jsonl
    from shards.windows import collate, epoch_batches, rank_slice, train_windows

    base = status()
    sampler = Sampler()
    sampler.start()
    seconds = {}
    t = time.perf_counter()
    if path == "list":
        dataset = old_load(root)
    elif path == "fallback":  # what PreparedDataset.load does without the store files
        items = [Item(**r) for r in read_jsonl(root / "items.jsonl")]
        dataset = PreparedDataset(items, UserSequences(SequenceStore.from_jsonl(root / "sequences.jsonl")))
    else:
        dataset = PreparedDataset.load(root)
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = old_train_windows(dataset, max_len, windows) if path == "list" else train_windows(dataset, max_len,
                                                                                             windows)
    seconds["windows"] = time.perf_counter() - t
    sampler.sample()
    after_windows = status()
    t = time.perf_counter()
    digest = hashlib.sha256()
    for batch in epoch_batches(len(rows), batch_size, seed=0, epoch=0):  # as Trainer.epoch_batches, 1 rank
        inputs, targets = collate([rows[i] for i in rank_slice(batch, 0, 1)], max_len)
        digest.update(inputs.numpy().tobytes())
        digest.update(targets.numpy().tobytes())
    seconds["epoch"] = time.perf_counter() - t
    sampler.done.set()
    sampler.join()
    sampler.sample()
    end = status()
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"rows": len(rows), "digest": digest.hexdigest()[:16],
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "base_rss_mb": mb(base["VmRSS"]),
            "peak_rss_mb": mb(sampler.peak["VmRSS"] - base["VmRSS"]),
            "peak_anon_mb": mb(sampler.peak["RssAnon"] - base["RssAnon"]),
            "anon_after_windows_mb": mb(after_windows["RssAnon"] - base["RssAnon"]),
            "file_rss_end_mb": mb(end["RssFile"] - base["RssFile"]),
            "ru_maxrss_mb": mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


def run(path: str, root: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--dir", str(root), "--windows", args.windows,
           "--max-len", str(args.max_len), "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        return {"failed": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default="100000,1000000", help="comma-separated user counts")
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--windows", default="last", help="last | all (every path) | prefix (not the list path)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sequence_memory_cpu.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), args.windows, args.max_len, args.batch_size)))
        return
    paths = [x for x in PATHS if not (x == "list" and args.windows == "prefix")]
    rows = []
    for users in [int(u) for u in args.users.split(",")]:
        folder = Path(tempfile.mkdtemp(prefix="sequence_memory_"))
        try:
            t = time.perf_counter()
            row = {"users": users, "items": args.items, **make_prepared(folder, users, args.items)}
            row["prepare_write_s"] = round(time.perf_counter() - t, 1)
            for path in paths:
                row[path] = run(path, folder, args)
                print(json.dumps({"users": users, "path": path, **row[path]}), flush=True)
            digests = {row[x].get("digest") for x in paths}
            row["same"] = len(digests) == 1 and None not in digests
            assert row["same"], f"the paths gave different batches: {digests}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)

    print(f"\nwindows={args.windows} max_len={args.max_len} batch={args.batch_size}; MB above the RSS after imports; "
          "file = mapped store pages (page cache, shared between ranks)")
    print(f"{'users':>9} {'interactions':>12} {'path':>8} | {'peak RSS':>8} {'peak anon':>9} {'file':>6} | "
          f"{'load s':>6} {'windows s':>9} {'epoch s':>7} | {'rows':>9}")
    for r in rows:
        for path in paths:
            c = r[path]
            if "failed" in c:
                print(f"{r['users']:>9,} {r['interactions']:>12,} {path:>8} | {c['failed']}")
                continue
            s = c["seconds"]
            print(f"{r['users']:>9,} {r['interactions']:>12,} {path:>8} | {c['peak_rss_mb']:>8.1f} "
                  f"{c['peak_anon_mb']:>9.1f} {c['file_rss_end_mb']:>6.1f} | {s['load']:>6.1f} {s['windows']:>9.2f} "
                  f"{s['epoch']:>7.1f} | {c['rows']:>9,}")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "windows": args.windows, "max_len": args.max_len, "batch_size": args.batch_size, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Wall time and peak memory of `synth` (scale mode: data.synth.images=false) and `prepare` at
10^4, 10^5 and 10^6 users (as many items; ~20 interactions a user), the vectorised prepare
(pyarrow + numpy, shards.prepare.prepare_dir) against the Python one (read_canonical +
prepare_python + save) where the latter fits.

    .venv/bin/python benchmarks/scale_prepare.py                     # 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/scale_prepare.py --users 10000,100000 --old-limit-gb 8

Each step runs in a fresh subprocess, which reports its wall and CPU seconds and its peak RSS
(ru_maxrss). The Python prepare runs under an address-space limit (--old-limit-gb) and a timeout;
where it fails the row says so. Where both run, their three output files must be identical
(checked: the `same` column). kcore 5. The table is printed and written to
benchmarks/results/scale_prepare_cpu.json. On a shared machine CPU seconds are steadier than wall.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILES = ("items.jsonl", "sequences.jsonl", "stats.json")


def child(step: str, users: int, items: int, folder: Path, kcore: int) -> dict:
    from shards.canonical import read_canonical
    from shards.config import SynthConfig
    from shards.prepare import prepare_dir, prepare_python
    from shards.synth import synthesize

    wall, cpu = time.perf_counter(), time.process_time()
    if step == "synth":
        synthesize(SynthConfig(seed=0, num_users=users, num_items=items, num_topics=12, images=False,
                               min_seq_len=10, max_seq_len=30), folder / "raw")
    elif step == "new":
        prepare_dir(folder / "raw", folder / "new", kcore)
    else:
        prepare_python(read_canonical(folder / "raw"), kcore).save(folder / "old")
    return {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def run(step: str, users: int, items: int, folder: Path, kcore: int, limit_gb: float | None, timeout: int) -> dict:
    def limit():
        if limit_gb:
            size = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    cmd = [sys.executable, __file__, "--child", step, "--users", str(users), "--items", str(items),
           "--dir", str(folder), "--kcore", str(kcore)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"failed": f"over {timeout} s"}
    if done.returncode:
        memory = "MemoryError" in done.stderr or done.returncode < 0
        return {"failed": f"out of memory (limit {limit_gb:g} GB)" if memory and limit_gb else
                done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in FILES:
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default="10000,100000,1000000", help="comma-separated user counts")
    p.add_argument("--items", default="", help="item counts (default: as many as users)")
    p.add_argument("--kcore", type=int, default=5)
    p.add_argument("--old-limit-gb", type=float, default=8.0, help="address-space limit of the Python prepare")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per step")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale_prepare_cpu.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.users), int(args.items), Path(args.dir), args.kcore)))
        return
    users = [int(u) for u in args.users.split(",")]
    items = [int(i) for i in args.items.split(",")] if args.items else users
    rows = []
    for n_users, n_items in zip(users, items):
        folder = Path(tempfile.mkdtemp(prefix="scale_prepare_"))
        try:
            row = {"users": n_users, "items": n_items}
            row["synth"] = run("synth", n_users, n_items, folder, args.kcore, None, args.timeout)
            raw = folder / "raw"
            row["interactions"] = sum(1 for _ in open(raw / "interactions.csv")) - 1
            row["csv_mb"] = round((raw / "interactions.csv").stat().st_size / 2**20)
            row["new"] = run("new", n_users, n_items, folder, args.kcore, None, args.timeout)
            row["old"] = run("old", n_users, n_items, folder, args.kcore, args.old_limit_gb, args.timeout)
            if "failed" not in row["old"]:
                row["same"] = digest(folder / "old") == digest(folder / "new")
                assert row["same"], "the Python and vectorised prepare differ"
            row["prepared"] = {k: json.loads((folder / "new" / "stats.json").read_text())[k]
                               for k in ("users", "items", "interactions")}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def cell(r):
        return r["failed"] if "failed" in r else f"{r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {r['peak_rss_gb']:>6.2f}"

    print(f"\n{'users':>9} {'items':>9} {'interactions':>12} | {'synth: wall s, cpu s, GB':>24} | "
          f"{'new prepare':>24} | {'old prepare':>24} | same")
    for r in rows:
        print(f"{r['users']:>9,} {r['items']:>9,} {r['interactions']:>12,} | {cell(r['synth']):>24} | "
              f"{cell(r['new']):>24} | {cell(r['old']):>24} | {r.get('same', '-')}")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "kcore": args.kcore, "old_limit_gb": args.old_limit_gb, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

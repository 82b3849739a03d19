"""Peak memory and time of full-ranking evaluation (sicsrec.evaluate): the old full score matrix
per user batch against the item table scored in chunks of `item_chunk` items.

    .venv/bin/python benchmarks/eval_memory.py                 # 100k items x 10k users, CPU, 1 thread
    .venv/bin/python benchmarks/eval_memory.py --items 20000 --users 2000 --chunks 0,4096

A synthetic dataset (random histories) and a random [N+1, d] item table; the user function is a
cheap mean of the history's embeddings, so the numbers are the ranking's own. Each setting runs
in a fresh subprocess and reports its peak memory above the RSS it held just before `evaluate`
(VmHWM - VmRSS; on CUDA max allocated above allocated) and the wall time of `evaluate`. Every
setting must give the same metrics (checked; the rows state them). On a shared machine the CPU
seconds (process time) are steadier than the wall seconds. The table is printed and
written to benchmarks/results/eval_memory_<cpu|cuda>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.prepared import Item, PreparedDataset, UserSequence  # noqa: E402
from sicsrec.evaluate import evaluate  # noqa: E402


def proc_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def setting(args, chunk: int | None) -> dict:
    """One evaluation; chunk None = the old path (score_fn returning the [B, N+1] logits)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    items = [Item(i, str(i), "", None) for i in range(1, args.items + 1)]
    users = []
    for u in range(args.users):
        seq = torch.randint(1, args.items + 1, (args.max_len,), generator=g).tolist()
        users.append(UserSequence(u, str(u), seq, seq[0], seq[1]))  # targets seen before: not all misses
    dataset = PreparedDataset(items, users)
    table = torch.randn(args.items + 1, args.dim, generator=g).to(device)

    def user_fn(histories):
        return table[histories].mean(1)

    def score_fn(histories):
        scores = user_fn(histories) @ table.T
        scores[:, 0] = float("-inf")
        return scores

    kw = dict(batch_size=args.batch_size, device=device)
    if chunk is not None:
        kw.update(item_table=table, item_chunk=chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        before = proc_mb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = evaluate(score_fn if chunk is None else user_fn, dataset, "test", args.max_len, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 - before
    else:
        peak = proc_mb("VmHWM") - before
    return {"path": "score_fn (full [B, N+1] logits)" if chunk is None else "item_table", "item_chunk": chunk,
            "seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(time.process_time() - cpu_start, 2),
            "peak_mb_above_start": round(peak, 1), "metrics": metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--max-len", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--chunks", default="old,0,65536,8192,1024", help="'old' = the score_fn path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print its JSON
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(setting(args, None if args.one == "old" else int(args.one))))
        return
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("chunks", "one")]
    rows = []
    for chunk in args.chunks.split(","):
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", chunk], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['path']:32s} chunk {str(r['item_chunk']):>6s}: {r['seconds']:7.2f} s ({r['cpu_seconds']:.2f} s CPU), "
              f"peak {r['peak_mb_above_start']:8.1f} MB above start, NDCG@10 {r['metrics']['ndcg@10']:.6f}")
    same = all(r["metrics"] == rows[0]["metrics"] for r in rows)
    print(f"identical metrics in every setting: {same}")
    cuda = torch.device(args.device).type == "cuda"
    report = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "memory": "cuda max allocated above start" if cuda else "peak RSS above start (VmHWM - VmRSS)",
              "torch": torch.__version__, "threads": args.threads,
              "settings": {k: v for k, v in vars(args).items() if k not in ("one",)},
              "identical_metrics": same, "rows": rows}
    out = REPO / "benchmarks" / "results" / f"eval_memory_{'cuda' if cuda else 'cpu'}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

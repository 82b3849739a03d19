"""Memory and time of one next-item training step per loss choice (`train_id.loss`).

    .venv/bin/python benchmarks/loss_memory.py                 # the CPU table (< 10 min on 2 cores)
    .venv/bin/python benchmarks/loss_memory.py --items 1000,10000 --losses full,chunked

For every (loss, N) the parent starts a fresh subprocess that builds NextItemLoss(SASRec(N, 64))
(2 layers, 2 heads, max_len 50, the step-1 defaults) and a batch of 128 sequences x 50 positions
(6,400 targets, random items), then runs forward + backward (no optimizer) 1 + `--steps` times.
Measured in the subprocess: the resident memory right before the first step (model, batch and
interpreter) and the process's peak RSS afterwards (ru_maxrss); "peak added" is their difference,
i.e. what the step's activations, logits and gradients cost (parameter gradients included: the
item table's gradient alone is N x 64 x 4 bytes). Step time: the mean over the steps after the
first. On CUDA (`--device cuda`) the same columns come from torch.cuda.max_memory_allocated.
`full` materialises the [6400 x (N+1)] fp32 logits (and their gradient); N = 1e6 is run for
`chunked` and `sampled` only. The table is printed and written to
benchmarks/results/loss_memory_<cpu|cuda>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL_MAX_ITEMS = 100_000  # full softmax beyond this: +25 GB of logits; not run


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def measure(loss: str, num_items: int, args) -> dict:
    """One configuration, in this process (the parent runs each in its own subprocess)."""
    import torch

    from sicsrec.next_item import NextItemCriterion, NextItemParams
    from sicsrec.models.sasrec import SASRec
    from sicsrec.train import NextItemLoss

    torch.manual_seed(0)
    device = torch.device(args.device)
    params = NextItemParams(loss=loss, loss_chunk=args.chunk, num_negatives=args.negatives, sampler="uniform")
    model = NextItemLoss(SASRec(num_items, args.hidden, 2, 2, 0.5, args.length), NextItemCriterion(params)).to(device)
    model.train()
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, num_items + 1, (args.batch, args.length + 1), generator=g).to(device)
    inputs, targets = items[:, :-1], items[:, 1:]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        before = _rss_mb()
    times, loss_value = [], None
    for _ in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_sum, count = model(inputs, targets)
        (loss_sum / count).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loss_value = float(loss_sum.detach() / count)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    timed = times[1:] or times
    return {"loss": loss, "items": num_items, "chunk": args.chunk if loss == "chunked" else None,
            "negatives": args.negatives if loss == "sampled" else None, "targets": int(count),
            "before_mb": round(before, 1), "peak_mb": round(peak, 1), "peak_added_mb": round(peak - before, 1),
            "first_step_s": round(times[0], 3), "step_s": round(sum(timed) / len(timed), 3),
            "mean_ce": round(loss_value, 4), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="1000,10000,100000,1000000")
    parser.add_argument("--losses", default="full,chunked,sampled")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="chunked: target rows per chunk (train_id.loss_chunk)")
    parser.add_argument("--negatives", type=int, default=1024, help="sampled: shared negatives (train_id.num_negatives)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--out", default="")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child mode: "loss,N"
    args = parser.parse_args()

    if args.one:
        loss, n = args.one.split(",")
        print("RESULT " + json.dumps(measure(loss, int(n), args)), flush=True)
        return

    rows = []
    passthrough = [f"--batch={args.batch}", f"--length={args.length}", f"--hidden={args.hidden}",
                   f"--chunk={args.chunk}", f"--negatives={args.negatives}", f"--steps={args.steps}",
                   f"--device={args.device}"]
    for n in [int(float(x)) for x in args.items.split(",")]:
        for loss in args.losses.split(","):
            if loss == "full" and n > FULL_MAX_ITEMS:
                continue
            cmd = [sys.executable, __file__, f"--one={loss},{n}", *passthrough]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {"loss": loss, "items": n,
                                                                "error": proc.stderr.strip()[-500:]}
            except subprocess.TimeoutExpired:
                row = {"loss": loss, "items": n, "error": f"timeout after {args.timeout} s"}
            rows.append(row)
            print(_format_row(row), flush=True)

    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"loss_memory_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"device": args.device, "torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
            "batch": args.batch, "length": args.length, "hidden": args.hidden, "model": "SASRec(2 layers, 2 heads)",
            "memory": "CUDA max allocated" if kind == "cuda" else "peak RSS (ru_maxrss) minus RSS before the first step",
            "steps_timed": args.steps, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n" + table(rows))
    print(f"\nwritten to {out}")


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['loss']:>8} N={row['items']:>8}: ERROR {row['error']}"
    return (f"{row['loss']:>8} N={row['items']:>8}: +{row['peak_added_mb']:.0f} MB, {row['step_s']:.3f} s/step "
            f"(CE {row['mean_ce']})")


def table(rows: list[dict]) -> str:
    head = "| loss | N | peak RSS added (MB) | s / step | mean CE |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for r in rows:
        name = r["loss"] + (f" (chunk {r['chunk']})" if r.get("chunk") else "") + \
            (f" (K={r['negatives']})" if r.get("negatives") else "")
        if "error" in r:
            lines.append(f"| {name} | {r['items']:,} | error | error | {r['error'][:40]} |")
        else:
            lines.append(f"| {name} | {r['items']:,} | {r['peak_added_mb']:,.0f} | {r['step_s']:.3f} | "
                         f"{r['mean_ce']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

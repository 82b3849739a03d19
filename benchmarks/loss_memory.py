"""Memory and time of one next-item training step per loss choice (`train_id.loss`).

    .venv/bin/python benchmarks/loss_memory.py                 # the CPU table (< 10 min on 2 cores)
    .venv/bin/python benchmarks/loss_memory.py --items 1000,10000 --losses full,chunked
    .venv/bin/python benchmarks/loss_memory.py --losses sampled,sampled_sparse --optimizer --merge

`sampled_sparse` is `sampled` with `train_id.sparse_item_grad: true` (issue #15): the item table's
gradient is row-sparse (input lookup and candidate rows), so the step allocates nothing N x d,
and the candidates' logits are computed `--sparse-chunk` target rows at a time (loss_chunk;
default 1024, train_id's); the growth of "peak added" from N = 1e4 to 1e6 is printed per loss
(target for sampled_sparse: <= 1.2x). `--optimizer` also times the optimizer step of each row after the memory is read
(sicsrec.optim.build_optimizer: AdamW, or SparseAdam + AdamW for sampled_sparse; its state is
not in "peak added"). `--merge` replaces the measured rows in the results JSON and keeps the others. `--repeats R` runs
each configuration R times (fresh subprocesses) and keeps the median-memory run, listing all R.

For every (loss, N) the parent starts a fresh subprocess that builds NextItemLoss(SASRec(N, 64))
(2 layers, 2 heads, max_len 50, the step-1 defaults) and a batch of 128 sequences x 50 positions
(6,400 targets, random items), then runs forward + backward (no optimizer) 1 + `--steps` times.
Measured in the subprocess: the resident memory right before the first step (model, batch and
interpreter, torch._dynamo imported: torch.optim and F.linear_cross_entropy import it lazily, ~150 MB;
older rows, those without "dynamo_preimported", did not, so their `chunked` ones count it) and the
process's peak RSS afterwards (ru_maxrss); "peak added" is their difference,
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
LOSSES = ("full", "chunked", "sampled", "sampled_sparse")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def measure(loss: str, num_items: int, args) -> dict:
    """One configuration, in this process (the parent runs each in its own subprocess)."""
    import torch

    from sicsrec.config import TrainConfig
    from sicsrec.next_item import NextItemCriterion, NextItemParams
    from sicsrec.models.sasrec import SASRec
    from sicsrec.optim import build_optimizer
    from sicsrec.train import NextItemLoss

    # torch.optim and F.linear_cross_entropy import torch._dynamo on first use (~150 MB of RSS):
    # imported before the baseline, so that no row counts it as step memory
    import torch._dynamo  # noqa: F401

    torch.manual_seed(0)
    device = torch.device(args.device)
    sparse = loss == "sampled_sparse"
    chunk = args.sparse_chunk if sparse else args.chunk
    cfg = TrainConfig(loss="sampled" if sparse else loss, loss_chunk=chunk, num_negatives=args.negatives,
                      sampler="uniform", sparse_item_grad=sparse, engine="single")
    params = NextItemParams.from_config(cfg)
    model = NextItemLoss(SASRec(num_items, args.hidden, 2, 2, 0.5, args.length), NextItemCriterion(params))
    optimizer = build_optimizer(model, cfg) if args.optimizer else None  # state made lazily: at its first step
    if sparse and optimizer is None:
        model.recommender.use_sparse_item_grad()
    model.to(device)
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
    row = {"loss": loss, "items": num_items, "chunk": chunk if loss in ("chunked", "sampled_sparse") else None,
           "negatives": args.negatives if loss.startswith("sampled") else None, "targets": int(count),
           "before_mb": round(before, 1), "peak_mb": round(peak, 1), "peak_added_mb": round(peak - before, 1),
           "first_step_s": round(times[0], 3), "step_s": round(sum(timed) / len(timed), 3),
           "mean_ce": round(loss_value, 4), "threads": torch.get_num_threads(), "dynamo_preimported": True}
    if sparse:
        row["table_grad"] = "sparse" if model.recommender.item_emb.weight.grad.is_sparse else "dense"
    if optimizer is not None:  # after the memory is read: the optimizer's state is not in peak_added_mb
        opt_times = []
        for _ in range(args.steps + 1):  # the first step creates the state (moments)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, count = model(inputs, targets)
            (loss_sum / count).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            opt_times.append(time.perf_counter() - start)
        timed = opt_times[1:] or opt_times
        row["optimizer"] = type(optimizer).__name__
        row["optimizer_step_s"] = round(sum(timed) / len(timed), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="1000,10000,100000,1000000")
    parser.add_argument("--losses", default="full,chunked,sampled")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="chunked: target rows per chunk (train_id.loss_chunk)")
    parser.add_argument("--sparse-chunk", type=int, default=1024,
                        help="sampled_sparse: target rows per logit chunk (train_id.loss_chunk)")
    parser.add_argument("--negatives", type=int, default=1024, help="sampled: shared negatives (train_id.num_negatives)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh subprocesses per configuration; the row is the median-memory one")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--optimizer", action="store_true", help="also time the optimizer step (optimizer_step_s)")
    parser.add_argument("--merge", action="store_true",
                        help="replace the measured rows in the results JSON, keep the others")
    parser.add_argument("--out", default="")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child mode: "loss,N"
    args = parser.parse_args()

    if args.one:
        loss, n = args.one.split(",")
        print("RESULT " + json.dumps(measure(loss, int(n), args)), flush=True)
        return

    rows = []
    passthrough = [f"--batch={args.batch}", f"--length={args.length}", f"--hidden={args.hidden}",
                   f"--chunk={args.chunk}", f"--sparse-chunk={args.sparse_chunk}", f"--negatives={args.negatives}",
                   f"--steps={args.steps}",
                   f"--device={args.device}"] + (["--optimizer"] if args.optimizer else [])
    losses = args.losses.split(",")
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")
    revision = _revision()
    for n in [int(float(x)) for x in args.items.split(",")]:
        for loss in losses:
            if loss == "full" and n > FULL_MAX_ITEMS:
                continue
            row = _repeated([_child(loss, n, passthrough, args.timeout) for _ in range(args.repeats)])
            row["revision"] = revision
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
    run = {"revision": revision, "command": " ".join(["benchmarks/loss_memory.py", *sys.argv[1:]]),
           "losses": losses, "items": args.items, "load_average_at_end": meta["load_average_at_end"]}
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        measured = {(r["loss"], r["items"]) for r in rows}
        kept = [r for r in old["rows"] if (r["loss"], r["items"]) not in measured]
        earlier = old["meta"].get("runs") or [{"revision": _file_revision(out), "note": "the rows without a revision "
                                               "(the commit that wrote the file)"}]
        meta = {**old["meta"], "runs": earlier + [run]}
        rows = kept + rows
        rows.sort(key=lambda r: (r["items"], LOSSES.index(r["loss"]) if r["loss"] in LOSSES else len(LOSSES)))
    else:
        meta["runs"] = [run]
    growth = growth_table(rows)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "growth_1e4_to_1e6": growth}, indent=2) + "\n")
    print("\n" + table(rows))
    for loss, ratio in growth.items():
        print(f"peak added, N = 1e4 -> 1e6, {loss}: {ratio}x")
    print(f"\nwritten to {out}")


def _child(loss: str, n: int, passthrough: list[str], timeout: int) -> dict:
    """One configuration in a fresh subprocess."""
    cmd = [sys.executable, __file__, f"--one={loss},{n}", *passthrough]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        return json.loads(lines[-1][7:]) if lines else {"loss": loss, "items": n, "error": proc.stderr.strip()[-500:]}
    except subprocess.TimeoutExpired:
        return {"loss": loss, "items": n, "error": f"timeout after {timeout} s"}


def _repeated(runs: list[dict]) -> dict:
    """One row from --repeats fresh subprocesses: the run with the (lower) median peak added, every run's
    peak added and step time listed (a single run: that run)."""
    ok = [r for r in runs if "error" not in r]
    if len(runs) == 1 or not ok:
        return runs[0]
    ok.sort(key=lambda r: r["peak_added_mb"])
    row = dict(ok[(len(ok) - 1) // 2])
    row["repeats"] = {"peak_added_mb": [r["peak_added_mb"] for r in runs if "error" not in r],
                      "step_s": [r["step_s"] for r in runs if "error" not in r], "failed": len(runs) - len(ok)}
    return row


def _revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_revision(path: Path) -> str:
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], capture_output=True, text=True,
                              cwd=REPO, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def growth_table(rows: list[dict], low: int = 10_000, high: int = 1_000_000) -> dict:
    """Per loss: peak added at N = high over N = low (rows without an error at both)."""
    ok = {(r["loss"], r["items"]): r for r in rows if "error" not in r}
    return {loss: round(ok[(loss, high)]["peak_added_mb"] / ok[(loss, low)]["peak_added_mb"], 3)
            for loss in LOSSES if (loss, low) in ok and (loss, high) in ok}


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['loss']:>8} N={row['items']:>8}: ERROR {row['error']}"
    return (f"{row['loss']:>8} N={row['items']:>8}: +{row['peak_added_mb']:.0f} MB, {row['step_s']:.3f} s/step "
            f"(CE {row['mean_ce']})")


def table(rows: list[dict]) -> str:
    head = "| loss | N | peak RSS added (MB) | s / step | optimizer step (s) | mean CE | revision |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = "sampled + sparse" if r["loss"] == "sampled_sparse" else r["loss"]
        name = label + (f" (chunk {r['chunk']})" if r.get("chunk") else "") + \
            (f" (K={r['negatives']})" if r.get("negatives") else "")
        opt = f"{r['optimizer_step_s']:.4f}" if "optimizer_step_s" in r else "-"
        if "error" in r:
            lines.append(f"| {name} | {r['items']:,} | error | error | - | {r['error'][:40]} | "
                         f"{r.get('revision', '-')} |")
        else:
            lines.append(f"| {name} | {r['items']:,} | {r['peak_added_mb']:,.0f} | {r['step_s']:.3f} | {opt} | "
                         f"{r['mean_ce']:.3f} | {r.get('revision', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

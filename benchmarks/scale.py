"""The system at catalogue scale on one machine: `synth` (scale mode) -> `prepare` -> `shard` ->
`train-id` (one epoch, `sampled` loss) with full-ranking evaluation over all items, at 10^4, 10^5
and 10^6 users (as many items), plus the per-step loss table of benchmarks/loss_memory.py, in one
run, side by side.

    .venv/bin/python benchmarks/scale.py                          # 1e4, 1e5, 1e6 users + loss rows
    .venv/bin/python benchmarks/scale.py --users 10000 --loss-items 1000,10000   # quick look
    .venv/bin/python benchmarks/scale.py --quality configs/ml100k.yaml,configs/ninerec_food.yaml

The quality rows (`--quality`) train step 1 with each loss (`--quality-losses`) and seed on one
prepared split of each real dataset, with the config's own train_id settings, and are merged into
the results file (`quality`), so they can run apart from the scale rows.

Every stage is the real CLI (`python -m launcher <stage> --config <generated yaml>`) in its own
process; its wall and CPU seconds and peak RSS (ru_maxrss of that process, from os.wait4) are
recorded. train-id's epoch and evaluation times come from its metrics.json. Evaluation ranks all
items for a fixed seeded sample of `--eval-users` validation and test users (train_id.eval_users /
test_users; the sample is stated in metrics.json) when the dataset has more users than that.
Results: benchmarks/results/scale_cpu.json and, if matplotlib is installed, scale_cpu.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STAGES = ("synth", "prepare", "shard", "train-id")


def config(run_dir: Path, users: int, items: int, args) -> dict:
    """The generated run config: the scale-mode synthetic catalogue and a one-epoch sampled step 1."""
    sample = args.eval_users if users > args.eval_users else 0
    train = {"hidden": args.hidden, "layers": 2, "heads": 2, "max_len": args.max_len, "batch_size": args.batch,
             "epochs": 1, "patience": 1, "loss": "sampled", "num_negatives": args.negatives,
             "eval_batch_size": 256, "eval_item_chunk": 65536, "eval_users": sample, "test_users": sample}
    if args.sparse:
        train["sparse_item_grad"] = True
    return {"run_dir": str(run_dir), "seed": 0,
            "data": {"format": "synth", "kcore": 5,
                     "synth": {"seed": 0, "num_users": users, "num_items": items, "num_topics": 12,
                               "images": False, "min_seq_len": 10, "max_seq_len": 30,
                               "popularity_exponent": args.popularity_exponent}},
            "shard": {"items_per_shard": max(1000, items // 64), "users_per_shard": max(1000, users // 64)},
            "train_id": train}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The options `config()` reads (benchmarks/recbole_scale.py generates the same data with them)."""
    p.add_argument("--popularity-exponent", type=float, default=0.8,
                   help="data.synth.popularity_exponent (Zipf-like skew; 0.5 keeps nearly every item through 5-core)")
    p.add_argument("--batch", type=int, default=128, help="train_id.batch_size")
    p.add_argument("--max-len", type=int, default=20, help="train_id.max_len (the users hold 10-30 items)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--negatives", type=int, default=1024, help="train_id.num_negatives")
    p.add_argument("--sparse", action="store_true", help="train_id.sparse_item_grad: row-sparse item-table updates")
    p.add_argument("--eval-users", type=int, default=10000, help="validation/test user sample above this many users")


def time_stage(cli_args: list[str], log_path: Path, timeout: int, threads: int = 0) -> dict:
    """One CLI stage (`python -m launcher <cli_args>`) in a fresh process: wall s, CPU s (user +
    sys), peak RSS GB, or why it failed. `threads` > 0 sets the child's OMP_NUM_THREADS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *cli_args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                return {"failed": f"over {timeout} s"}
            time.sleep(0.2)
    row = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
    if os.waitstatus_to_exitcode(status):
        tail = log_path.read_text().strip().splitlines()[-1:]
        row["failed"] = tail[0] if tail else f"exit {status}"
    return row


def run_stages(row: dict, stages, cfg_path: Path, timeout: int, label: str) -> bool:
    """Time each CLI stage on `cfg_path` into row[stage], stopping at the first failure; True if all ran."""
    for stage in stages:
        row[stage] = time_stage([stage, "--config", str(cfg_path)], cfg_path.with_suffix(f".{stage}.log"), timeout)
        print(f"  {label}: {stage} {row[stage]}", flush=True)
        if "failed" in row[stage]:
            return False
    return True


def pipeline_row(users: int, items: int, args) -> dict:
    import yaml

    folder = Path(tempfile.mkdtemp(prefix=f"scale_{users}_", dir=args.workdir))
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(folder / "run", users, items, args)))
    row = {"users": users, "items": items, "popularity_exponent": args.popularity_exponent, "argv": sys.argv[1:]}
    try:
        if run_stages(row, STAGES, cfg_path, args.timeout, f"{users:,} users"):
            stats = json.loads((folder / "run" / "prepare" / "stats.json").read_text())
            row["prepared"] = {k: stats[k] for k in ("users", "items", "interactions")}
            m = json.loads((folder / "run" / "train_id" / "metrics.json").read_text())
            row["train_id"] = {"epoch_s": round(m["seconds_per_epoch"], 1),
                               "eval_s": round(m["eval_seconds_per_epoch"], 1),
                               "sequences_per_s": round(m["sequences_per_s"]), "targets_per_s": round(m["targets_per_s"]),
                               "eval_users": m["test"]["users"], "test_ndcg@10": round(m["test"]["ndcg@10"], 4),
                               "test_hit@10": round(m["test"]["hit@10"], 4)}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return row


def loss_rows(args) -> list[dict]:
    """benchmarks/loss_memory.py's rows (one fresh process per row), in this run."""
    out = Path(tempfile.mkstemp(suffix=".json", dir=args.workdir)[1])
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_memory.py"), "--items", args.loss_items,
           "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = json.loads(out.read_text())["rows"]
    out.unlink()
    return rows


def quality_rows(config_path: str, losses: list[str], seeds: list[int], args) -> list[dict]:
    """Step 1 on a real dataset (the config's own train_id settings), one run per loss and seed on
    the same prepared split (`prepare` runs once and is linked into every run)."""
    base = Path(args.workdir or tempfile.gettempdir()) / f"scale_quality_{Path(config_path).stem}"
    base.mkdir(parents=True, exist_ok=True)
    prepared = time_stage(["prepare", "--config", config_path, "--set", f"run_dir={base / 'data'}"],
                          base / "prepare.log", args.timeout)
    if "failed" in prepared:
        raise SystemExit(f"prepare of {config_path} failed: {prepared['failed']} (log: {base / 'prepare.log'})")
    rows = []
    for seed in seeds:
        for loss in losses:
            run = base / f"{loss}_seed{seed}"
            run.mkdir(exist_ok=True)
            if not (run / "prepare").exists():
                (run / "prepare").symlink_to(base / "data" / "prepare")
            timed = time_stage(["train-id", "--config", config_path, "--set", f"run_dir={run}", "--set",
                                f"seed={seed}", "--set", f"train_id.loss={loss}",
                                *[a for kv in args.quality_set for a in ("--set", kv)]],
                               run / "train_id.log", args.timeout, args.threads)
            if "failed" in timed:
                print(f"  {Path(config_path).stem} seed {seed} {loss}: failed: {timed['failed']}", flush=True)
                continue
            m = json.loads((run / "train_id" / "metrics.json").read_text())
            row = {"config": config_path, "loss": loss, "seed": seed, "overrides": args.quality_set,
                   "threads": args.threads or None, **timed, "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                   "seconds_per_epoch": round(m["seconds_per_epoch"], 2),
                   **{f"test_{k}": m["test"][k] for k in ("ndcg@10", "hit@10")},
                   **{f"valid_{k}": m["valid"][k] for k in ("ndcg@10", "hit@10")}}
            rows.append(row)
            merge_quality(Path(args.out), [row])
            print(f"  {Path(config_path).stem} seed {seed} {loss}: test ndcg@10 {row['test_ndcg@10']:.4f} "
                  f"hit@10 {row['test_hit@10']:.4f} ({row['wall_s']} s)", flush=True)
    return rows


def variant(row: dict) -> str:
    """The row's loss and its extra overrides, e.g. `sampled train_id.num_negatives=128`."""
    return " ".join([row["loss"], *row.get("overrides", [])])


def quality_key(row: dict) -> tuple:
    return row["config"], variant(row), row["seed"]


def merge_quality(out: Path, rows: list[dict]) -> list[dict]:
    """Replace the results file's quality rows of the same (config, loss, overrides, seed); keep the
    rest. Locked, so that quality runs of several datasets can write into one file side by side."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.exists() else {}
        new = {quality_key(q) for q in rows}
        result["quality"] = [r for r in result.get("quality", []) if quality_key(r) not in new] + rows
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result["quality"]


def quality_table(rows: list[dict]) -> str:
    """Mean ± std over seeds per (dataset, loss), and the change of the mean against `full`."""
    import statistics

    lines = ["| dataset | loss | test NDCG@10 | vs full | test Hit@10 | vs full | epochs best/run | seeds |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        groups = {}
        for r in rows:
            if r["config"] == config:
                groups.setdefault(variant(r), []).append(r)
        full = groups.get("full")
        for loss, group in groups.items():
            cells = []
            for key in ("test_ndcg@10", "test_hit@10"):
                values = [r[key] for r in group]
                std = statistics.pstdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}")
                if full and loss != "full":
                    ref = statistics.mean(r[key] for r in full)
                    cells.append(f"{100 * (statistics.mean(values) / ref - 1):+.1f}%")
                else:
                    cells.append("-")
            epochs = f"{statistics.mean(r['best_epoch'] for r in group):.0f}/{statistics.mean(r['epochs_run'] for r in group):.0f}"
            lines.append(f"| {Path(config).stem} | {loss} | " + " | ".join(cells) + f" | {epochs} | {len(group)} |")
    return "\n".join(lines)


def cell(stage: dict) -> str:
    return stage.get("failed") or f"{stage['wall_s']:.0f} s / {stage['peak_rss_gb']:.2f} GB"


def tables(pipeline: list[dict]) -> str:
    lines = ["| users | items generated / after 5-core | interactions | " + " | ".join(STAGES)
             + " | epoch s | eval s (users) | test NDCG@10 |",
             "|---:|---:|---:|" + "---|" * len(STAGES) + "---:|---:|---:|"]
    for r in pipeline:
        t, prepared = r.get("train_id") or {}, r.get("prepared", {})
        lines.append(f"| {r['users']:,} | {r['items']:,} / {prepared.get('items', 0):,} | "
                     f"{prepared.get('interactions', 0):,} | "
                     + " | ".join(cell(r[s]) if s in r else "-" for s in STAGES)
                     + (f" | {t['epoch_s']} | {t['eval_s']} ({t['eval_users']:,}) | {t['test_ndcg@10']} |" if t else
                        " | - | - | - |"))
    return "\n".join(lines)


def plot(pipeline: list[dict], losses: list[dict], path: Path) -> bool:
    """Left: peak memory of one loss step against N (this run's loss rows, else the standing
    results of benchmarks/loss_memory.py). Right: each stage's peak RSS against users (per user
    count the last row)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    source = "this run"
    if not losses and (RESULTS / "loss_memory_cpu.json").exists():
        losses, source = json.loads((RESULTS / "loss_memory_cpu.json").read_text())["rows"], "loss_memory_cpu.json"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for loss in dict.fromkeys(r["loss"] for r in losses):
        rows = sorted((r for r in losses if r["loss"] == loss and "peak_added_mb" in r), key=lambda r: r["items"])
        a.plot([r["items"] for r in rows], [r["peak_added_mb"] for r in rows], marker="o", label=loss)
    a.set(xscale="log", yscale="log", xlabel="items N", ylabel="peak RSS added by one step (MB)",
          title=f"next-item loss step, batch 128 x 50 ({source})")
    if losses:
        a.legend()
    last = {r["users"]: r for r in pipeline}
    for stage in STAGES:
        rows = [r for _, r in sorted(last.items()) if "failed" not in r.get(stage, {"failed": 1})]
        b.plot([r["users"] for r in rows], [r[stage]["peak_rss_gb"] for r in rows], marker="o", label=stage)
    b.axhline(12, color="grey", linestyle="--", label="12 GB")
    b.set(xscale="log", xlabel="users", ylabel="peak RSS (GB)", title="pipeline stages, one process each")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="10000,100000,1000000", help="comma-separated user counts (items: as many)")
    p.add_argument("--items", default="", help="comma-separated item counts generated, one per --users entry "
                   "(default: as many as users; k-core 5 then drops the rarest, so generate more to keep 10^6)")
    add_config_arguments(p)
    p.add_argument("--loss-items", default="1000,10000,100000,1000000", help="item counts of the loss rows ('' = none)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per stage")
    p.add_argument("--workdir", default=None, help="where the runs go (default: the system temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--append", action="store_true", help="keep the results file's rows of other sizes")
    p.add_argument("--quality", default="", help="comma-separated configs for the loss-quality rows, e.g. "
                   "configs/ml100k.yaml,configs/ninerec_food.yaml (alone: only these rows run, merged into --out)")
    p.add_argument("--quality-losses", default="full,chunked,sampled")
    p.add_argument("--quality-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra --set for every quality run (repeatable), stated in the rows")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each quality run (0: inherit)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(RESULTS / "scale_cpu.json"))
    args = p.parse_args()
    out = Path(args.out)
    if args.quality:
        for c in args.quality.split(","):  # each row is merged into --out as soon as it is measured
            quality_rows(c, args.quality_losses.split(","), [int(s) for s in args.seeds.split(",")], args)
        print("\n" + quality_table(merge_quality(out, [])))
        return
    pipeline = []
    users = [int(u) for u in args.users.split(",") if u]
    items = [int(i) for i in args.items.split(",")] if args.items else users
    if len(items) != len(users):
        p.error("--items needs one count per --users entry")
    for n_users, n_items in zip(users, items):
        pipeline.append(pipeline_row(n_users, n_items, args))
    losses = loss_rows(args) if args.loss_items else []
    print("\n" + tables(pipeline))
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.append:  # keep the earlier rows of other sizes (e.g. one more size run on its own)
        def size(r):
            return r["users"], r["items"], r.get("popularity_exponent", 0.8)

        pipeline = [r for r in previous.get("pipeline", []) if size(r) not in {size(q) for q in pipeline}] + pipeline
        losses = losses or previous.get("losses", [])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "keep", "append")}
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()},
                               "settings": settings, "pipeline": pipeline, "losses": losses,
                               "quality": previous.get("quality", [])}, indent=2) + "\n")
    if plot(pipeline, losses, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Data-parallel scaling on this machine: samples/s of step 1 (train-id), step 2 (train-sicsrec)
and SFT with 1 vs 2 gloo ranks at the same global batch, and what pooled in-batch negatives
(all-gather across ranks, the default) cost against local negatives (each rank's own rows only).

    .venv/bin/python benchmarks/scaling.py            # CPU, the embedded default (~4-5 min on 2 cores)
    .venv/bin/python benchmarks/scaling.py --infonce-batches 1024,8192 --skip-stages   # the loss alone

Upstream stages (synth .. train-id, the demo config with 1 SFT epoch and 3 step-1 epochs) are
built once in --run-dir and reused. Every measured run is a fresh `torchrun --nproc_per_node W`
of the launcher stage in its own sub directory (upstream folders linked in), trained for a few
epochs with early stopping off; its samples/s is the stage's own metric (training time only,
evaluation excluded), and ms/step = global batch / samples/s. Every rank runs one intra-op
thread (--threads-per-rank): 2 ranks use twice the cores of 1, the usual data-parallel scaling
measure (2 OpenMP threads on a 2-core machine shared with other work collapse, which measures the
contention, not the trainer). "local" runs wrap `sicsrec.losses.info_nce` with
local_negatives=True in the worker (no collective in the loss; plain DDP's behaviour).
The InfoNCE rows time forward + backward of the loss alone (cosine, duplicate masking) on random
(global batch, 64) rows: 1 rank on the whole batch, 2 ranks pooled, 2 ranks local; the slowest
rank's mean. The table is printed and written to benchmarks/results/scaling_<cpu|cuda>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UPSTREAM = ("synth", "prepare", "shard", "label", "sft", "encode", "train-id")
UPSTREAM_SETS = ["sft.epochs=1", "train_id.epochs=3"]
# stage -> its epochs in a measured run (few: the rate settles after the first epoch)
MEASURED = {"train-id": "train_id.epochs=3", "train-sicsrec": "sicsrec.train.epochs=2", "sft": "sft.epochs=1"}
THREADS_PER_RANK = 1
NO_EARLY_STOP = ["train_id.patience=1000", "sicsrec.train.patience=1000"]
ENGINES = ["sft.engine=auto", "train_id.engine=auto", "sicsrec.train.engine=auto",  # single / DDP
           "sft.pairs_per_shard=100"]  # an even split: sft.py can leave one rank a 1-pair remainder shard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------- workers

def use_local_negatives() -> None:
    """Every InfoNCE in this process (ConCL, SFT's t2t/i2i/t2i) uses this rank's rows only."""
    import sicsrec.losses as losses

    pooled = losses.info_nce

    def local(*args, **kwargs):
        return pooled(*args, **{**kwargs, "local_negatives": True})

    losses.info_nce = local


def stage_worker(args) -> None:
    """One measured stage run (under torchrun)."""
    from launcher.config import load_config
    from launcher.stages import run
    from launcher.sweep import SWEEP_STAGES, link_upstream, with_batch
    from sicsrec.runtime import dist as distenv

    if args.local_negatives:
        use_local_negatives()
    env = distenv.init(distenv.detect())
    cfg = load_config(args.config, args.set)
    spec = SWEEP_STAGES[args.stage]
    sub = Path(args.sub_dir)
    if env.is_main:
        link_upstream(cfg, sub, spec.upstream)
    distenv.barrier()
    lr = {"train-id": cfg.train_id.lr, "train-sicsrec": cfg.sicsrec.train.lr, "sft": cfg.sft.lr}[args.stage]
    cfg = with_batch(cfg, args.stage, args.batch, lr, sub)
    start = time.time()
    manifest = run(cfg, args.stage, True)
    if env.is_main:
        metrics = manifest["metrics"]
        samples = metrics[spec.samples_metric]
        Path(args.result).write_text(json.dumps({
            "samples_per_s": samples, "ms_per_step": 1000 * args.batch / samples,
            "engine": metrics.get("engine"), "world_size": metrics.get("world_size"),
            "epochs": metrics.get("epochs_run", metrics.get("epochs")), "wall_s": time.time() - start}))
    distenv.cleanup()


def infonce_worker(args) -> None:
    """Forward + backward time of the InfoNCE alone, pooled and local, per global batch."""
    import torch
    import torch.distributed as dist

    from sicsrec.losses import info_nce
    from sicsrec.runtime import dist as distenv

    env = distenv.init(distenv.detect())
    rows = []
    for batch in args.infonce_batches:
        n = batch // env.world_size
        generator = torch.Generator().manual_seed(env.rank)
        query = torch.randn(n, 64, generator=generator, requires_grad=True)
        key = torch.randn(n, 64, generator=generator, requires_grad=True)
        ids = torch.randint(1, 10 * batch, (n,), generator=generator)
        for mode in (["pooled", "local"] if env.distributed else ["pooled"]):
            def step():
                loss = info_nce(query, key, 0.1, key_ids=ids, normalize=True,
                                local_negatives=mode == "local").loss
                loss.backward()

            for _ in range(5):  # warm-up
                step()
            distenv.barrier()
            start = time.perf_counter()
            for _ in range(args.reps):
                step()
            seconds = torch.tensor([(time.perf_counter() - start) / args.reps])
            if env.distributed:
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            rows.append({"batch": batch, "world_size": env.world_size, "negatives": mode,
                         "ms_per_step": 1000 * seconds.item()})
    if env.is_main:
        Path(args.result).write_text(json.dumps(rows))
    distenv.cleanup()


# ---------------------------------------------------------------------------------------- driver

def torchrun(world: int, worker_args: list[str], result: Path) -> dict | list:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_RANK), PYTHONPATH=str(REPO),
               RAY_USAGE_STATS_ENABLED="0", DS_BUILD_OPS="0")
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()), *worker_args,
           "--result", str(result)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def build_upstream(config: str, run_dir: Path) -> None:
    from launcher.config import load_config
    from launcher.stages import run

    cfg = load_config(config, [f"run_dir={run_dir}", *UPSTREAM_SETS])
    for name in UPSTREAM:
        run(cfg, name, False)  # skipped when its manifest matches


def measure_stages(args, out: Path) -> list[dict]:
    from tqdm import tqdm

    plan = []
    for stage, batch in (("train-id", args.batch), ("train-sicsrec", args.batch), ("sft", args.sft_batch)):
        plan += [(stage, batch, 1, "pooled"), (stage, batch, 2, "pooled")]
        if stage != "train-id":  # step 1 has no in-batch negatives
            plan.append((stage, batch, 2, "local"))
    rows = []
    for stage, batch, world, negatives in tqdm(plan, desc="stage runs"):
        sets = [f"run_dir={args.run_dir}", *UPSTREAM_SETS, *NO_EARLY_STOP, MEASURED[stage], *ENGINES]
        sub = out / f"{stage}-w{world}-{negatives}"
        worker = ["stage", "--stage", stage, "--config", args.config, "--batch", str(batch), "--sub-dir", str(sub),
                  *[a for s in sets for a in ("--set", s)]] + (["--local-negatives"] if negatives == "local" else [])
        result = torchrun(world, worker, out / f"{sub.name}.json")
        rows.append({"stage": stage, "global_batch": batch, "world_size": world, "negatives": negatives,
                     "threads_per_rank": THREADS_PER_RANK, **result})
    return rows


def measure_infonce(args, out: Path) -> list[dict]:
    batches = ",".join(map(str, args.infonce_batches))
    rows = []
    for world in (1, 2):
        rows += torchrun(world, ["infonce", "--infonce-batches", batches, "--reps", str(args.reps)],
                         out / f"infonce-w{world}.json")
    return rows


def tables(stage_rows: list[dict], loss_rows: list[dict]) -> str:
    lines = []
    if stage_rows:
        lines += ["| stage | global batch | ranks | negatives | engine | samples/s | ms/step | vs 1 rank |",
                  "|---|---:|---:|---|---|---:|---:|---:|"]
        single = {r["stage"]: r["samples_per_s"] for r in stage_rows if r["world_size"] == 1}
        for r in stage_rows:
            lines.append(f"| {r['stage']} | {r['global_batch']} | {r['world_size']} | {r['negatives']} | "
                         f"{r['engine']} | {r['samples_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                         f"{r['samples_per_s'] / single[r['stage']]:.2f}x |")
    if loss_rows:
        lines += ["", "| InfoNCE fwd+bwd, global batch | 1 rank (ms) | 2 ranks pooled (ms) | 2 ranks local (ms) |",
                  "|---:|---:|---:|---:|"]
        for batch in sorted({r["batch"] for r in loss_rows}):
            get = {(r["world_size"], r["negatives"]): r["ms_per_step"] for r in loss_rows if r["batch"] == batch}
            lines.append(f"| {batch} | {get[(1, 'pooled')]:.2f} | {get[(2, 'pooled')]:.2f} | {get[(2, 'local')]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "stage", "infonce"],
                        help="run = the benchmark (the other two are its torchrun workers)")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "scaling_bench",
                        help="where the upstream stages and the measured runs live")
    parser.add_argument("--batch", type=int, default=128, help="global batch of step 1 and step 2")
    parser.add_argument("--sft-batch", type=int, default=64, help="global batch (pairs) of SFT")
    parser.add_argument("--infonce-batches", default="256,1024,4096",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=20, help="timed InfoNCE steps per setting")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    parser.add_argument("--skip-stages", action="store_true", help="only the InfoNCE timing")
    parser.add_argument("--output", type=Path, help="default benchmarks/results/scaling_<cpu|cuda>.json")
    # worker arguments
    parser.add_argument("--stage")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--sub-dir")
    parser.add_argument("--local-negatives", action="store_true")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.mode == "stage":
        return stage_worker(args)
    if args.mode == "infonce":
        return infonce_worker(args)

    global THREADS_PER_RANK
    THREADS_PER_RANK = args.threads_per_rank
    for b in (args.batch, args.sft_batch, *args.infonce_batches):
        if b % 2:
            raise SystemExit(f"global batch sizes must be even (split over 2 ranks), got {b}")
    start = time.time()
    out = args.run_dir / "measured"
    out.mkdir(parents=True, exist_ok=True)
    stage_rows, setup_s = [], 0.0
    if not args.skip_stages:
        print(f"building the upstream stages in {args.run_dir} (skipped when done) ...", flush=True)
        build_upstream(args.config, args.run_dir)
        setup_s = time.time() - start
        stage_rows = measure_stages(args, out)
    loss_rows = measure_infonce(args, out)
    import torch

    device = "cuda" if _cuda() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
              "cores": cores(), "threads_per_rank": THREADS_PER_RANK, "torch": torch.__version__, "python": platform.python_version(),
              "setup_s": round(setup_s, 1), "measure_s": round(time.time() - start - setup_s, 1),
              "stages": stage_rows, "infonce": loss_rows, "table": tables(stage_rows, loss_rows)}
    path = args.output or REPO / "benchmarks" / "results" / f"scaling_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['table']}\n\n{len(stage_rows)} stage runs + InfoNCE in {result['measure_s']:.0f} s "
          f"(setup {setup_s:.0f} s); {cores()} cores; written to {path}")


if __name__ == "__main__":
    main()

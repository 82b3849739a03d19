"""RecBole 1.2.1's SASRec at catalogue scale, on the same synthetic data as benchmarks/scale.py,
side by side with our train-id in one run on this machine.

    .venv/bin/python benchmarks/recbole_scale.py                      # 10^4, 10^5 users + 10^6-item probe
    .venv/bin/python benchmarks/recbole_scale.py --users 10000 --max-seconds 300 --probe-items 0  # quick look

The committed results (on a CPU shared with other jobs, so with shorter budgets) came from

    .venv/bin/python benchmarks/recbole_scale.py --users 10000 --max-seconds 300
    .venv/bin/python benchmarks/recbole_scale.py --users 100000 --max-seconds 300 --eval-seconds 120 \
        --probe-items 0 --timeout 1200 --append

Per size (items generated = users, as in scale.py): `python -m launcher synth` and `prepare` write
the dataset from scale.py's own generated config (`scale.config`: scale-mode synth, popularity
exponent 0.8, 5-core, max_len 20, batch 128, hidden 64, 2 layers, 2 heads). The prepared split is
written as RecBole atomic files (`<name>.inter`: user and item tokens are the prepared ids, each
user's train items, then its valid and its test item, stamped 0, 1, 2, ... so that RecBole's
leave-one-out by time, `eval_args: {split: {LS: valid_and_test}, order: TO}`, gives our split),
and recbole_compare.compare_splits counts users whose RecBole valid/test item differs from ours.
RecBole reads only those local files (nothing is downloaded).

RecBole's SASRec (recbole_compare.recbole_config: CE over all items, i.e. loss_type CE with no
negative sampling; our hyper-parameters, FFN = hidden, ReLU, dropout 0.5, Adam 1e-3) then runs in a
child process (wall, peak RSS from os.wait4 as scale.time_stage does; RSS high-water marks after
loading / training / evaluation from inside): RecBole's own Trainer._train_epoch over its train
loader, cut at `--max-seconds` (or `--probe-steps` for the probe); if the epoch does not finish,
its time is extrapolated from the steps done (the row says so and from how many steps). Then
RecBole's full-ranking test evaluation (Trainer.evaluate: a [eval batch x items] score matrix per
batch, all items), cut at `--eval-seconds`, extrapolated to all test users if cut. Its metrics
come from a model trained for at most one (possibly partial) epoch: a sanity check, not a quality
comparison.

Ours: `launcher shard` + `train-id` (one epoch, the `sampled` loss with --negatives shared
negatives, full ranking for a seeded sample of --eval-users users) on the same config, in the same
run, unless --no-ours; then the row's ratio is RecBole's epoch seconds over ours. Otherwise our
figure is taken from benchmarks/results/scale_cpu.json for the same size, and the row says so.
The two do different work per epoch, and the table says it: RecBole trains on every prefix of
every train sequence (one target each), ours (`windows: last`) on one window of up to 21 items per
user with a target at every position; RecBole's CE scores all items for every target, ours 1,024
shared sampled negatives plus the in-batch positives.

The probe (`--probe-items`, default 10^6): the smallest size's atomic files plus a `.item` file
that declares padding items up to that many, so that RecBole's SASRec has a 10^6-item table and
CE over 10^6 items per target; `--probe-steps` training steps at the same batch and a few eval
batches, to say whether it runs here and at what peak RSS.

The CPU may be shared with other jobs: os.getloadavg() is recorded at the start of each row.
Results: benchmarks/results/recbole_scale_cpu.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from recbole_compare import (HPARAMS, compare_splits, numpy2_shims, recbole_config, recbole_data,  # noqa: E402
                             write_atomic)
from scale import add_config_arguments, config, run_stages  # noqa: E402


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def bounded(it, deadline: float, max_steps: int, count: dict):
    """Batches of the iterator `it` until the deadline or max_steps (checked before each batch)."""
    while count["steps"] < max_steps and time.perf_counter() < deadline:
        try:
            batch = next(it)
        except StopIteration:
            return
        count["steps"] += 1
        yield batch


def child(spec: dict) -> None:
    """One RecBole run (in its own process): load, bounded epoch, bounded full-ranking test eval.
    The row is rewritten after each phase, so that a killed run still says how far it got."""
    import torch

    out, work = Path(spec["out"]), Path(spec["work"])
    row = {"phase": "load"}

    def save():
        out.write_text(json.dumps(row, indent=2) + "\n")

    save()
    os.chdir(work)  # RecBole writes log/ and log_tensorboard/ into the working directory
    try:
        from recbole.model.sequential_recommender import SASRec
        from recbole.trainer import Trainer

        start = time.perf_counter()
        cfg = recbole_config(spec["dataset"], Path(spec["data_path"]), work, spec["hparams"], spec["seed"],
                             epochs=1, eval_batch_size=spec["eval_batch"], **spec.get("overrides", {}))
        dataset, train_data, valid_data, test_data = recbole_data(cfg)
        row.update(load_s=round(time.perf_counter() - start, 1), recbole_users=dataset.user_num - 1,
                   recbole_items=dataset.item_num - 1, train_samples=len(train_data._dataset),
                   steps_per_epoch=len(train_data), threads=torch.get_num_threads(), rss_after_load_gb=rss_gb())
        if spec.get("prepared"):
            row["split_check"] = compare_splits(dataset, valid_data, test_data, Path(spec["prepared"]))
        del valid_data
        model = SASRec(cfg, train_data._dataset).to(cfg["device"])
        trainer = Trainer(cfg, model)
        row["phase"] = "train"
        save()

        count = {"steps": 0}
        start = time.perf_counter()
        loss = trainer._train_epoch(bounded(iter(train_data), start + spec["max_seconds"], spec["max_steps"], count),
                                    0, show_progress=False)
        seconds = time.perf_counter() - start
        steps, total = count["steps"], len(train_data)
        row["train"] = {"steps": steps, "seconds": round(seconds, 1), "steps_per_s": round(steps / seconds, 2),
                        "samples_per_s": round(steps * cfg["train_batch_size"] / seconds),
                        "mean_loss": round(float(loss) / max(steps, 1), 4), "complete_epoch": steps == total,
                        "epoch_s": round(seconds if steps == total else seconds / steps * total, 1),
                        "epoch_s_is": "measured" if steps == total else f"extrapolated from {steps} of {total} steps"}
        row["rss_after_train_gb"] = rss_gb()
        row["phase"] = "eval"
        save()

        users = len(test_data._dataset)
        eval_count = {"steps": 0, "users": 0}
        deadline = time.perf_counter() + spec["eval_seconds"]

        class Bounded(type(test_data)):  # RecBole's own loader (Trainer.evaluate checks its type), cut in time
            def __iter__(self):
                return counted(bounded(super().__iter__(), deadline, spec["max_eval_batches"], eval_count))

        def counted(batches):
            for batch in batches:
                eval_count["users"] += len(batch[0])
                yield batch

        test_data.__class__ = Bounded
        start = time.perf_counter()
        result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        seconds = time.perf_counter() - start
        done = eval_count["users"]
        row["eval"] = {"users": done, "of_users": users, "batch": spec["eval_batch"], "seconds": round(seconds, 1),
                       "all_users_s": round(seconds if done == users else seconds / done * users, 1),
                       "all_users_s_is": "measured" if done == users else
                       f"extrapolated from {done:,} of {users:,} users",
                       "score_matrix_gb": round(spec["eval_batch"] * dataset.item_num * 4 / 2**30, 2),
                       **{f"test_{k}": round(float(v), 4) for k, v in dict(result).items()
                          if k in ("ndcg@10", "hit@10")}}
        row["rss_after_eval_gb"] = rss_gb()
        row["phase"] = "done"
    except Exception as e:  # say where and why RecBole stopped
        row["error"] = f"{row['phase']}: {type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc().splitlines()[-6:]
    save()


def run_child(spec: dict, log_path: Path, timeout: int) -> dict:
    """`child(spec)` in a fresh process: its row plus wall s, CPU s and peak RSS (os.wait4)."""
    out = Path(spec["out"])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > start + timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                killed = True
                break
            time.sleep(0.2)
    row = json.loads(out.read_text()) if out.exists() else {"phase": "start"}
    row.update(wall_s=round(time.perf_counter() - start, 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
               peak_rss_gb=round(usage.ru_maxrss / 2**20, 2))
    code = os.waitstatus_to_exitcode(status)
    if killed:
        row["error"] = f"{row['phase']}: over {timeout} s"
    elif code and "error" not in row:
        tail = log_path.read_text().strip().splitlines()[-1:]
        row["error"] = f"{row['phase']}: exit {code}" + (f" ({tail[0]})" if tail else "")
    return row


def recbole_hparams(args) -> dict:
    """recbole_compare's hyper-parameters at scale.py's sizes; FFN = hidden (our ffn_dim 0)."""
    return dict(HPARAMS, hidden=args.hidden, ffn_dim=args.hidden, max_len=args.max_len, batch_size=args.batch)


def scale_file_row(users: int, items: int, exponent: float) -> dict | None:
    """Our train-id figures for this size from benchmarks/results/scale_cpu.json, if it has them."""
    path = RESULTS / "scale_cpu.json"
    if not path.exists():
        return None
    for r in reversed(json.loads(path.read_text()).get("pipeline", [])):
        if (r["users"], r["items"], r.get("popularity_exponent", 0.8)) == (users, items, exponent) and r.get("train_id"):
            return {"epoch_s": r["train_id"]["epoch_s"], "eval_s": r["train_id"]["eval_s"],
                    "eval_users": r["train_id"]["eval_users"], "peak_rss_gb": r["train-id"]["peak_rss_gb"],
                    "source": "benchmarks/results/scale_cpu.json (an earlier scale.py run" +
                              (f", argv {' '.join(r['argv'])}" if r.get("argv") else ", argv not recorded") + ")"}
    return None


def size_row(users: int, args, probe: bool) -> list[dict]:
    import yaml

    folder = Path(tempfile.mkdtemp(prefix=f"recbole_scale_{users}_", dir=args.workdir))
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(folder / "run", users, users, args)))
    row = {"users": users, "items": users, "popularity_exponent": args.popularity_exponent, "argv": sys.argv[1:],
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    rows = [row]
    try:
        if not run_stages(row, ("synth", "prepare"), cfg_path, args.timeout, f"{users:,} users"):
            return rows
        prepared = folder / "run" / "prepare"
        stats = json.loads((prepared / "stats.json").read_text())
        row["prepared"] = {k: stats[k] for k in ("users", "items", "interactions")}
        name = f"synth_{users}"
        row["atomic"] = write_atomic(prepared, folder / "recbole", name)
        spec = {"dataset": name, "data_path": str(folder / "recbole"), "work": str(folder), "seed": args.seed,
                "hparams": recbole_hparams(args), "max_seconds": args.max_seconds, "max_steps": 10**12,
                "eval_seconds": args.eval_seconds, "eval_batch": args.eval_batch, "max_eval_batches": 10**12,
                "prepared": str(prepared), "out": str(folder / "recbole_row.json")}
        row["recbole"] = run_child(spec, folder / "recbole.log", args.timeout)
        print(f"  {users:,} users: RecBole {short(row['recbole'])}", flush=True)
        if args.ours:
            row["loadavg_before_ours"] = [round(x, 2) for x in os.getloadavg()]
            if run_stages(row, ("shard", "train-id"), cfg_path, args.timeout, f"{users:,} users"):
                m = json.loads((folder / "run" / "train_id" / "metrics.json").read_text())
                row["ours"] = {"epoch_s": round(m["seconds_per_epoch"], 1), "eval_s": round(m["eval_seconds_per_epoch"], 1),
                               "eval_users": m["test"]["users"], "peak_rss_gb": row["train-id"]["peak_rss_gb"],
                               "sequences_per_epoch": int(m["history"][0]["sequences"]),
                               "steps_per_epoch": -(-int(m["history"][0]["sequences"]) // args.batch),
                               "test_ndcg@10": round(m["test"]["ndcg@10"], 4), "source": "this run"}
        if "ours" not in row:
            row["ours"] = scale_file_row(users, users, args.popularity_exponent)
        rec, ours = row["recbole"].get("train"), row.get("ours")
        if rec and ours and ours["source"] == "this run":
            row["recbole_over_ours_epoch"] = round(rec["epoch_s"] / ours["epoch_s"], 2)
        if probe and args.probe_items:
            rows.append(probe_row(prepared, folder, row, args))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def probe_row(prepared: Path, folder: Path, base: dict, args) -> dict:
    """RecBole's SASRec with a --probe-items table (the base size's interactions, padded catalogue)."""
    name = f"synth_{base['users']}_items{args.probe_items}"
    row = {"users": base["users"], "items": args.probe_items, "probe": True, "argv": sys.argv[1:],
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
           "atomic": write_atomic(prepared, folder / "recbole", name, pad_items=args.probe_items)}
    spec = {"dataset": name, "data_path": str(folder / "recbole"), "work": str(folder), "seed": args.seed,
            "hparams": recbole_hparams(args), "max_seconds": args.max_seconds, "max_steps": args.probe_steps,
            "eval_seconds": args.eval_seconds, "eval_batch": args.probe_eval_batch,
            "max_eval_batches": args.probe_eval_batches, "prepared": str(prepared),
            "overrides": {"load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]}},
            "out": str(folder / "probe_row.json")}
    row["recbole"] = run_child(spec, folder / "probe.log", args.timeout)
    print(f"  probe {args.probe_items:,} items: RecBole {short(row['recbole'])}", flush=True)
    return row


def short(r: dict) -> dict:
    return {k: r[k] for k in ("error", "train", "eval", "peak_rss_gb", "wall_s", "split_check") if k in r}


def table(rows: list[dict]) -> str:
    head = ["users", "items (prepared / RecBole)", "RecBole train samples / steps per epoch", "RecBole s/epoch",
            "RecBole steps/s", "RecBole peak RSS", "RecBole test eval, all items", "ours train-id s/epoch (steps)",
            "RecBole / ours", "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        rec = r.get("recbole", {})
        items = f"{r['prepared']['items']:,}" if "prepared" in r else f"{r['atomic']['items']:,} + padding"
        if "recbole_items" in rec:
            items += f" / {rec['recbole_items']:,}"
        samples = f"{rec['train_samples']:,} / {rec['steps_per_epoch']:,}" if "train_samples" in rec else "-"
        t, e = rec.get("train"), rec.get("eval")
        epoch = (f"{t['epoch_s']:,.0f}" + ("" if t["complete_epoch"] else f" (extrapolated from {t['steps']} steps)")
                 if t else "-")
        if t and r.get("probe"):
            epoch = f"- ({t['steps']} steps run)"
        ev = (f"{e['all_users_s']:,.0f} s for {e['of_users']:,} users" +
              ("" if e["users"] == e["of_users"] else f" (extrapolated from {e['users']:,})") +
              f", {e['score_matrix_gb']} GB scores/batch" if e else "-")
        if "error" in rec:
            ev = f"{ev}; stopped: {rec['error']}"
        ours = r.get("ours")
        ours_cell = "-"
        if ours:
            ours_cell = (f"{ours['epoch_s']:,.0f}" + (f" ({ours['steps_per_epoch']:,})" if "steps_per_epoch" in ours else "")
                         + ("" if ours["source"] == "this run" else " (scale_cpu.json, earlier run)"))
        ratio = f"{r['recbole_over_ours_epoch']}x" if "recbole_over_ours_epoch" in r else "-"
        cells = [f"{r['users']:,}" + (" (probe)" if r.get("probe") else ""), items, samples, epoch,
                 f"{t['steps_per_s']}" if t else "-", f"{rec['peak_rss_gb']} GB" if "peak_rss_gb" in rec else "-",
                 ev, ours_cell, ratio, f"{r['loadavg_at_start'][0]}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="10000,100000", help="comma-separated user counts (items generated: as many)")
    add_config_arguments(p)  # scale.py's: batch, max length and hidden size apply to RecBole too
    p.add_argument("--max-seconds", type=int, default=900, help="RecBole training budget per size (then extrapolated)")
    p.add_argument("--eval-seconds", type=int, default=300, help="RecBole test-eval budget per size (then extrapolated)")
    p.add_argument("--eval-batch", type=int, default=256, help="RecBole eval_batch_size (users per score matrix)")
    p.add_argument("--probe-items", type=int, default=1_000_000, help="items of the probe row (0: no probe)")
    p.add_argument("--probe-steps", type=int, default=20, help="training steps of the probe")
    p.add_argument("--probe-eval-batch", type=int, default=128)
    p.add_argument("--probe-eval-batches", type=int, default=4)
    p.add_argument("--no-ours", dest="ours", action="store_false",
                   help="skip our shard + train-id (then our figure comes from scale_cpu.json)")
    p.add_argument("--seed", type=int, default=2020, help="RecBole's seed (the data: scale.py's seed 0)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per stage / RecBole process")
    p.add_argument("--workdir", default=None, help="where the runs go (default: the system temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--append", action="store_true", help="keep the results file's rows of other sizes")
    p.add_argument("--out", default=str(RESULTS / "recbole_scale_cpu.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    numpy2_shims()
    import recbole
    import torch

    loadavg = [round(x, 2) for x in os.getloadavg()]
    rows = []
    users = sorted(int(u) for u in args.users.split(",") if u)
    for n in users:
        rows.extend(size_row(n, args, probe=n == users[0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():  # keep the earlier rows of other sizes (each row states its argv)
        def key(r):
            return r["users"], r["items"], bool(r.get("probe"))

        rows = [r for r in json.loads(out.read_text())["rows"] if key(r) not in {key(q) for q in rows}] + rows
        rows.sort(key=lambda r: (r["users"], bool(r.get("probe"))))
    print("\n" + table(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "keep", "child", "append")}
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version(), "torch": torch.__version__,
                                           "recbole": recbole.__version__, "loadavg_at_start": loadavg,
                                           "shared": "the CPU may be shared with other jobs: see each row's loadavg"},
                               "argv": sys.argv[1:], "settings": settings, "recbole_hparams": recbole_hparams(args),
                               "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

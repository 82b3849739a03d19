"""Our SASRec trainer vs RecBole 1.2.1's SASRec, both trained to early stopping in one run on this
machine: does ours reach RecBole's quality, and in how much wall time?

    .venv/bin/python benchmarks/recbole_compare.py [--dataset ml100k|ninerec_food|ml100k,ninerec_food]
        [--max-epochs 300] [--patience 10] [--threads N] [--hidden 64] [--batch-size 256]

Two datasets side by side on one core each (each process rewrites only its dataset's entry in the
JSON):

    .venv/bin/python benchmarks/recbole_compare.py --dataset ml100k --threads 1 &
    .venv/bin/python benchmarks/recbole_compare.py --dataset ninerec_food --threads 1

Data. `ml100k`: recbole/dataset_example/ml-100k/ml-100k.inter (shipped inside the recbole wheel)
prepared by shards.prepare with no k-core filter (leave-one-out by time, ties in file order);
`ninerec_food`: NineRec Bili_Food as configs/ninerec_food.yaml reads it
(shards.sources.convert_ninerec, k-core 1). RecBole reads an atomic `.inter` written from our
prepared sequences (write_atomic: each user's train items, valid, test, stamped 0, 1, 2, ... so
that RecBole's stable time sort keeps our order; `eval_args: {split: {LS: valid_and_test}, order:
TO, mode: full}`), so both train and evaluate on exactly the same interactions. (RecBole's own
ML-100K loading differs for 5 users: it min-max normalises timestamps to float32, which merges
some a second apart.) compare_splits counts users whose RecBole valid/test item differs from
ours (0).

Same hyper-parameters (HPARAMS; --hidden sets the hidden and FFN size, --batch-size the train
batch, for both): hidden 64, 2 layers, 2 heads, FFN 64 with ReLU, dropout 0.5, max length 50,
Adam lr 1e-3, batch 256, CE over all items, full-ranking eval without history masking. Both
validate every epoch and stop after --patience epochs without a better valid NDCG@10 (RecBole:
`stopping_step` = patience - 1, as it stops only when the count exceeds it), at most
--max-epochs; test metrics from the best epoch.

`--ours-only` runs only our rows and puts them next to the RecBole row (and the other rows) already
stored for the dataset in --out (RecBole's row from an earlier run with the same hyper-parameters:
recorded as `recbole_row_from`); a --windows entry may end in `@B` to train that row with batches of
B windows (e.g. `all:5@64`: ~5 targets a window, ~320 targets a step against RecBole's 256).

Rows: RecBole, then ours with `windows: all` (windows of up to max_len + 1 items, a target at
every position: every train item is a target once per epoch, in far fewer rows and optimizer
steps than RecBole), `all:S` (the same with window_stride S: windows S items apart, the loss on
each one's last S targets, so every target sees at least max_len + 1 - S items of context) and
with `windows: prefix` (RecBole's rows: one per train target, up to
max_len items of context, the loss on that target only). All rows of a dataset run one after the
other in this process, under the same load and --threads.

Wall time: per epoch, the cumulative train + validation seconds from the start of training
(dataset building, checkpointing and the final test evaluation excluded; RecBole's dataset
building and each row's whole run are reported separately, `build_s` and `run_s`). Time to
quality: the wall time at which a row's valid NDCG@10 first reaches RecBole's best valid NDCG@10
("not reached" otherwise), and its ratio to RecBole's wall time to its own best epoch. The bar
(issue #17): ours reaches it in at most half of RecBole's time and ends with test NDCG@10 at or
above RecBole's.

Writes benchmarks/results/recbole_compare.json as {"datasets": {name: {...}}} (the datasets of
this run replace theirs, others are kept). If RecBole cannot run, the reason is printed and
recorded, and only our rows are reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.canonical import read_canonical  # noqa: E402
from shards.prepare import prepare  # noqa: E402
from shards.prepared import PreparedDataset  # noqa: E402
from shards.sources import convert_ml100k, convert_ninerec  # noqa: E402
from sicsrec.config import TrainConfig  # noqa: E402
from sicsrec.train import train_id  # noqa: E402

HPARAMS = dict(hidden=64, layers=2, heads=2, ffn_dim=64, activation="relu", dropout=0.5, max_len=50, lr=1e-3,
               batch_size=256)
DATASETS = ("ml100k", "ninerec_food")
FOOD_CONFIG = REPO / "configs" / "ninerec_food.yaml"
RECBOLE = "RecBole SASRec"
OUR_WINDOWS = ("all", "prefix")
METRIC = "ndcg@10"


def numpy2_shims() -> None:
    """RecBole 1.2.1 predates numpy 2 (np.float etc. were removed): restore the aliases at run time
    (harmless if unused; site-packages stay untouched)."""
    for name, value in {"float": float, "int": int, "bool": bool, "object": object, "long": int,
                        "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}.items():
        if not hasattr(np, name):
            setattr(np, name, value)


def build_ours(dataset: str, work: Path) -> Path:
    """The dataset -> canonical (shards.sources) -> prepared in work/prepare."""
    if dataset == "ml100k":
        convert_ml100k(None, work / "raw")
        kcore = 1
    else:
        data = yaml.safe_load(FOOD_CONFIG.read_text())["data"]
        convert_ninerec(REPO / data["source"], work / "raw", data.get("title_field", "english"))
        kcore = data["kcore"]
    ds = prepare(read_canonical(work / "raw"), k=kcore)
    ds.save(work / "prepare")
    return work / "prepare"


def write_atomic(prepared: Path, data_path: Path, name: str, pad_items: int = 0) -> dict:
    """The prepared split as RecBole atomic files in <data_path>/<name>/: `<name>.inter` (each user's
    train items, valid, test, stamped by position) and, with pad_items, `<name>.item` listing every
    item plus padding items up to pad_items in all."""
    start = time.perf_counter()
    ds = PreparedDataset.load(prepared)
    token = [i.item_id for i in ds.items]
    folder = data_path / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in ds.users:
            seq = [*u.train, u.valid, u.test]
            f.write("".join(f"{u.user_id}\t{token[i]}\t{t}\n" for t, i in enumerate(seq)))
            rows += len(seq)
    if pad_items:
        with open(folder / f"{name}.item", "w") as f:
            f.write("item_id:token\n")
            f.write("".join(f"{t}\n" for t in token[1:]))
            f.write("".join(f"pad_{k}\n" for k in range(max(0, pad_items - ds.num_items))))
    return {"interactions": rows, "items": ds.num_items, "declared_items": max(pad_items, ds.num_items),
            "write_s": round(time.perf_counter() - start, 1)}


def recbole_config(dataset: str, data_path: Path, work: Path, hparams: dict, seed: int, **overrides):
    """RecBole's Config for its SASRec on local atomic files `<data_path>/<dataset>/<dataset>.inter`
    (RecBole downloads only when they are missing): our hyper-parameters, CE over all items,
    leave-one-out by time, full-ranking eval on the CPU. `overrides` replace or add config keys."""
    numpy2_shims()
    from recbole.config import Config

    return Config(model="SASRec", dataset=dataset, config_dict={
        "data_path": str(data_path), "checkpoint_dir": str(work / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": hparams["max_len"], "hidden_size": hparams["hidden"],
        "inner_size": hparams["ffn_dim"], "hidden_act": hparams["activation"], "n_layers": hparams["layers"],
        "n_heads": hparams["heads"], "hidden_dropout_prob": hparams["dropout"],
        "attn_dropout_prob": hparams["dropout"], "loss_type": "CE", "train_neg_sample_args": None,
        "learning_rate": hparams["lr"], "train_batch_size": hparams["batch_size"], "eval_batch_size": 1024,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"], "topk": [5, 10, 20], "valid_metric": "NDCG@10",
        "device": "cpu", "use_gpu": False, "seed": seed, "reproducibility": True, "show_progress": False,
        "log_wandb": False, "state": "WARNING", **overrides,
    })


def recbole_data(config):
    """RecBole's dataset and its train / valid / test loaders (seeded as RecBole's own run does)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger().setLevel(logging.WARNING)
    dataset = create_dataset(config)
    return (dataset, *data_preparation(config, dataset))


def recbole_source(dataset: str, prepared: Path, work: Path) -> tuple[str, Path]:
    """(RecBole dataset name, its data_path): our prepared split as atomic files, so that both train
    and evaluate on exactly the same interactions (for ML-100K prepared from RecBole's own file)."""
    write_atomic(prepared, work / "recbole", dataset)
    return dataset, work / "recbole"


def run_recbole(dataset: str, hparams: dict, max_epochs: int, patience: int, seed: int, work: Path,
                prepared: Path) -> dict:
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    run_start = time.time()
    name, data_path = recbole_source(dataset, prepared, work)
    # RecBole stops once more than stopping_step epochs in a row did not improve; ours after patience.
    # 6 decimals: RecBole rounds metrics (4 by default), and its best valid NDCG@10 is our target.
    config = recbole_config(name, data_path, work, hparams, seed, epochs=max_epochs, stopping_step=patience - 1,
                            eval_step=1, metric_decimal_place=6)
    data, train_data, valid_data, test_data = recbole_data(config)
    build_s = time.time() - run_start
    split_check = compare_splits(data, valid_data, test_data, prepared)
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    train_times, eval_times, valid_scores = [], [], []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*args, **kwargs):
        start = time.time()
        out = train_epoch(*args, **kwargs)
        train_times.append(time.time() - start)
        return out

    def timed_valid(*args, **kwargs):
        start = time.time()
        out = valid_epoch(*args, **kwargs)
        eval_times.append(time.time() - start)
        valid_scores.append(float(out[0]))
        return out

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
    torch_load = torch.load  # RecBole's checkpoint pickles its Config: torch >= 2.6 needs weights_only=False
    torch.load = lambda *a, **kw: torch_load(*a, **dict(kw, weights_only=False))
    try:
        test = dict(trainer.evaluate(test_data, load_best_model=True, show_progress=False))
    finally:
        torch.load = torch_load
    # RecBole keeps the last epoch of equal best scores (`>=` in its early_stopping)
    best_epoch = max(range(len(valid_scores)), key=lambda e: (valid_scores[e], e))
    return row_summary(curve(train_times, eval_times, valid_scores), best_epoch, test, train_times, eval_times,
                       samples=len(train_data._dataset), steps=len(train_data), run_s=time.time() - run_start,
                       build_s=build_s, split_check=split_check)


def curve(train_times: list, eval_times: list, valid_scores: list) -> list[dict]:
    """Per epoch: the cumulative train + validation seconds and the valid NDCG@10."""
    wall = np.cumsum(np.add(train_times, eval_times))
    return [{"epoch": e, "wall_s": float(w), f"valid_{METRIC}": v} for e, (w, v) in enumerate(zip(wall, valid_scores))]


def row_summary(points: list[dict], best_epoch: int, test: dict, train_times: list, eval_times: list, samples: int,
                steps: int, **extra) -> dict:
    """One row of the table from its curve, its best epoch and its test metrics."""
    per_epoch = float(np.mean(train_times))
    return {f"best_valid_{METRIC}": points[best_epoch][f"valid_{METRIC}"], "test_ndcg@10": float(test["ndcg@10"]),
            "test_hit@10": float(test["hit@10"]), "best_epoch": best_epoch, "epochs_run": len(points),
            "wall_s_to_best": points[best_epoch]["wall_s"], "wall_s": points[-1]["wall_s"],
            "seconds_per_epoch": per_epoch, "eval_seconds_per_epoch": float(np.mean(eval_times)),
            "train_rows_per_epoch": samples, "steps_per_epoch": steps,
            "test": {k: float(v) for k, v in test.items()}, **extra, "curve": points}


def parse_windows(spec: str) -> tuple[str, int, int | None]:
    """A --windows entry: `all`, `prefix` or `all:S` (windows=all, window_stride=S), optionally
    followed by `@B` (our batch of B windows instead of the shared batch size) -> (windows, stride, batch)."""
    body, at, batch = spec.partition("@")
    windows, sep, stride = body.partition(":")
    if (windows not in OUR_WINDOWS or (sep and (windows != "all" or not stride.isdigit() or int(stride) < 1))
            or (at and (not batch.isdigit() or int(batch) < 1))):
        raise ValueError(f"--windows entry {spec!r}: expected one of {', '.join(OUR_WINDOWS)} or all:S (S >= 1), "
                         "optionally with @B (B >= 1 windows per batch)")
    return windows, int(stride or 0), int(batch) if at else None


def run_ours(prepared: Path, out: Path, hparams: dict, windows: str, max_epochs: int, patience: int,
             seed: int) -> dict:
    # trim_padding: our batches cost their longest history, not max_len (the same model function)
    windows, stride, batch = parse_windows(windows)
    hparams = hparams | ({"batch_size": batch} if batch else {})
    cfg = TrainConfig(**hparams, windows=windows, window_stride=stride, epochs=max_epochs, patience=patience,
                      engine="single", precision="fp32", trim_padding=True)
    start = time.time()
    train_id(cfg, prepared, out, seed=seed, force=True)
    run_s = time.time() - start
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [h for h in metrics["history"] if not h.get("start")]
    train_times, eval_times = [h["seconds"] for h in epochs], [h["eval_seconds"] for h in epochs]
    rows = int(epochs[0]["sequences"])
    row = row_summary(curve(train_times, eval_times, [h[f"valid_{METRIC}"] for h in epochs]), metrics["best_epoch"],
                      metrics["test"], train_times, eval_times, samples=rows,
                      steps=-(-rows // hparams["batch_size"]), run_s=run_s)
    row.update(targets_per_s=metrics["targets_per_s"], batch_size=hparams["batch_size"])
    return row


def time_to_reach(points: list[dict], target: float) -> float | None:
    """The wall time of the first epoch whose valid NDCG@10 is >= target; None if none is."""
    return next((p["wall_s"] for p in points if p[f"valid_{METRIC}"] >= target), None)


def time_to_quality(rows: dict) -> dict:
    """For each of our rows: when it reaches RecBole's best valid NDCG@10, the ratio to RecBole's
    time to its best epoch, and whether it meets the bar (ratio <= 0.5 and test NDCG@10 >= RecBole's)."""
    rec = rows.get(RECBOLE, {})
    if "curve" not in rec:
        return {}
    target, rec_s = rec[f"best_valid_{METRIC}"], rec["wall_s_to_best"]
    out = {}
    for name, r in rows.items():
        if name == RECBOLE or "curve" not in r:
            continue
        reached = time_to_reach(r["curve"], target)
        ratio = None if reached is None else reached / rec_s
        out[name] = {"recbole_best_valid": target, "recbole_wall_s_to_best": rec_s, "wall_s_to_reach": reached,
                     "ratio": ratio, "test_ndcg@10_vs_recbole": r["test_ndcg@10"] - rec["test_ndcg@10"],
                     "meets_bar": ratio is not None and ratio <= 0.5 and r["test_ndcg@10"] >= rec["test_ndcg@10"]}
    return out


def compare_splits(dataset, valid_data, test_data, prepared: Path) -> dict:
    """Check that RecBole's valid/test target of every user equals ours."""
    ours = {u.user_id: (u.valid, u.test) for u in PreparedDataset.load(prepared).users}
    item_of = {i.item: i.item_id for i in PreparedDataset.load(prepared).items}
    theirs = {}
    for name, data in (("valid", valid_data), ("test", test_data)):
        inter = data._dataset.inter_feat
        users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())
        for u, i in zip(users, items):
            theirs.setdefault(u, {})[name] = i
    mismatched = sum(1 for u, (v, t) in ours.items()
                     if theirs.get(u, {}) != {"valid": item_of[v], "test": item_of[t]})
    return {"users_ours": len(ours), "users_recbole": len(theirs), "users_with_different_targets": mismatched}


def table(rows: dict, quality: dict) -> str:
    head = ["", "best valid NDCG@10", "test NDCG@10", "test Hit@10", "best/run epochs", "s/epoch (train+eval)",
            "steps/epoch", "wall s to best", "wall s to RecBole's best valid", "ratio to RecBole's time to best"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, r in rows.items():
        if "error" in r:
            lines.append(" | ".join([name, "failed: " + r["error"].splitlines()[0]] + [""] * (len(head) - 2)))
            continue
        q = quality.get(name)
        reach = ratio = "-"
        if q:
            reach = "not reached" if q["wall_s_to_reach"] is None else f"{q['wall_s_to_reach']:.1f}"
            ratio = "-" if q["ratio"] is None else f"{q['ratio']:.2f}"
        lines.append(" | ".join([name, f"{r[f'best_valid_{METRIC}']:.4f}", f"{r['test_ndcg@10']:.4f}",
                                 f"{r['test_hit@10']:.4f}", f"{r['best_epoch']}/{r['epochs_run']}",
                                 f"{r['wall_s'] / r['epochs_run']:.2f}", str(r["steps_per_epoch"]),
                                 f"{r['wall_s_to_best']:.1f}", reach, ratio]))
    return "\n".join("| " + line + " |" for line in lines)


def hyper_parameters(args) -> dict:
    hparams = dict(HPARAMS)
    if args.hidden:
        hparams.update(hidden=args.hidden, ffn_dim=args.hidden)
    if args.batch_size:
        hparams["batch_size"] = args.batch_size
    return hparams


def stored_entry(out: Path, dataset: str, hparams: dict) -> dict:
    """This dataset's entry in an earlier results file, for --ours-only: it must hold a RecBole row
    run with the same hyper-parameters."""
    entry = json.loads(out.read_text()).get("datasets", {}).get(dataset) if out.exists() else None
    if not entry or "curve" not in entry.get("rows", {}).get(RECBOLE, {}):
        raise SystemExit(f"--ours-only: {out} has no finished RecBole row for {dataset}; run without it first")
    if entry["hyper_parameters"] != hparams:
        raise SystemExit(f"--ours-only: the stored {dataset} RecBole row used {entry['hyper_parameters']}, "
                         f"this run {hparams}")
    return entry


def run_recbole_in(work: Path, dataset: str, hparams: dict, args, prepared: Path, entry: dict) -> dict:
    """RecBole's row, run in work/ (it writes log/ and log_tensorboard/ into the working directory);
    an exception is recorded as the row's error."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        entry["loadavg_at_start"][RECBOLE] = os.getloadavg()
        return run_recbole(dataset, hparams, args.max_epochs, args.patience, args.seed, work, prepared)
    except Exception as e:  # report exactly why RecBole could not run
        return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    finally:
        os.chdir(cwd)


def run_dataset(dataset: str, args) -> dict:
    """RecBole's row and our rows on one dataset, one after the other in this process (with
    --ours-only, our rows next to the RecBole row of an earlier run, kept with the entry's other rows)."""
    hparams = hyper_parameters(args)
    stored = stored_entry(Path(args.out), dataset, hparams) if args.ours_only else None
    entry = {"hyper_parameters": hparams, "max_epochs": args.max_epochs, "patience": args.patience,
             "seed": args.seed, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
             "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    rows = {}
    with tempfile.TemporaryDirectory(prefix=f"recbole_compare_{dataset}_") as tmp:
        work = Path(tmp)
        start = time.time()
        prepared = build_ours(dataset, work)
        entry["ours_prepare_s"] = time.time() - start
        entry["dataset"] = PreparedDataset.load(prepared).stats
        entry["loadavg_at_start"] = {}
        if not stored:
            rows[RECBOLE] = run_recbole_in(work, dataset, hparams, args, prepared, entry)
        for windows in args.windows.split(","):
            name = f"ours SASRec (windows={windows})"
            entry["loadavg_at_start"][name] = os.getloadavg()
            row_dir = work / f"ours_{windows.replace(':', '_').replace('@', '_b')}"
            rows[name] = run_ours(prepared, row_dir, hparams, windows, args.max_epochs, args.patience, args.seed)
            rows[name].update(argv=sys.argv[1:], threads=torch.get_num_threads())
    if stored:  # the stored rows first (RecBole's among them), this run's rows replace their namesakes
        stored = stored_entry(Path(args.out), dataset, hparams)  # re-read: another run may have added rows
        entry["loadavg_at_start"] = stored.get("loadavg_at_start", {}) | entry["loadavg_at_start"]
        rows = stored["rows"] | rows
        entry["recbole_row_from"] = {"argv": stored["argv"], "threads": stored["threads"]}
    entry["rows"] = rows
    entry["time_to_quality"] = time_to_quality(rows)
    return entry


def write_result(out: Path, entries: dict) -> None:
    """Replace this run's datasets in the JSON, keep the others (a side-by-side run writes its own)."""
    result = {"datasets": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if "datasets" in old:  # an older layout (rows at the top, ML-100K only) is replaced
            result = old
    result["datasets"].update(entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml100k",
                        help=f"one of {', '.join(DATASETS)}, or a comma list (run one after the other)")
    parser.add_argument("--max-epochs", type=int, default=300, help="epoch cap for every row (early stopping first)")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without a better valid NDCG@10")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"hidden and FFN size for both (default {HPARAMS['hidden']})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"train batch for both (default {HPARAMS['batch_size']})")
    parser.add_argument("--windows", default=",".join(OUR_WINDOWS),
                        help=f"our rows: comma-separated train_id.windows of {OUR_WINDOWS}, or all:S for "
                             "windows=all with window_stride=S (overlapping windows, the loss on each one's last "
                             "S targets); a trailing @B trains that row with batches of B windows (all:5@64: "
                             "~5 targets a window, so ~320 targets a step against RecBole's 256)")
    parser.add_argument("--ours-only", action="store_true",
                        help="run only our rows and compare them with the RecBole row already in --out for the "
                             "dataset (same hyper-parameters; the stored rows are kept, ours replace their "
                             "namesakes); each row records its argv and threads")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recbole_compare.json"))
    args = parser.parse_args()
    datasets = args.dataset.split(",")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        parser.error(f"unknown --dataset {', '.join(unknown)}; expected {', '.join(DATASETS)}")
    try:
        [parse_windows(spec) for spec in args.windows.split(",")]
    except ValueError as e:
        parser.error(str(e))
    if args.patience < 1:
        parser.error("--patience must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    entries = {}
    for dataset in datasets:
        entries[dataset] = entry = run_dataset(dataset, args)
        print(f"\n{dataset} ({entry['threads']} threads)\n" + table(entry["rows"], entry["time_to_quality"]))
        split = entry["rows"][RECBOLE].get("split_check")
        if split:
            print(f"split check: {split}")
        for name, q in entry["time_to_quality"].items():
            reach = ("does not reach it" if q["ratio"] is None else
                     f"reaches it at {q['wall_s_to_reach']:.1f} s = {q['ratio']:.2f}x RecBole's")
            print(f"{name}: {reach} (RecBole: {q['recbole_best_valid']:.4f} at {q['recbole_wall_s_to_best']:.1f} s), "
                  f"test NDCG@10 {q['test_ndcg@10_vs_recbole']:+.4f} vs RecBole; bar (<= 0.5x, >= 0): "
                  + ("met" if q["meets_bar"] else "not met"))
    write_result(Path(args.out), entries)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

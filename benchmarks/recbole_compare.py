"""Our SASRec trainer vs RecBole 1.2.1's SASRec on MovieLens-100K, in one run on this machine.

    .venv/bin/python benchmarks/recbole_compare.py [--epochs 4] [--patience 10] [--extra-epochs 40]

Both read the same file, recbole/dataset_example/ml-100k/ml-100k.inter (shipped inside the
recbole wheel). Same split: leave-one-out by time, ties in file order (RecBole: stable sort,
`eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`; ours: shards.prepare with no
k-core filter); the script counts users whose valid or test item differs between the two. (A few
do: RecBole min-max normalises float fields, timestamps included (`normalize_all: True` in its
ml-100k.yaml), and keeps them as float32, which merges timestamps about a second apart; its
stable sort then keeps file order where ours sorts by the exact time.) Same
hyper-parameters: hidden 64, 2 layers, 2 heads, FFN 64 with ReLU, dropout 0.5, max length 50,
Adam lr 1e-3, batch 256, CE over all items, full-ranking eval without history masking, early
stopping on valid NDCG@10 with the same patience, test metrics from the best epoch.

What a "sequence" is differs, and the table says it: RecBole trains on every prefix of every
train sequence (one target each, ~97k samples per epoch), ours on windows of up to 51 items with a
target at every position (`windows: all`: every train item is a target once per epoch, like
RecBole, but in ~2.4k sequences). Both see the same targets per epoch; ours makes ~38x fewer
optimizer steps per epoch. So the table also shows ours trained until early stopping.

Writes benchmarks/results/recbole_compare.json. If RecBole cannot run, the reason is printed
and recorded, and only our rows are reported.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.canonical import read_canonical  # noqa: E402
from shards.prepare import prepare  # noqa: E402
from shards.prepared import PreparedDataset  # noqa: E402
from shards.sources import convert_ml100k, recbole_ml100k_dir  # noqa: E402
from sicsrec.config import TrainConfig  # noqa: E402
from sicsrec.train import train_id  # noqa: E402

HPARAMS = dict(hidden=64, layers=2, heads=2, ffn_dim=64, activation="relu", dropout=0.5, max_len=50, lr=1e-3,
               batch_size=256)


def numpy2_shims() -> None:
    """RecBole 1.2.1 predates numpy 2 (np.float etc. were removed): restore the aliases at run time
    (harmless if unused; site-packages stay untouched)."""
    for name, value in {"float": float, "int": int, "bool": bool, "object": object, "long": int,
                        "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}.items():
        if not hasattr(np, name):
            setattr(np, name, value)


def build_ours(work: Path) -> Path:
    """recbole's ml-100k.inter -> canonical (shards.sources) -> prepared, no k-core filter."""
    convert_ml100k(None, work / "raw")
    ds = prepare(read_canonical(work / "raw"), k=1)
    ds.save(work / "prepare")
    return work / "prepare"


def run_ours(prepared: Path, out: Path, epochs: int, patience: int, seed: int) -> dict:
    cfg = TrainConfig(**HPARAMS, windows="all", epochs=epochs, patience=patience, engine="single", precision="fp32")
    train_id(cfg, prepared, out, seed=seed, force=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test_ndcg@10": metrics["test"]["ndcg@10"], "test_hit@10": metrics["test"]["hit@10"],
            "valid_ndcg@10": metrics["valid"]["ndcg@10"], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "seconds_per_epoch": metrics["seconds_per_epoch"],
            "eval_seconds_per_epoch": metrics["eval_seconds_per_epoch"],
            "sequences_per_s": metrics["sequences_per_s"], "targets_per_s": metrics["targets_per_s"],
            "steps_per_epoch": -(-int(metrics["history"][0]["sequences"]) // HPARAMS["batch_size"]),
            "test": metrics["test"]}


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


def run_recbole(epochs: int, patience: int, seed: int, work: Path, prepared: Path) -> dict:
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    config = recbole_config("ml-100k", recbole_ml100k_dir().parent, work, HPARAMS, seed,
                            epochs=epochs, stopping_step=patience, eval_step=1)
    dataset, train_data, valid_data, test_data = recbole_data(config)
    split_check = compare_splits(dataset, valid_data, test_data, prepared)
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
        valid_scores.append(out[0])
        return out

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    _, best_valid = trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
    torch_load = torch.load  # RecBole's checkpoint pickles its Config: torch >= 2.6 needs weights_only=False
    torch.load = lambda *a, **kw: torch_load(*a, **dict(kw, weights_only=False))
    try:
        test = dict(trainer.evaluate(test_data, load_best_model=True, show_progress=False))
    finally:
        torch.load = torch_load
    samples = len(train_data._dataset)
    per_epoch = float(np.mean(train_times))
    return {"test_ndcg@10": test["ndcg@10"], "test_hit@10": test["hit@10"], "valid_ndcg@10": best_valid["ndcg@10"],
            "best_epoch": int(np.argmax(valid_scores)),
            "epochs_run": len(train_times), "seconds_per_epoch": per_epoch,
            "eval_seconds_per_epoch": float(np.mean(eval_times)), "sequences_per_s": samples / per_epoch,
            "targets_per_s": samples / per_epoch, "steps_per_epoch": len(train_data),
            "test": {k: float(v) for k, v in test.items()}, "split_check": split_check}


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


def table(rows: dict) -> str:
    head = ["", "test NDCG@10", "test Hit@10", "best/run epochs", "s/epoch (train)", "s/epoch (eval)",
            "sequences/s", "targets/s", "steps/epoch"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, r in rows.items():
        if "error" in r:
            lines.append(" | ".join([name, "failed: " + r["error"].splitlines()[-1]] + [""] * (len(head) - 2)))
            continue
        lines.append(" | ".join([name, f"{r['test_ndcg@10']:.4f}", f"{r['test_hit@10']:.4f}",
                                 f"{r['best_epoch']}/{r['epochs_run']}", f"{r['seconds_per_epoch']:.2f}",
                                 f"{r['eval_seconds_per_epoch']:.2f}", f"{r['sequences_per_s']:.0f}",
                                 f"{r['targets_per_s']:.0f}", str(r["steps_per_epoch"])]))
    return "\n".join("| " + line + " |" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs for both (same early stopping)")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--extra-epochs", type=int, default=40,
                        help="max epochs of the extra 'ours until early stopping' row (0 skips it)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recbole_compare.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    rows, notes = {}, {}
    with tempfile.TemporaryDirectory(prefix="recbole_compare_") as tmp:
        work = Path(tmp)
        prepared = build_ours(work)
        cwd = os.getcwd()
        os.chdir(work)  # RecBole writes log/ and log_tensorboard/ into the working directory
        try:
            rows["RecBole SASRec"] = run_recbole(args.epochs, args.patience, args.seed, work, prepared)
        except Exception as e:  # report exactly why RecBole could not run
            rows["RecBole SASRec"] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        finally:
            os.chdir(cwd)
        rows[f"ours SASRec ({args.epochs} epochs)"] = run_ours(prepared, work / "ours", args.epochs, args.patience,
                                                                args.seed)
        if args.extra_epochs:
            rows["ours SASRec (until early stop)"] = run_ours(prepared, work / "ours_long", args.extra_epochs,
                                                              args.patience, args.seed)
        notes["dataset"] = PreparedDataset.load(prepared).stats
    result = {"hyper_parameters": HPARAMS, "epochs": args.epochs, "patience": args.patience, "seed": args.seed,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "rows": rows, **notes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    split = rows["RecBole SASRec"].get("split_check")
    if split:
        print(f"\nsplit check: {split}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

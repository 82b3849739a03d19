"""Quality table on a real dataset: SASRec, GRU4Rec, SASRec-Content, SASRec-Hybrid, SICSRec and
its ablations (Table 7), modality inputs (Table 8) and training strategies (Table 9, rows named
after `sicsrec.strategy`: the `sicsrec` row and the ablations are fixed_id_emb_enc, the strategy
they were measured with; `fixed_id_enc` is the paper's headline one).

    .venv/bin/python benchmarks/quality.py --config configs/ninerec_food.yaml [--seeds 0,1,2]
        [--rows sasrec,sicsrec,...] [--quick] [--skip-upstream] [--run-dir DIR] [--set key=value ...]
        [--tag NAME] [--table-only]

1. Upstream stages (prepare, shard, label, sft, encode) run through the launcher, each skipped
   when its manifest matches. `--skip-upstream` runs none of them and only checks that
   <run_dir>/{prepare,embeddings} are finished (e.g. folders prepared on CPU and carried to a
   GPU machine, which needs neither Ray nor the text-encoder weights then).
2. Every row runs once per seed, all on the same leave-one-out split, in its own run folder
   <run_dir>/quality[/<tag>]/seed<S>/<row>/ (upstream folders linked in), so re-runs skip what is
   done (stage manifests) and rows can be split across invocations. All SICSRec rows of a seed
   share that seed's step-1 SASRec (the `sasrec` row). Selection is on validation NDCG@10
   (early stopping); the table reports test Hit/NDCG@5,10,20 as mean ± std over seeds, and a
   second table the test ranking diagnostics (`sicsrec.evaluate`, diagnostics=True): Hit@1, MRR,
   median rank (1-based), the share of users whose top-1 item is a history item / their last item,
   and the share of test targets that repeat a history item ("n/a" for results saved before
   them; "(n=K)" when only K of the row's seeds have them).
3. Results merge into benchmarks/results/quality_<config stem>.json (per row and seed: test,
   valid, best/run epochs, seconds, overrides) under "rows" ("quick" with --quick, which runs in
   <run_dir>/quality-quick); a markdown table is printed. `--tag NAME` files the rows under
   "tuning"[NAME] instead (a settings search: give the settings with --set; the tagged rows share
   the seed's step 1 unless the settings change train_id.*). Invocations may run side by side on
   different rows or seeds (each result is merged into the file under a lock), as long as no two
   of them train the same seed's step 1 (the `sasrec` row) at once. `--table-only` prints the
   tables of the results file (the section --quick / --tag select) and runs nothing.

A row is a name and a function (run_dir, seed, cfg) -> metrics dict with "test" and "valid":
`ROWS["tssr"] = Row("TSSR", my_function)` adds one (cfg.run_dir == run_dir, cfg.seed == seed).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from launcher import stages  # noqa: E402
from launcher.config import Config, load_config, to_dict  # noqa: E402
from sicsrec.runtime.rundir import read_manifest, write_json  # noqa: E402

KEYS = [f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)]
# test ranking diagnostics (sicsrec.evaluate, diagnostics=True); results saved before them lack them
DIAGNOSTICS = ["hit@1", "mrr", "median_rank", "top1_in_history", "top1_is_last", "target_is_repeat"]
UPSTREAM = ["prepare", "shard", "label", "sft", "encode"]
LINKED = ["prepare", "shards", "embeddings"]  # upstream stage folders every row reads


@dataclass
class Row:
    label: str
    run: Callable[[Path, int, Config], dict]
    needs_images: bool = False  # skipped where the embedding cache has no images


def _with(cfg: Config, **sicsrec) -> Config:
    return dataclasses.replace(cfg, sicsrec=dataclasses.replace(cfg.sicsrec, **sicsrec))


def _step1(seed_dir: Path, cfg: Config) -> dict:
    """The seed's SASRec step 1 (shared by the `sasrec` row and every SICSRec row)."""
    from sicsrec.train import train_id

    return train_id(cfg.train_id, seed_dir / "prepare", seed_dir / "train_id", cfg.seed,
                    embeddings_dir=seed_dir / "embeddings")["metrics"]


def sasrec(run_dir: Path, seed: int, cfg: Config) -> dict:
    return _step1(run_dir, cfg)  # this row's folder is the seed folder itself


def gru4rec(run_dir: Path, seed: int, cfg: Config) -> dict:
    from sicsrec.train import train_id

    train = dataclasses.replace(cfg.train_id, model="gru4rec", layers=1, dropout=0.3)
    return train_id(train, run_dir / "prepare", run_dir / "train_id", seed)["metrics"]


def content_row(variant: str):
    def run(run_dir: Path, seed: int, cfg: Config) -> dict:
        return stages.run(cfg, f"train-{variant}")["metrics"]

    return run


def sicsrec_row(**changes):
    def run(run_dir: Path, seed: int, cfg: Config) -> dict:
        _step1(run_dir.parent, cfg)
        _link(run_dir.parent / "train_id", run_dir / "train_id")
        return stages.run(_with(cfg, **changes), "train-sicsrec")["metrics"]

    return run


def tssr(run_dir: Path, seed: int, cfg: Config) -> dict:
    """TSSR (issue #6): the two-stream model on the same split and seed. By default it reads the
    frozen embedding cache (tssr.content=cache); `--set tssr.content=end_to_end` trains the
    encoders in the loop instead (GPU; needs <run_dir>/sft or the encoder weights)."""
    return stages.run(cfg, "train-tssr")["metrics"]


# SICSRec rows pin sicsrec.strategy, so they keep their meaning whatever the config default is.
# "sicsrec" and the ablations were measured with the earlier default `fixed_id`, i.e. Table 9's
# fixed_id_emb_enc (E_id and the step-1 encoder frozen, LoRA); "fixed_id_enc" is the paper's
# headline strategy (encoder frozen + LoRA, E_id trained and regularised) and today's default.
# end_to_end keeps E_id out of the lambda term (reg_id_emb=false), as when its results were measured.
FIXED_ID = "fixed_id_emb_enc"
ROWS: dict[str, Row] = {
    "sasrec": Row("SASRec (ID)", sasrec),
    "gru4rec": Row("GRU4Rec (ID)", gru4rec),
    "sasrec_content": Row("SASRec-Content", content_row("content")),
    "sasrec_hybrid": Row("SASRec-Hybrid", content_row("hybrid")),
    "sicsrec": Row("SICSRec (Fixed IDEmb&Enc)", sicsrec_row(strategy=FIXED_ID)),
    "fixed_id_enc": Row("SICSRec (Fixed IDEnc)", sicsrec_row(strategy="fixed_id_enc")),
    "wo_imse": Row("w/o IMSE (and MMSD)", sicsrec_row(strategy=FIXED_ID, use_imse=False, use_mmsd=False)),
    "wo_cmse": Row("w/o CMSE (and MMSD)", sicsrec_row(strategy=FIXED_ID, use_cmse=False, use_mmsd=False)),
    "wo_mmsd": Row("w/o MMSD", sicsrec_row(strategy=FIXED_ID, use_mmsd=False)),
    "wo_concl": Row("w/o ConCL (alpha 0)", sicsrec_row(strategy=FIXED_ID, alpha=0.0)),
    "wo_lora": Row("w/o LoRA", sicsrec_row(strategy=FIXED_ID, use_lora=False)),
    "wo_l2norm": Row("w/o L2-norm", sicsrec_row(strategy=FIXED_ID, l2norm=False), needs_images=True),
    "id_t": Row("SICSRec ID+T", sicsrec_row(strategy=FIXED_ID, use_image=False), needs_images=True),
    "id_v": Row("SICSRec ID+V", sicsrec_row(strategy=FIXED_ID, use_text=False), needs_images=True),
    # Table 8's modality inputs under the headline strategy ("fixed_id_enc" is T+V+ID where images exist)
    "fixed_id_enc_t": Row("SICSRec (Fixed IDEnc) ID+T", sicsrec_row(strategy="fixed_id_enc", use_image=False),
                          needs_images=True),
    "fixed_id_enc_v": Row("SICSRec (Fixed IDEnc) ID+V", sicsrec_row(strategy="fixed_id_enc", use_text=False),
                          needs_images=True),
    # Table 9's other strategies ("sicsrec" is Fixed IDEmb&Enc, "fixed_id_enc" Fixed IDEnc)
    "fixed_id_emb": Row("strategy Fixed IDEmb", sicsrec_row(strategy="fixed_id_emb")),
    "fixed_content_enc": Row("strategy Fixed ConEnc", sicsrec_row(strategy="fixed_content_enc")),
    "fixed_content_emb": Row("strategy Fixed ConEmb", sicsrec_row(strategy="fixed_content_emb")),
    "fixed_content_emb_enc": Row("strategy Fixed ConEmb&Enc", sicsrec_row(strategy="fixed_content_emb_enc")),
    "end_to_end": Row("strategy End2end (E_id not in lambda)", sicsrec_row(strategy="end_to_end", reg_id_emb=False)),
    "tssr": Row("TSSR", tssr),
}
ROW_ALIASES = {"fixed_content": "fixed_content_emb_enc"}  # deprecated row name (the strategy's old name)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.exists() or link.is_symlink()):
        link.symlink_to(target.resolve(), target_is_directory=True)


def run_upstream(cfg: Config, skip: bool) -> None:
    run = Path(cfg.run_dir)
    if not skip:
        for name in UPSTREAM:
            if name == "label" and read_manifest(run / "label") and read_manifest(run / "sft"):
                continue  # label needs Ray; once SFT is done its pairs are not read again
            stages.run(cfg, name, False)
    missing = [s for s in ("prepare", "embeddings") if read_manifest(run / s) is None]
    if missing:
        raise SystemExit(f"{run}: no finished {', '.join(missing)} stage(s); run without --skip-upstream first")


def has_images(run: Path) -> bool:
    import numpy as np

    path = run / "embeddings" / "has_image.npy"
    return (run / "embeddings" / "image.npy").exists() and path.exists() and bool(np.load(path).any())


def default_overrides() -> list[str]:
    """TSSR reads the embedding cache unless the command line says otherwise."""
    return ["tssr.content=cache"]


def quick_overrides() -> list[str]:
    """A CPU smoke: a few epochs everywhere."""
    return ["train_id.epochs=3", "train_id.patience=2", "sicsrec.train.epochs=3", "sicsrec.train.patience=2",
            "tssr.train.epochs=3", "tssr.train.patience=2"]


def _mean_std(values: list[float]) -> dict:
    """mean and sample std (0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std}


def summarize(per_seed: dict) -> dict:
    """mean and std (sample std; 0 for one seed) of every test/valid metric over seeds, and of
    each test diagnostic over the seeds that have it (with their number "n" when not all do)."""
    out = {f"{split}_{key}": _mean_std([m[split][key] for m in per_seed.values()])
           for split in ("test", "valid") for key in KEYS}
    for key in DIAGNOSTICS:
        values = [m["test"][key] for m in per_seed.values() if key in m["test"]]
        if values:
            out[f"test_{key}"] = _mean_std(values) | ({"n": len(values)} if len(values) < len(per_seed) else {})
    return out


def diagnostics_markdown(rows: dict) -> str:
    """The test ranking diagnostics of each row: mean ± std over seeds, "n/a" where not measured."""
    head = "| model | " + " | ".join(f"test {k}" for k in DIAGNOSTICS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(DIAGNOSTICS) + 2)]
    for row in rows.values():
        s, cells = row["summary"], []
        for key in DIAGNOSTICS:
            cell = s.get(f"test_{key}")
            digits = 1 if key == "median_rank" else 4
            cells.append("n/a" if cell is None else f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" +
                         (f" (n={cell['n']})" if "n" in cell else ""))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
    return "\n".join(lines)


def markdown(rows: dict) -> str:
    head = "| model | " + " | ".join(f"test {k}" for k in KEYS) + " | valid ndcg@10 | epochs best/run | seeds |"
    lines = [head, "|" + "---|" * (len(KEYS) + 4)]
    for name, row in rows.items():
        s = row["summary"]
        cells = [f"{s[f'test_{k}']['mean']:.4f} ± {s[f'test_{k}']['std']:.4f}" for k in KEYS]
        runs = list(row["seeds"].values())
        epochs = "/".join(f"{sum(r[k] for r in runs) / len(runs):.0f}" for k in ("epochs_to_best", "epochs_run"))
        valid = s["valid_ndcg@10"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) +
                     f" | {valid['mean']:.4f} ± {valid['std']:.4f} | {epochs} | {len(runs)} |")
    return "\n".join(lines)


def compact(metrics: dict, seconds: float, overrides: list[str]) -> dict:
    keep = {k: metrics[k] for k in ("valid", "test", "best_epoch", "epochs_run", "early_stopped", "engine",
                                     "seconds_per_epoch", "content_pretrain", "epochs_run_total") if k in metrics}
    keep["epochs_to_best"] = metrics.get("epochs_to_best", metrics["best_epoch"] + 1)
    if "epochs_run_total" in metrics:
        keep["epochs_run"] = metrics["epochs_run_total"]
    return keep | {"seconds": round(seconds, 1), "overrides": overrides}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="dataset config, e.g. configs/ninerec_food.yaml")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (mean ± std over them)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: first seed only, 3 epochs per run")
    parser.add_argument("--skip-upstream", action="store_true",
                        help="use the finished prepare/embeddings folders in --run-dir; run no upstream stage")
    parser.add_argument("--run-dir", help="the run directory (default: the config's run_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--tag", default="", help="file the rows under tuning[TAG] (a settings search)")
    parser.add_argument("--out", help="results JSON (default benchmarks/results/quality_<config stem>.json)")
    parser.add_argument("--table-only", action="store_true", help="print the results file's tables; run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    rows = [ROW_ALIASES.get(r.strip(), r.strip()) for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    overrides = default_overrides() + (quick_overrides() if args.quick else []) + args.set
    cfg = load_config(args.config, overrides + ([f"run_dir={args.run_dir}"] if args.run_dir else []))
    run = Path(cfg.run_dir)
    dataset = Path(args.config).stem
    out_path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"quality_{dataset}.json"
    kind = f"tuning {args.tag}" if args.tag else "quick" if args.quick else "rows"
    if args.table_only:
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        section = results.get("tuning", {}).get(args.tag, {}).get("rows", {}) if args.tag else results.get(kind, {})
        shown = {r: section[r] for r in ROWS if r in section and r in rows}
        print(f"{dataset} ({kind}), results in {out_path}\n" + tables(shown))
        return 0

    start = time.time()
    run_upstream(cfg, args.skip_upstream)
    images = has_images(run)
    todo = [(r, s) for r in rows for s in seeds if images or not ROWS[r].needs_images]
    skipped = sorted({r for r in rows if ROWS[r].needs_images and not images})
    if skipped:
        print(f"no images in {run}/embeddings: skipping {skipped}")

    def section(results: dict) -> dict:
        if args.tag:
            return results.setdefault("tuning", {}).setdefault(args.tag, {"overrides": overrides, "rows": {}})["rows"]
        return results.setdefault("quick" if args.quick else "rows", {})

    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    target = section(results)
    base = run_base(run, args.quick, args.tag, overrides)
    per_run = _known_seconds(results.get("rows", {})) | _known_seconds(target)
    print(f"{len(todo)} run(s); estimate {_estimate(todo, per_run) / 60:.0f} min on this machine "
          f"(from earlier timings where known; device: {_device()})")
    for done, (row, seed) in enumerate(todo):
        seed_dir = base / f"seed{seed}"
        row_dir = seed_dir if row == "sasrec" else seed_dir / (f"{row}@{args.tag}" if args.tag else row)
        for name in LINKED:
            if (run / name).exists():
                _link(run / name, seed_dir / name)
                _link(run / name, row_dir / name)
        t0 = time.time()
        print(f"[{done + 1}/{len(todo)}] {row} seed {seed} -> {row_dir}", flush=True)
        metrics = ROWS[row].run(row_dir, seed, dataclasses.replace(cfg, run_dir=str(row_dir), seed=seed))
        result = compact(metrics, time.time() - t0, overrides)
        with _locked(out_path):  # re-read: other invocations may be filling other rows or seeds
            results = json.loads(out_path.read_text()) if out_path.exists() else {}
            results.update(dataset=dataset, config=args.config)
            target = section(results)
            entry = target.setdefault(row, {"label": ROWS[row].label, "seeds": {}})
            entry["seeds"][str(seed)] = result
            entry["summary"] = summarize(entry["seeds"])
            results["machine"] = {"device": _device(), "platform": platform.platform(), "cpus": os.cpu_count()}
            results["config_resolved"] = to_dict(cfg)
            write_json(out_path, results)
        left = todo[done + 1:]
        test = metrics["test"]
        diag = (f" top-1 = last item {test['top1_is_last']:.1%}, repeat targets {test['target_is_repeat']:.1%};"
                if "top1_is_last" in test else "")
        print(f"    test ndcg@10 {test['ndcg@10']:.4f} (valid {metrics['valid']['ndcg@10']:.4f}),{diag} "
              f"{time.time() - t0:.0f} s; ~{_estimate(left, per_run | _known_seconds(target)) / 60:.0f} min left", flush=True)
    shown = {r: target[r] for r in ROWS if r in target}
    print(f"\n{dataset} ({kind}), {time.time() - start:.0f} s, "
          f"results in {out_path}\n" + tables(shown))
    return 0


def tables(rows: dict) -> str:
    """The quality table, then the ranking-diagnostics table."""
    return markdown(rows) + "\n\nRanking diagnostics (test):\n\n" + diagnostics_markdown(rows)


def run_base(run: Path, quick: bool, tag: str, overrides: list[str]) -> Path:
    """Where the rows run. Rows of one base share each seed's step 1 (<base>/seed<S>/train_id),
    so a base holds one step-1 setting: quick runs and each set of train_id.* overrides of a tag
    get their own."""
    base = run / ("quality-quick" if quick else "quality")
    step1 = sorted(o for o in overrides if o.startswith("train_id."))
    if tag and step1:
        base = base / ("step1-" + hashlib.sha1("\n".join(step1).encode()).hexdigest()[:8])
    return base


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on <path>.lock, so that concurrent invocations merge their rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _known_seconds(rows: dict) -> dict:
    return {row: sum(s["seconds"] for s in entry["seeds"].values()) / len(entry["seeds"])
            for row, entry in rows.items() if entry.get("seeds")}


def _estimate(todo: list, per_run: dict) -> float:
    fallback = sum(per_run.values()) / len(per_run) if per_run else 60.0
    return sum(per_run.get(row, fallback) for row, _ in todo)


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


if __name__ == "__main__":
    raise SystemExit(main())

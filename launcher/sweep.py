"""`launcher sweep-batch`: one trainer over a list of global batch sizes (issue #7, item 3).

In-batch contrastive losses (ConCL, SFT's InfoNCE) get more negatives from a larger pooled batch;
this measures what that buys. Each batch size runs the stage in its own run directory

    <run_dir>/sweep/<stage>/b<batch>-<rule>/
        prepare -> ../../../prepare      upstream stage folders of <run_dir>, symlinked, so their
        ...                              manifests (and the stage's input fingerprints) match
        <stage output folder>/           train_id | sicsrec | sft, with its own manifest
        row.json                         this batch's result row

with the learning rate scaled from the config's (taken as the lr at `base_batch`):
none = lr, linear = lr * b / B, sqrt = lr * sqrt(b / B). A batch size whose stage manifest
matches its row.json is skipped, an interrupted one resumes from its checkpoint. Under torchrun
every rank runs the loop; the world size comes from the environment and each global batch is
split over the ranks. `index` runs only one batch size (a SLURM array task); `collect` only
aggregates finished runs into <run_dir>/sweep/<stage>/sweep.json, sweep.md and sweep_*.png.

Peak memory: on GPU the peak allocated CUDA memory, on CPU the peak resident set size (sampled),
the maximum over ranks; unknown (None) for a run that finished before this sweep saw it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from sicsrec.config import micro_batch_per_rank
from sicsrec.runtime import dist as distenv
from sicsrec.runtime.rundir import read_manifest, write_json

log = logging.getLogger(__name__)
RULES = ("none", "linear", "sqrt")
ROW_FILE = "row.json"


@dataclass(frozen=True)
class SweepStage:
    name: str  # the launcher stage
    upstream: tuple[str, ...]  # the stages it reads: their folders are linked from the main run directory
    samples_metric: str  # its training throughput metric (samples per second)
    quality: tuple[tuple[str, str], ...]  # (table column, metric key) of its end result


TEST_QUALITY = (("test NDCG@10", "ndcg@10"), ("test Hit@10", "hit@10"))
SWEEP_STAGES = {
    "train-id": SweepStage("train-id", ("prepare",), "sequences_per_s", TEST_QUALITY),
    "train-sicsrec": SweepStage("train-sicsrec", ("prepare", "train-id", "encode"), "sequences_per_s",
                                TEST_QUALITY),
    "sft": SweepStage("sft", ("prepare", "shard", "label"), "pairs_per_s",
                      (("pair R@10", "pair_recall@10"), ("t2i R@10", "t2i_recall@10"))),
}


def scaled_lr(base_lr: float, base_batch: int, batch: int, rule: str) -> float:
    """The learning rate for `batch` given `base_lr` at `base_batch` (none | linear | sqrt)."""
    if rule not in RULES:
        raise ValueError(f"lr scaling must be one of {RULES}, got {rule!r}")
    if base_batch < 1 or batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got base {base_batch}, batch {batch}")
    ratio = batch / base_batch
    return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, e.g. 64,128,256; got {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch-sizes must list distinct positive integers, got {text!r}")
    return sizes


def _stage_spec(stage: str) -> SweepStage:
    if stage not in SWEEP_STAGES:
        raise ValueError(f"sweep-batch runs one of {list(SWEEP_STAGES)}, got {stage!r}")
    return SWEEP_STAGES[stage]


def _section(cfg: Config, stage: str):
    """(the stage's training section, its config path)."""
    return {"train-id": (cfg.train_id, "train_id"), "train-sicsrec": (cfg.sicsrec.train, "sicsrec.train"),
            "sft": (cfg.sft, "sft")}[stage]


def base_settings(cfg: Config, stage: str) -> tuple[int, float]:
    """(global batch, lr) the config gives the stage."""
    section, _ = _section(cfg, stage)
    return section.batch_size, section.lr


def with_batch(cfg: Config, stage: str, batch: int, lr: float, run_dir: Path) -> Config:
    """A copy of cfg whose stage trains with global batch `batch` at `lr`, in `run_dir`."""
    replace = dataclasses.replace
    section = replace(_section(cfg, stage)[0], batch_size=batch, lr=lr)
    if stage == "train-id":
        cfg = replace(cfg, train_id=section)
    elif stage == "train-sicsrec":
        cfg = replace(cfg, sicsrec=replace(cfg.sicsrec, train=section))
    else:
        cfg = replace(cfg, sft=section)
    return replace(cfg, run_dir=str(run_dir))


def check_batches(cfg: Config, stage: str, batches: list[int], world_size: int) -> None:
    """Every batch splits into whole micro batches (ranks x the section's grad_accum)."""
    section, where = _section(cfg, stage)
    for batch in batches:
        micro_batch_per_rank(batch, section.grad_accum, world_size, where)


def sweep_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.run_dir) / "sweep" / stage


def run_name(batch: int, rule: str) -> str:
    return f"b{batch}-{rule}"


def link_upstream(cfg: Config, sub: Path, stages: tuple[str, ...]) -> None:
    """Symlink the stages' folders of cfg's run directory into the sub run directory (relative links)."""
    run_dir, folders = Path(cfg.run_dir), [cfg.stage_dir(s).name for s in stages]
    missing = [f for f in folders if read_manifest(run_dir / f) is None]
    if missing:
        raise FileNotFoundError(f"{run_dir} has no finished {missing} stage(s) (no manifest.json): run them first, "
                                f"e.g. `python -m launcher pipeline --run-dir {run_dir}`")
    sub.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        link, target = sub / folder, os.path.relpath(run_dir / folder, sub)
        if link.is_symlink():
            if os.readlink(link) == target:
                continue
            link.unlink()
        elif link.exists():
            raise ValueError(f"{link} exists and is not a link to {run_dir / folder}; remove it")
        link.symlink_to(target, target_is_directory=True)


class PeakMemory:
    """Peak memory (MB) of this process while the context is open, the max over ranks: CUDA's
    peak allocated memory on GPU, else the resident set size sampled every 50 ms."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    def megabytes(self) -> float:
        import torch

        peak = torch.tensor([float(self.peak)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return round(peak.item() / 2**20, 1)


def _quality(spec: SweepStage, metrics: dict) -> dict:
    results = metrics["after"] if spec.name == "sft" else metrics["test"]
    return {key: results.get(key) for _, key in spec.quality}


def _epochs(metrics: dict) -> int:
    return metrics.get("epochs_run_total", metrics.get("epochs_run", metrics.get("epochs")))


def run_one(cfg: Config, stage: str, batch: int, rule: str, base_batch: int | None = None,
            force: bool = False) -> dict | None:
    """Run (or skip, or resume) the stage at one global batch size; returns its row on rank 0."""
    import torch

    from launcher.stages import run
    from sicsrec.representation import stage_representation

    spec = _stage_spec(stage)
    env = distenv.init(distenv.detect())
    config_batch, base_lr = base_settings(cfg, stage)
    base_batch = base_batch or config_batch
    check_batches(cfg, stage, [batch], env.world_size)
    lr = scaled_lr(base_lr, base_batch, batch, rule)
    sub = sweep_dir(cfg, stage) / run_name(batch, rule)
    if env.is_main:
        link_upstream(cfg, sub, spec.upstream)
    distenv.barrier()
    sub_cfg = with_batch(cfg, stage, batch, lr, sub)
    old_row = json.loads((sub / ROW_FILE).read_text()) if (sub / ROW_FILE).exists() else None
    log.info("sweep %s: global batch %d, lr %.3g (%s rule from %.3g at batch %d), world size %d -> %s",
             stage, batch, lr, rule, base_lr, base_batch, env.world_size, sub)
    before = read_manifest(sub_cfg.stage_dir(stage))
    start = time.time()
    with PeakMemory(distenv.device(env)) as memory:
        manifest = run(sub_cfg, stage, force)
    ran = manifest != before
    peak_mb = memory.megabytes()
    if not ran and old_row and old_row["fingerprint"] == manifest["fingerprint"]:
        log.info("sweep %s: batch %d done already (%s)", stage, batch, sub / ROW_FILE)
        return old_row if env.is_main else None
    row = None
    if env.is_main:
        metrics = manifest["metrics"]
        row = {"stage": stage, "batch": batch, "rule": rule, "world_size": metrics.get("world_size", env.world_size),
               "lr": lr, "base_lr": base_lr, "base_batch": base_batch,
               "samples_per_s": metrics[spec.samples_metric],
               "peak_memory_mb": peak_mb if ran else None,
               "memory": "cuda allocated" if torch.cuda.is_available() else "cpu rss",
               "epochs": _epochs(metrics), "best_epoch": metrics.get("best_epoch"),
               **_quality(spec, metrics), **stage_representation(stage, sub, sub_cfg),
               "wall_s": round(time.time() - start, 1), "fingerprint": manifest["fingerprint"],
               "run_dir": str(sub)}
        write_json(sub / ROW_FILE, row)
    distenv.barrier()
    return row


FORMATS = {"lr": "{:.3g}", "samples_per_s": "{:.1f}", "peak_memory_mb": "{:.0f}"}


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return FORMATS.get(key, "{:.4f}").format(value) if isinstance(value, float) else str(value)


def table(rows: list[dict], stage: str) -> str:
    """The markdown table of the sweep, one row per batch size."""
    spec = _stage_spec(stage)
    columns = [("batch", "batch"), ("world size", "world_size"), ("lr", "lr"), ("samples/s", "samples_per_s"),
               ("peak mem (MB)", "peak_memory_mb"), ("epochs", "epochs"), *spec.quality,
               ("alignment", "alignment"), ("uniformity", "uniformity")]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, key) for _, key in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], stage: str, out_dir: Path) -> list[Path]:
    """sweep_quality.png (test NDCG/Hit@10, or SFT recall, vs batch), sweep_throughput.png
    (samples/s vs batch) and sweep_align_uniform.png (alignment vs uniformity, as TSSR Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.* below)

    spec = _stage_spec(stage)
    batches = [r["batch"] for r in rows]
    rule = rows[0]["rule"]
    paths = []

    def batch_axis(ax, ylabel: str, title: str) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("global batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, key in spec.quality:
        ax.plot(batches, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], "o-", label=name)
    batch_axis(ax, "metric", f"{stage}: quality vs batch (lr rule {rule})")
    ax.legend()
    paths.append(out_dir / "sweep_quality.png")

    fig2, ax2 = plt.subplots(figsize=(5, 3.6))
    ax2.plot(batches, [r["samples_per_s"] for r in rows], "s-", color="tab:green")
    batch_axis(ax2, "training samples / s", f"{stage}: throughput (world size {rows[0]['world_size']})")
    paths.append(out_dir / "sweep_throughput.png")

    fig3, ax3 = plt.subplots(figsize=(5, 3.8))
    key = spec.quality[0][1]
    colour = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
    points = ax3.scatter([r["uniformity"] for r in rows], [r["alignment"] for r in rows], c=colour, cmap="viridis",
                         s=60, edgecolors="black")
    for i, r in enumerate(rows):  # labels staggered in height so that close points stay readable
        ax3.annotate(f"b={r['batch']}", (r["uniformity"], r["alignment"]), textcoords="offset points",
                     xytext=(6, 6 - 9 * (i % 3)), fontsize=8)
    ax3.margins(0.15)
    ax3.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    ax3.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    fig3.colorbar(points, ax=ax3, label=spec.quality[0][0])
    ax3.set_xlabel("uniformity (lower = more uniform)")
    ax3.set_ylabel("alignment (lower = better aligned)")
    ax3.set_title(f"{stage}: alignment vs uniformity")
    ax3.grid(alpha=0.3)
    paths.append(out_dir / "sweep_align_uniform.png")

    for figure, path in zip((fig, fig2, fig3), paths):
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
    return paths


def collect(cfg: Config, stage: str, batches: list[int], rule: str) -> dict:
    """Aggregate the finished runs of the listed batch sizes: sweep.json, sweep.md, sweep_*.png."""
    _stage_spec(stage)
    out = sweep_dir(cfg, stage)
    rows, missing = [], []
    for batch in batches:
        path = out / run_name(batch, rule) / ROW_FILE
        if path.exists():
            rows.append(json.loads(path.read_text()))
        else:
            missing.append(batch)
    if missing:
        log.warning("sweep %s: no finished run for batch size(s) %s (rule %s) under %s", stage, missing, rule, out)
    if not rows:
        raise FileNotFoundError(f"no finished sweep runs under {out} for batch sizes {batches}, rule {rule}")
    text = table(rows, stage)
    images = plot(rows, stage, out)
    summary = {"stage": stage, "rule": rule, "batch_sizes": batches, "missing": missing, "rows": rows,
               "table": text, "plots": [str(p) for p in images]}
    write_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(text + "\n")
    print(f"\nBatch-size sweep of {stage} (lr rule {rule}; {out}/sweep.json)\n{text}\nplots: "
          + ", ".join(str(p) for p in images))
    return summary


def sweep_batch(cfg: Config, stage: str, batches: list[int], rule: str = "none", base_batch: int | None = None,
                index: int | None = None, collect_only: bool = False, force: bool = False) -> dict | None:
    """The `sweep-batch` command: run every batch size (or only `index`), then collect (rank 0)."""
    _stage_spec(stage)
    scaled_lr(1.0, 1, 1, rule)  # validates the rule before any run
    if index is not None and not 0 <= index < len(batches):
        raise ValueError(f"--index {index} is out of range for {len(batches)} batch size(s) {batches}")
    if collect_only:
        return collect(cfg, stage, batches, rule) if distenv.detect().is_main else None
    env = distenv.init(distenv.detect())
    check_batches(cfg, stage, batches, env.world_size)
    for batch in batches if index is None else [batches[index]]:
        run_one(cfg, stage, batch, rule, base_batch, force)
    if index is not None or not env.is_main:
        return None
    return collect(cfg, stage, batches, rule)

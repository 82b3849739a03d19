"""The pipeline's stages. Each reads its inputs from the run directory, writes its outputs and
a manifest (sicsrec.runtime.rundir), and is skipped when its manifest matches (config + inputs)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from launcher.config import Config
from sicsrec.runtime.rundir import hash_files, read_manifest, run_stage


def _stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.run_dir) / name


def _upstream(cfg: Config, name: str) -> str:
    manifest = read_manifest(_stage_dir(cfg, name))
    if manifest is None:
        raise FileNotFoundError(f"stage '{name}' has not run in {cfg.run_dir} (no manifest); run it first "
                                f"or use `python -m launcher pipeline`")
    return manifest["fingerprint"]


def synth(cfg: Config, force: bool = False) -> dict:
    from shards.synth import synthesize

    if cfg.data.format != "synth":
        raise ValueError(f"`synth` makes the embedded dataset, but data.format is {cfg.data.format!r}")
    section = dataclasses.asdict(cfg.data.synth)
    return run_stage(_stage_dir(cfg, "synth"), "synth", section, {},
                     lambda out: synthesize(cfg.data.synth, out), force)


def _raw_source(cfg: Config) -> tuple[Path, dict]:
    """The canonical folder `prepare` reads, converting a real dataset's format when needed."""
    from shards import sources

    fmt, src = cfg.data.format, cfg.data.source
    if fmt == "synth":
        return _stage_dir(cfg, "synth"), {"synth": _upstream(cfg, "synth")}
    if fmt == "canonical":
        from shards.canonical import interactions_path

        if not src:
            raise ValueError("data.format=canonical needs data.source (a folder with items.jsonl and "
                             "interactions.csv or interactions.parquet)")
        return Path(src), {"source": hash_files([Path(src) / "items.jsonl", interactions_path(src)])}
    raw = _stage_dir(cfg, "raw")
    if raw.exists():
        shutil.rmtree(raw)
    if fmt == "ninerec":
        if not src:
            raise ValueError("data.format=ninerec needs data.source, e.g. ../shared/data/ninerec/Bili_Food")
        sources.convert_ninerec(src, raw, cfg.data.title_field)
    elif fmt == "ml100k":
        sources.convert_ml100k(src or None, raw)
    else:
        raise ValueError(f"unknown data.format {fmt!r}; expected synth, canonical, ninerec or ml100k")
    return raw, {"raw": hash_files([raw / "items.jsonl", raw / "interactions.csv"])}


def prepare(cfg: Config, force: bool = False) -> dict:
    from shards.prepare import prepare_dir, prepare_ray, stats_table

    source, inputs = _raw_source(cfg)
    section = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("synth", "ray_address")}

    def body(out: Path) -> dict:
        if cfg.data.ray_address:
            return prepare_ray(source, out, cfg.data.kcore, cfg.data.validate_images, cfg.data.ray_address)
        return prepare_dir(source, out, cfg.data.kcore, cfg.data.validate_images)

    manifest = run_stage(_stage_dir(cfg, "prepare"), "prepare", section, inputs, body, force)
    print(f"\nDataset statistics ({cfg.run_dir}/prepare/stats.json; % of each section's total)\n"
          + stats_table(manifest["metrics"]))
    return manifest


def shard(cfg: Config, force: bool = False) -> dict:
    from shards.prepared import PreparedDataset
    from shards.writer import write_shards

    inputs = {"prepare": _upstream(cfg, "prepare")}
    return run_stage(_stage_dir(cfg, "shards"), "shard", dataclasses.asdict(cfg.shard), inputs,
                     lambda out: write_shards(PreparedDataset.load(_stage_dir(cfg, "prepare")), out, cfg.shard),
                     force)


def label(cfg: Config, force: bool = False) -> dict:
    from llm_labeling.run import label as run_label

    inputs = {"prepare": _upstream(cfg, "prepare")}
    return run_stage(_stage_dir(cfg, "label"), "label", dataclasses.asdict(cfg.label) | {"seed": cfg.seed}, inputs,
                     lambda out: run_label(cfg.label, _stage_dir(cfg, "prepare"), out, seed=cfg.seed, force=force),
                     force)


def sft(cfg: Config, force: bool = False) -> dict:
    from sicsrec.sft import sft as run_sft

    run = Path(cfg.run_dir)
    return run_sft(cfg.sft, run / "prepare", run / "shards", run / "label", run / "sft", cfg.seed, force)


def encode(cfg: Config, force: bool = False) -> dict:
    from sicsrec.encode import encode as run_encode

    run = Path(cfg.run_dir)
    return run_encode(cfg.encode, run / "prepare", run / "shards", run / "sft", run / "embeddings", force,
                      encoders=cfg.sft.encoders, seed=cfg.seed)


def train_id(cfg: Config, force: bool = False) -> dict:
    from sicsrec.train import train_id as run_train_id

    _upstream(cfg, "prepare")
    return run_train_id(cfg.train_id, _stage_dir(cfg, "prepare"), _stage_dir(cfg, "train_id"), cfg.seed, force)


def train_sicsrec(cfg: Config, force: bool = False) -> dict:
    from sicsrec.train_sicsrec import train_sicsrec as run_train_sicsrec

    return run_train_sicsrec(cfg, force)


def train_content(cfg: Config, force: bool = False) -> dict:
    from sicsrec.train_content import train_content as run_train_content

    return run_train_content(cfg, "content", force)


def train_hybrid(cfg: Config, force: bool = False) -> dict:
    from sicsrec.train_content import train_content as run_train_content

    return run_train_content(cfg, "hybrid", force)


def train_tssr(cfg: Config, force: bool = False) -> dict:
    from sicsrec.train_tssr import train_tssr as run_train_tssr

    return run_train_tssr(cfg, force)


STAGES: dict[str, tuple[Callable[[Config, bool], dict], str]] = {
    "synth": (synth, "write the embedded default dataset (canonical format) into <run_dir>/synth"),
    "prepare": (prepare, "validate, k-core filter, time-sort, dense ids, leave-one-out split -> <run_dir>/prepare"),
    "shard": (shard, "write WebDataset item and train-sequence shards -> <run_dir>/shards"),
    "label": (label, "LLM picks each user's most similar earlier item (Ray fan-out) -> <run_dir>/label/pairs-*.jsonl"),
    "sft": (sft, "SICSRec 3.3.2: fine-tune text + image encoders on labelled pairs (t2t, i2i, t2i InfoNCE, "
                 "DeepSpeed ZeRO) -> <run_dir>/sft"),
    "encode": (encode, "embed every item with the tuned encoders -> <run_dir>/embeddings/{text,image,has_image}.npy"),
    "train-id": (train_id, "SICSRec step 1: SASRec/GRU4Rec ID encoder, full-softmax CE, early stopping "
                           "-> <run_dir>/train_id"),
    "train-sicsrec": (train_sicsrec, "SICSRec step 2: step-1 encoder layers frozen + LoRA (item embeddings keep "
                                     "training: Table 9 fixed_id_enc), content encoder, mix decoder, CE + alpha ConCL "
                                     "-> <run_dir>/sicsrec"),
    "train-content": (train_content, "baseline SASRec-Content: cached content embeddings as the only input "
                                     "-> <run_dir>/sasrec_content"),
    "train-hybrid": (train_hybrid, "baseline SASRec-Hybrid: ID + content embeddings at the input "
                                   "-> <run_dir>/sasrec_hybrid"),
    "train-tssr": (train_tssr, "TSSR: two-stream ID + content model, encoders in the loop (or cached), "
                               "L_u + L_i + CE, DeepSpeed ZeRO -> <run_dir>/tssr"),
}
RESULT_STAGES = {"train-id": "SASRec (step 1)", "train-content": "SASRec-Content", "train-hybrid": "SASRec-Hybrid",
                 "train-sicsrec": "SICSRec", "train-tssr": "TSSR"}


def results_table(manifests: dict) -> str:
    """Test Hit/NDCG@5,10,20 of the trained models, one row each."""
    keys = [f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)]
    rows = [(label, manifests[stage]["metrics"]["test"]) for stage, label in RESULT_STAGES.items() if stage in manifests]
    if not rows:
        return ""
    lines = [f"{'model (test)':<18}" + "".join(f"{k:>10}" for k in keys)]
    lines += [f"{label:<18}" + "".join(f"{test[k]:>10.4f}" for k in keys) for label, test in rows]
    return "\n".join(lines)


def run_pipeline(cfg: Config, force: bool = False) -> dict:
    unknown = [s for s in cfg.pipeline if s not in STAGES]
    if unknown:
        raise ValueError(f"pipeline lists unknown stage(s) {unknown}; known: {list(STAGES)}")
    manifests = {}
    for name in cfg.pipeline:
        if name == "synth" and cfg.data.format != "synth":
            continue
        manifests[name] = STAGES[name][0](cfg, force)
    table = results_table(manifests)
    if table:
        print("\n" + table)
    return manifests

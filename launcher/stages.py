"""The stage registry: `STAGES` maps each CLI name to its folder in the run directory, its help
and its body. Each body reads its config section and its upstream folders (Config.stage_dir)
and runs through sicsrec.runtime.rundir.run_declared: skipped when its manifest matches (config
+ inputs), resumed, or redone with --force."""
from __future__ import annotations

import dataclasses
import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launcher.config import Config
from sicsrec.runtime.rundir import Upstream, hash_files, run_declared


@dataclass(frozen=True)
class Stage:
    """A stage: its run-directory folder (kept from the first layout, so old run directories keep
    working), its CLI help and its body. The body picks its config section and its upstream
    folders (cfg.stage_dir) and runs through sicsrec.runtime.rundir.run_declared."""
    folder: str
    help: str
    body: Callable[..., dict]  # (config, force, **options such as stop_after_epoch) -> manifest


def _call(target: str, *args, **kwargs):
    """Call `module:function`, imported only now (the CLI starts without torch)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def run(cfg: Config, name: str, force: bool = False, **options) -> dict:
    """Run stage `name` of the run `cfg` describes; `options` go to its body (the trainers take
    stop_after_epoch, which tests use to simulate a kill)."""
    return STAGES[name].body(cfg, force, **options)


def _upstream(cfg: Config, name: str) -> str:
    return Upstream(name, cfg.stage_dir(name)).fingerprint()


def _synth(cfg: Config, force: bool) -> dict:
    from shards.synth import synthesize

    if cfg.data.format != "synth":
        raise ValueError(f"`synth` makes the embedded dataset, but data.format is {cfg.data.format!r}")
    return run_declared("synth", cfg.stage_dir("synth"), cfg.data.synth, {},
                        lambda run: synthesize(cfg.data.synth, run.out), force)


def _raw_source(cfg: Config) -> tuple[Path, dict]:
    """The canonical folder `prepare` reads, converting a real dataset's format when needed."""
    from shards import sources

    fmt, src = cfg.data.format, cfg.data.source
    if fmt == "synth":
        return cfg.stage_dir("synth"), {"synth": Upstream("synth", cfg.stage_dir("synth"))}
    if fmt == "canonical":
        from shards.canonical import interactions_path

        if not src:
            raise ValueError("data.format=canonical needs data.source (a folder with items.jsonl and "
                             "interactions.csv or interactions.parquet)")
        return Path(src), {"source": hash_files([Path(src) / "items.jsonl", interactions_path(src)])}
    raw = Path(cfg.run_dir) / "raw"
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


def _prepare(cfg: Config, force: bool) -> dict:
    from shards.prepare import prepare_dir, prepare_ray, stats_table

    source, inputs = _raw_source(cfg)
    section = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("synth", "ray_address")}

    def body(run) -> dict:
        if cfg.data.ray_address:
            return prepare_ray(source, run.out, cfg.data.kcore, cfg.data.validate_images, cfg.data.ray_address)
        return prepare_dir(source, run.out, cfg.data.kcore, cfg.data.validate_images)

    manifest = run_declared("prepare", cfg.stage_dir("prepare"), section, inputs, body, force)
    print(f"\nDataset statistics ({cfg.stage_dir('prepare')}/stats.json; % of each section's total)\n"
          + stats_table(manifest["metrics"]))
    return manifest


def prepare(cfg: Config, force: bool = False) -> dict:
    return run(cfg, "prepare", force)


def _shard(cfg: Config, force: bool) -> dict:
    from shards.prepared import PreparedDataset
    from shards.writer import write_shards

    prepared = cfg.stage_dir("prepare")
    return run_declared("shard", cfg.stage_dir("shard"), cfg.shard, {"prepare": Upstream("prepare", prepared)},
                        lambda run: write_shards(PreparedDataset.load(prepared), run.out, cfg.shard), force)


def _label(cfg: Config, force: bool) -> dict:
    from llm_labeling.run import label, migrate_progress

    prepared = cfg.stage_dir("prepare")
    migrate_progress(cfg.stage_dir("label"))  # a run directory of the old layout, finished or not
    return run_declared("label", cfg.stage_dir("label"), cfg.label, {"prepare": Upstream("prepare", prepared)},
                        lambda run: label(cfg.label, prepared, run.out, seed=cfg.seed, force=force), force, cfg.seed)


STAGES: dict[str, Stage] = {
    "synth": Stage("synth", "write the embedded default dataset (canonical format) into <run_dir>/synth", _synth),
    "prepare": Stage("prepare", "validate, k-core filter, time-sort, dense ids, leave-one-out split "
                                "-> <run_dir>/prepare", _prepare),
    "shard": Stage("shards", "write WebDataset item and train-sequence shards -> <run_dir>/shards", _shard),
    "label": Stage("label", "LLM picks each user's most similar earlier item (Ray fan-out) "
                            "-> <run_dir>/label/pairs-*.jsonl", _label),
    "sft": Stage("sft", "SICSRec 3.3.2: fine-tune text + image encoders on labelled pairs (t2t, i2i, t2i InfoNCE, "
                        "DeepSpeed ZeRO) -> <run_dir>/sft",
                 lambda c, force, **kw: _call("sicsrec.sft:sft", c.sft, c.stage_dir("prepare"), c.stage_dir("shard"),
                                              c.stage_dir("label"), c.stage_dir("sft"), c.seed, force, **kw)),
    "encode": Stage("embeddings", "embed every item with the tuned encoders "
                                  "-> <run_dir>/embeddings/{text,image,has_image}.npy",
                    lambda c, force: _call("sicsrec.encode:encode", c.encode, c.stage_dir("prepare"),
                                           c.stage_dir("shard"), c.stage_dir("sft"), c.stage_dir("encode"), force,
                                           c.sft.encoders, c.seed)),
    "train-id": Stage("train_id", "SICSRec step 1: SASRec/GRU4Rec ID encoder, full-softmax CE, early stopping "
                                  "-> <run_dir>/train_id",
                      lambda c, force, **kw: _call("sicsrec.train:train_id", c.train_id, c.stage_dir("prepare"),
                                                   c.stage_dir("train-id"), c.seed, force,
                                                   embeddings_dir=c.stage_dir("encode"), **kw)),
    "train-sicsrec": Stage("sicsrec", "SICSRec step 2: step-1 encoder layers frozen + LoRA (item embeddings keep "
                                      "training: Table 9 fixed_id_enc), content encoder, mix decoder, CE + alpha "
                                      "ConCL -> <run_dir>/sicsrec",
                           lambda c, force, **kw: _call("sicsrec.train_sicsrec:train_sicsrec", c.sicsrec,
                                                        c.stage_dir("prepare"), c.stage_dir("train-id"),
                                                        c.stage_dir("encode"), c.stage_dir("train-sicsrec"), c.seed,
                                                        force, **kw)),
    "train-content": Stage("sasrec_content", "baseline SASRec-Content: cached content embeddings as the only input "
                                             "-> <run_dir>/sasrec_content",
                           lambda c, force, **kw: _call("sicsrec.train_content:train_content", c.train_id,
                                                        c.stage_dir("prepare"), c.stage_dir("encode"),
                                                        c.stage_dir("train-content"), c.seed, "content", force, **kw)),
    "train-hybrid": Stage("sasrec_hybrid", "baseline SASRec-Hybrid: ID + content embeddings at the input "
                                           "-> <run_dir>/sasrec_hybrid",
                          lambda c, force, **kw: _call("sicsrec.train_content:train_content", c.train_id,
                                                       c.stage_dir("prepare"), c.stage_dir("encode"),
                                                       c.stage_dir("train-hybrid"), c.seed, "hybrid", force, **kw)),
    "train-tssr": Stage("tssr", "TSSR: two-stream ID + content model, encoders in the loop (or cached), "
                                "L_u + L_i + CE, DeepSpeed ZeRO -> <run_dir>/tssr",
                        lambda c, force, **kw: _call("sicsrec.train_tssr:train_tssr", c.tssr, c.sft.encoders, c.seed,
                                                     prepared_dir=c.stage_dir("prepare"),
                                                     shard_dir=c.stage_dir("shard"), sft_dir=c.stage_dir("sft"),
                                                     embeddings_dir=c.stage_dir("encode"),
                                                     out_dir=c.stage_dir("train-tssr"), force=force, **kw)),
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
        manifests[name] = run(cfg, name, force)
    table = results_table(manifests)
    if table:
        print("\n" + table)
    return manifests

"""SICSRec step 2: trains on top of a step-1 checkpoint with the strategy's parts frozen, starts
from (and can keep) the step-1 model, resumes exactly, and 2 gloo ranks (ConCL negatives pooled
across ranks) follow the 1-rank loss curve, the w/o-IMSE ablation included."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher import stages
from launcher.config import Config, load_config
from shards.prepared import PreparedDataset
from sicsrec.config import SequenceTrainConfig
from sicsrec.runtime.rundir import read_manifest, run_stage
from sicsrec.train import Trainer, TrainingInterrupted, load_id_encoder, train_id
from tests.helpers import copy_run
from tests.test_train_id import TINY, make_dataset

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, num_users=37) -> Path:
    """prepare + step 1 + a random embedding cache, each with its manifest."""
    run_stage(root / "prepare", "prepare", {}, {}, lambda out: make_dataset(out, num_users=num_users) and {})
    ds = PreparedDataset.load(root / "prepare")
    cfg = overrides(root)
    train_id(cfg.train_id, root / "prepare", root / "train_id", seed=0)
    g = np.random.default_rng(0)

    def cache(out: Path) -> dict:
        np.save(out / "text.npy", g.normal(size=(ds.num_items + 1, 12)).astype(np.float32))
        np.save(out / "image.npy", g.normal(size=(ds.num_items + 1, 10)).astype(np.float32))
        np.save(out / "has_image.npy", np.arange(ds.num_items + 1) % 7 != 3)
        return {}

    run_stage(root / "embeddings", "encode", {}, {}, cache)
    return root


def overrides(root: Path, **step2) -> Config:
    train = {k: v for k, v in TINY.items()} | {"dropout": 0.0, "epochs": 2, "patience": 5, "engine": "single"}
    sets = [f"run_dir={root}"] + [f"train_id.{k}={v}" for k, v in train.items()]
    step2_train = {f.name for f in dataclasses.fields(SequenceTrainConfig)}  # no model keys: those are train_id's
    sets += [f"sicsrec.train.{k}={v}" for k, v in (train | {"batch_size": 8}).items() if k in step2_train]
    sets += ["sicsrec.dropout=0.0", "sicsrec.heads=2", "sicsrec.alpha=0.5", "sicsrec.temperature=0.2"]
    sets += [f"sicsrec.{k}={v}" for k, v in step2.items()]
    return load_config(None, sets)


@pytest.fixture(scope="module")
def run(step1_run, tmp_path_factory):
    return copy_run(step1_run, tmp_path_factory.mktemp("step2"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _final_state(out: Path) -> dict:
    """The weights after the last epoch (the checkpoint), whichever epoch was selected as best."""
    state = torch.load(out / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)["model"]
    return {k[len("recommender."):]: v for k, v in state.items() if k.startswith("recommender.")}


@pytest.mark.parametrize("strategy", ["fixed_id_enc", "fixed_id_emb_enc"])
def test_step2_trains_with_the_id_encoder_frozen(run, strategy):
    """fixed_id_enc (default): the step-1 encoder layers frozen + LoRA, E_id trains;
    fixed_id_emb_enc (the earlier fixed_id): E_id frozen as well."""
    cfg = overrides(run) if strategy == "fixed_id_enc" else overrides(run, strategy=strategy)
    assert cfg.sicsrec.strategy == strategy
    metrics = stages.run(cfg, "train-sicsrec", force=True)["metrics"]
    assert set(metrics["test"]) >= {"hit@10", "ndcg@10"} and metrics["epochs_run"] == 2
    history = json.loads((run / "sicsrec" / "metrics.json").read_text())["history"]
    assert history[0]["epoch"] == -1 and history[0]["start"] and [h["epoch"] for h in history[1:]] == [0, 1]
    assert all(h["extra_loss"] > 0 for h in history[1:])  # ConCL + reg are in the loss
    step1 = load_id_encoder(run / "train_id").state_dict()
    final = _final_state(run / "sicsrec")
    encoder = {k[len("id_encoder."):].replace(".base_layer", ""): v for k, v in final.items()
               if k.startswith("id_encoder.") and "lora_" not in k}
    assert encoder.keys() == step1.keys()
    layers = [k for k in step1 if not k.startswith("item_emb.")]
    assert all(torch.equal(encoder[k], step1[k]) for k in layers)
    assert torch.equal(encoder["item_emb.weight"], step1["item_emb.weight"]) == (strategy == "fixed_id_emb_enc")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in final.items())  # LoRA did move


def test_step2_never_ends_below_step1_and_step1_has_no_start(run):
    """Step 2 evaluates its start (the step-1 function) and keeps it when training only hurts."""
    step1 = read_manifest(run / "train_id")["metrics"]
    step1_history = json.loads((run / "train_id" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in step1_history] == list(range(len(step1_history)))  # no start point in step 1
    assert not any(h.get("start") for h in step1_history)
    cfg = overrides(run, **{"train.lr": 30.0, "train.epochs": 3, "train.patience": 1})
    metrics = stages.run(cfg, "train-sicsrec", force=True)["metrics"]
    history = json.loads((run / "sicsrec" / "metrics.json").read_text())["history"]
    start, epoch0 = history  # early stopping counts from the start: one epoch without improvement ends it
    assert start["epoch"] == -1 and epoch0["epoch"] == 0 and metrics["early_stopped"]
    assert epoch0["valid_ndcg@10"] < start["valid_ndcg@10"]  # the huge lr did hurt
    assert metrics["best_epoch"] == -1 and metrics["epochs_to_best"] == 0 and metrics["epochs_run"] == 1
    assert start["valid_ndcg@10"] == pytest.approx(step1["valid"]["ndcg@10"], abs=1e-6)
    assert metrics["valid"]["ndcg@10"] >= step1["valid"]["ndcg@10"] - 1e-9
    assert metrics["start_valid"]["ndcg@10"] == start["valid_ndcg@10"]


def test_step2_resume_after_kill_matches(run, monkeypatch):
    cfg = overrides(run, dropout=0.3)
    full = stages.run(dataclasses.replace(cfg, run_dir=str(run)), "train-sicsrec", force=True)["metrics"]
    full_losses = _losses(run / "sicsrec")
    full_history = json.loads((run / "sicsrec" / "metrics.json").read_text())["history"]
    with pytest.raises(TrainingInterrupted):
        stages.run(cfg, "train-sicsrec", force=True, stop_after_epoch=0)
    resumed = stages.run(cfg, "train-sicsrec")["metrics"]
    assert _losses(run / "sicsrec") == pytest.approx(full_losses, rel=1e-6)
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-9)
    # killed right after the start evaluation: the resumed run does not evaluate the start again
    with pytest.raises(TrainingInterrupted, match="start"):
        stages.run(cfg, "train-sicsrec", force=True, stop_after_epoch=-1)
    calls = []
    original = Trainer.evaluate_start
    monkeypatch.setattr(Trainer, "evaluate_start", lambda self, tb: calls.append(1) or original(self, tb))
    resumed = stages.run(cfg, "train-sicsrec")["metrics"]
    assert not calls
    assert _losses(run / "sicsrec") == pytest.approx(full_losses, rel=1e-6)
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-9)
    history = json.loads((run / "sicsrec" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [h["epoch"] for h in full_history] == [-1, 0, 1]
    assert history[0]["valid_ndcg@10"] == full_history[0]["valid_ndcg@10"]


def _two_ranks(run: Path, **step2) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "launcher", "train-sicsrec", "--force", "--run-dir", str(run),
           *[a for kv in _cli_sets(run, **step2) for a in ("--set", kv)]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads((run / "sicsrec" / "metrics.json").read_text())
    assert got["world_size"] == 2 and got["engine"] == "ddp"
    return got


@pytest.mark.slow
def test_two_ranks_follow_the_single_process_loss_curve(run):
    single = stages.run(overrides(run), "train-sicsrec", force=True)["metrics"]
    expected = _losses(run / "sicsrec")
    got = _two_ranks(run)
    assert _losses(run / "sicsrec") == pytest.approx(expected, rel=1e-5)
    for name, value in single["test"].items():
        assert got["test"][name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
def test_two_ranks_without_imse(run):
    """The w/o-IMSE row (quality.py wo_imse) under DDP without find_unused_parameters: no LoRA and
    no ID encoder layer is trainable there (they get no gradient), so 2 ranks run and match 1."""
    row = dict(strategy="fixed_id_emb_enc", use_imse=False, use_mmsd=False)
    single = stages.run(overrides(run, **row), "train-sicsrec", force=True)["metrics"]
    expected = _losses(run / "sicsrec")
    best = _state(run / "sicsrec" / "best_model.pt")
    assert not any("lora_" in k for k in best)
    got = _two_ranks(run, **row)
    assert _losses(run / "sicsrec") == pytest.approx(expected, rel=1e-5)
    for name, value in single["test"].items():
        assert got["test"][name] == pytest.approx(value, abs=1e-6), name


def _cli_sets(root: Path, **step2) -> list[str]:
    cfg = overrides(root, **step2)
    train = dataclasses.asdict(cfg.sicsrec.train) | {"engine": "ddp"}
    sets = [f"train_id.{k}={v}" for k, v in dataclasses.asdict(cfg.train_id).items()]
    sets += [f"sicsrec.train.{k}={v}" for k, v in train.items()]
    sets += [f"sicsrec.{k}={v}" for k, v in dataclasses.asdict(cfg.sicsrec).items() if k != "train"]
    return sets


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


CONTENT_PARTS = ("text_adapter.", "image_adapter.", "cmse.", "content_pos.", "content_norm.")


def test_fixed_content_pretrains_content_parts_then_trains_the_id_parts(run):
    """fixed_content_emb_enc (the earlier `fixed_content`): phase 1 trains the content parts with the
    ID encoder frozen at random, phase 2 freezes them and trains the ID encoder, starting from
    (and able to keep) phase 1's best model."""
    from sicsrec.train_sicsrec import _reset_parameters

    cfg = overrides(run, strategy="fixed_content_emb_enc", dropout=0.3)
    full = stages.run(cfg, "train-sicsrec", force=True)["metrics"]
    phase1 = _state(run / "sicsrec" / "content_pretrain" / "best_model.pt")
    final = _final_state(run / "sicsrec")
    # phase 1: the ID encoder is frozen at a fresh random init (the first thing drawn after the seed)
    fresh = load_id_encoder(run / "train_id")
    torch.manual_seed(0)
    fresh.apply(_reset_parameters)
    assert all(torch.equal(phase1[f"id_encoder.{k}"], v) for k, v in fresh.state_dict().items())
    assert not any("lora_" in k for k in final)
    phase1_history = json.loads((run / "sicsrec" / "content_pretrain" / "metrics.json").read_text())["history"]
    assert phase1_history[0]["epoch"] == 0  # a random start is not evaluated
    # phase 2: the content parts stay at phase 1's best, the ID encoder trains
    content = [k for k in final if k.startswith(CONTENT_PARTS)]
    assert content and all(torch.equal(final[k], phase1[k]) for k in content)
    assert not torch.equal(final["id_encoder.item_emb.weight"], phase1["id_encoder.item_emb.weight"])
    history = json.loads((run / "sicsrec" / "metrics.json").read_text())["history"]
    pre = full["content_pretrain"]
    assert history[0]["epoch"] == -1 and history[0]["valid_ndcg@10"] == pytest.approx(pre["valid"]["ndcg@10"], abs=1e-9)
    assert full["valid"]["ndcg@10"] >= pre["valid"]["ndcg@10"] - 1e-9
    assert full["epochs_run_total"] == pre["epochs_run"] + full["epochs_run"] == 4
    assert full["epochs_to_best"] == (pre["best_epoch"] + 1 if full["best_epoch"] < 0
                                      else pre["epochs_run"] + full["best_epoch"] + 1)
    # killed in phase 2, resumed: the same result
    with pytest.raises(TrainingInterrupted):
        stages.run(cfg, "train-sicsrec", force=True, stop_after_epoch=2)
    assert stages.run(cfg, "train-sicsrec")["metrics"]["test"] == pytest.approx(full["test"], abs=1e-9)


def test_end_to_end_trains_everything_from_scratch(run):
    full = stages.run(overrides(run, strategy="end_to_end"), "train-sicsrec", force=True)["metrics"]
    best, step1 = _state(run / "sicsrec" / "best_model.pt"), load_id_encoder(run / "train_id").state_dict()
    assert not any("lora_" in k for k in best)
    weights = [k for k in step1 if k.endswith("weight") and "norm" not in k]
    assert all(not torch.equal(best[f"id_encoder.{k}"], step1[k]) for k in weights)  # re-initialised, trained
    assert full["epochs_to_best"] == full["best_epoch"] + 1
    with pytest.raises(ValueError, match="strategy"):
        stages.run(overrides(run, strategy="fixed_idemb"), "train-sicsrec", force=True)


def test_quality_benchmark_rows_seeds_and_merge(step1_run, tmp_path):
    """benchmarks/quality.py on finished upstream folders: rows x seeds, mean ± std over seeds,
    rows of a later invocation merge into the same JSON, and SICSRec rows reuse the seed's step 1."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    root = copy_run(step1_run, tmp_path / "run")
    config, out = tmp_path / "tiny.yaml", tmp_path / "quality_tiny.json"
    config.write_text(f"run_dir: {root}\n")
    cfg = overrides(root)
    sets = [f"train_id.{k}={v}" for k, v in dataclasses.asdict(cfg.train_id).items()]
    sets += [f"sicsrec.train.{k}={v}" for k, v in dataclasses.asdict(cfg.sicsrec.train).items()]
    sets += ["sicsrec.dropout=0.0", "sicsrec.temperature=0.2"]
    args = ["--config", str(config), "--skip-upstream", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    assert quality.main(args + ["--rows", "sasrec,wo_concl", "--seeds", "0,1"]) == 0
    assert quality.main(args + ["--rows", "wo_mmsd", "--seeds", "0"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["sasrec", "wo_concl", "wo_mmsd"] and len(rows["wo_mmsd"]["seeds"]) == 1
    ndcg = [rows["sasrec"]["seeds"][s]["test"]["ndcg@10"] for s in ("0", "1")]
    summary = rows["sasrec"]["summary"]["test_ndcg@10"]
    assert summary["mean"] == pytest.approx(np.mean(ndcg)) and summary["std"] == pytest.approx(np.std(ndcg, ddof=1))
    step1 = root / "quality" / "seed0" / "train_id"
    assert (root / "quality" / "seed0" / "wo_concl" / "train_id").resolve() == step1.resolve()
    step2 = json.loads((root / "quality" / "seed0" / "wo_concl" / "sicsrec" / "manifest.json").read_text())
    assert step2["config"]["alpha"] == 0.0
    assert step2["config"]["strategy"] == "fixed_id_emb_enc"  # the ablations keep the strategy they were measured with
    assert {"fixed_id_enc", "fixed_id_emb", "fixed_content_enc", "fixed_content_emb", "fixed_content_emb_enc",
            "end_to_end"} <= set(quality.ROWS)
    with pytest.raises(SystemExit):  # no finished upstream stages there
        quality.main(["--config", str(config), "--skip-upstream", "--run-dir", str(tmp_path / "empty")])

"""Nothing finished is lost: a failed re-run keeps the previous result, unreadable manifests and
checkpoints give one line naming the file (and --force recovers), checkpoints keep their
predecessor, and out-of-range config values are refused before any work, naming the key."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.config import ConfigError, load_config
from launcher.stages import _upstream, prepare
from sicsrec.config import TrainConfig
from sicsrec.engine import CheckpointError, build_engine
from sicsrec.runtime.dist import DistEnv
from sicsrec.runtime.rundir import ManifestError, Upstream, hash_files, read_manifest, run_stage
from sicsrec.train import TrainingInterrupted, train_id
from tests.test_train_id import TINY, make_dataset

REPO = Path(__file__).resolve().parents[1]
SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, source="none")


def _write(value: str, fail: bool = False):
    def body(out: Path) -> dict:
        (out / "result.txt").write_text(value)
        if fail:
            raise ValueError("the body failed")
        return {"value": value}
    return body


def test_failed_rerun_keeps_the_finished_stage_and_resumes_beside_it(tmp_path):
    stage = tmp_path / "stage"
    first = run_stage(stage, "s", {"a": 1}, {}, _write("v1"))
    with pytest.raises(ValueError, match="the body failed"):
        run_stage(stage, "s", {"a": 2}, {}, _write("v2", fail=True))
    assert read_manifest(stage) == first and (stage / "result.txt").read_text() == "v1"
    partial = tmp_path / ".stage.next"
    assert (partial / "result.txt").read_text() == "v2"  # the new attempt's outputs wait beside it

    seen = []
    def resume(out: Path) -> dict:
        seen.append((out / "result.txt").read_text())  # the same config resumes in the same folder
        return _write("v2")(out)

    second = run_stage(stage, "s", {"a": 2}, {}, resume)
    assert seen == ["v2"] and read_manifest(stage) == second and second["fingerprint"] != first["fingerprint"]
    assert (stage / "result.txt").read_text() == "v2" and not partial.exists()
    assert not (tmp_path / ".stage.old").exists()


def test_a_kill_between_the_renames_is_completed_on_the_next_run(tmp_path):
    stage = tmp_path / "stage"
    run_stage(stage, "s", {"a": 1}, {}, _write("v1"))
    run_stage(stage, "s", {"a": 2}, {}, _write("v2"))
    # as if killed after stage -> .stage.old but before .stage.next -> stage, new manifest written
    (tmp_path / ".stage.next").mkdir()
    (tmp_path / ".stage.next" / "manifest.json").write_text((stage / "manifest.json").read_text())
    stage.rename(tmp_path / ".stage.old")
    again = run_stage(stage, "s", {"a": 2}, {}, _write("never"))
    assert again["metrics"] == {"value": "v2"} and not (tmp_path / ".stage.old").exists()


def _canonical(root: Path, bad: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.jsonl").write_text("".join(json.dumps({"item_id": f"i{i}", "title": f"t{i}"}) + "\n"
                                              for i in range(6)))
    rows = [f"u{u},i{(u + k) % 6},{k}" for u in range(8) for k in range(5)]
    if bad:
        rows.append("u1,i1,not-a-time")
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return root


def test_an_upstream_is_its_manifest_else_its_files_else_an_error_naming_the_command(tmp_path):
    stage = tmp_path / "prepare"
    stage.mkdir()
    prepared = Upstream("prepare", stage, ("items.jsonl",))
    with pytest.raises(FileNotFoundError, match=r"stage 'prepare' has not run .*run `launcher prepare` first"):
        prepared.fingerprint()
    (stage / "items.jsonl").write_text("x\n")
    assert prepared.fingerprint() == hash_files([stage / "items.jsonl"])  # a folder made outside the launcher
    done = run_stage(stage, "prepare", {"a": 1}, {}, _write("v1"))
    assert prepared.fingerprint() == done["fingerprint"]  # the manifest wins
    assert Upstream("label", stage, ("*.txt",), by_content=True).fingerprint() == hash_files([stage / "result.txt"])
    assert Upstream("label", tmp_path / "none", ("*.txt",), by_content=True).fingerprint() == "none"


def test_failed_prepare_rerun_leaves_prepare_usable_downstream(tmp_path):
    sets = [f"run_dir={tmp_path / 'run'}", "data.format=canonical", f"data.source={tmp_path / 'raw'}",
            "data.kcore=1"]
    _canonical(tmp_path / "raw")
    done = prepare(load_config(None, sets))
    _canonical(tmp_path / "raw", bad=True)
    with pytest.raises(ValueError, match="interactions.csv"):
        prepare(load_config(None, sets), force=True)
    assert _upstream(load_config(None, sets), "prepare") == done["fingerprint"]
    assert (tmp_path / "run" / "prepare" / "sequences.jsonl").exists()


def test_cut_off_manifest_names_the_file_and_a_rerun_repairs_it(tmp_path):
    stage = tmp_path / "prepare"
    run_stage(stage, "s", {"a": 1}, {}, _write("v1"))
    text = (stage / "manifest.json").read_text()
    (stage / "manifest.json").write_text(text[:29])
    with pytest.raises(ManifestError, match=r"prepare/manifest.json is unreadable .*re-run that stage"):
        read_manifest(stage)
    cmd = [sys.executable, "-m", "launcher", "train-id", "--set", f"run_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{stage / 'manifest.json'} is unreadable" in proc.stderr.strip().splitlines()[-1]
    repaired = run_stage(stage, "s", {"a": 1}, {}, _write("v1"))  # not skipped, not stuck
    assert read_manifest(stage) == repaired


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.3, epochs=4, patience=4)
    full = train_id(cfg, prepared, tmp_path / "full", seed=1)["metrics"]
    out = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted):
        train_id(cfg, prepared, out, seed=1, stop_after_epoch=1)
    ckpt = out / "checkpoint"
    assert (ckpt / "state.pt").exists() and (ckpt / "state.prev.pt").exists()
    _truncate(ckpt / "state.pt")  # a kill during the write of epoch 1's checkpoint
    torch.manual_seed(12345)
    resumed = train_id(cfg, prepared, out, seed=1)["metrics"]  # from epoch 0's checkpoint
    assert "resumed from the previous one" in caplog.text and "state.pt" in caplog.text
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert resumed["epochs_run"] == full["epochs_run"]


def test_no_readable_checkpoint_names_the_file_and_force_restarts(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, epochs=3, patience=3)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted):
        train_id(cfg, prepared, out, seed=0, stop_after_epoch=1)
    for name in ("state.pt", "state.prev.pt"):
        _truncate(out / "checkpoint" / name)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*checkpoint .*state.pt.*--force"):
        train_id(cfg, prepared, out, seed=0)
    assert train_id(cfg, prepared, out, seed=0, force=True)["metrics"]["epochs_run"] == 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x).pow(2).mean()


@pytest.mark.slow
def test_deepspeed_checkpoint_keeps_the_previous_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    torch.manual_seed(0)
    model = Tiny()
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), SINGLE,
                          TrainConfig(engine="deepspeed", batch_size=2, precision="fp32", zero_stage=1))
    for step in (1, 2):
        engine.backward(engine(torch.randn(2, 3)))
        engine.step()
        engine.save(tmp_path, {"step": step})
    newest = (tmp_path / "latest").read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["slot0", "slot1"] and newest == "slot1"
    assert engine.load(tmp_path) == {"step": 2}
    for f in (tmp_path / newest).iterdir():
        _truncate(f)
    assert engine.load(tmp_path) == {"step": 1}


@pytest.mark.parametrize("key, value, message", [
    ("train_id.max_len", 0, "train_id.max_len=0 is out of range: must be >= 1"),
    ("train_id.batch_size", 0, "train_id.batch_size=0 is out of range: must be >= 1"),
    ("sicsrec.train.batch_size", -4, "sicsrec.train.batch_size=-4 is out of range"),
    ("train_id.lr", -0.001, "train_id.lr=-0.001 is out of range: must be > 0"),
    ("tssr.dropout", 1.0, r"tssr.dropout=1.0 is out of range: must be in \[0, 1\)"),
    ("sft.temperature", 0, "sft.temperature=0.0 is out of range: must be > 0"),
    ("data.kcore", 0, "data.kcore=0 is out of range"),
    ("train_id.window_stride", -1, "train_id.window_stride=-1 is out of range: must be >= 0"),
])
def test_out_of_range_config_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{key}={value}"])


def test_config_ranges_accept_the_defaults_and_the_shipped_configs(monkeypatch):
    load_config(None, ["label.temperature=0", "train_id.dropout=0", "train_id.zero_stage=-1"])
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="train_id.batch_size=2 is smaller than the world size 4"):
        load_config(None, ["train_id.batch_size=2"])


def test_window_stride_needs_all_windows_and_at_most_max_len():
    load_config(None, ["train_id.windows=all", "train_id.window_stride=10", "train_id.max_len=50"])
    with pytest.raises(ConfigError, match="train_id.window_stride=10 needs train_id.windows=all"):
        load_config(None, ["train_id.windows=last", "train_id.window_stride=10"])
    with pytest.raises(ConfigError, match=r"sicsrec.train.window_stride=9 .* at most sicsrec.train.max_len=8"):
        load_config(None, ["sicsrec.train.windows=all", "sicsrec.train.window_stride=9", "sicsrec.train.max_len=8"])


def test_bad_config_value_is_one_line_on_the_cli(tmp_path):
    cmd = [sys.executable, "-m", "launcher", "train-id", "--set", f"run_dir={tmp_path}", "--set", "train_id.max_len=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: train_id.max_len=0 is out of range: must be >= 1")


def test_a_field_added_at_its_default_leaves_the_fingerprint_of_earlier_runs_unchanged():
    """sicsrec.content_tables came after run directories existed: at its default it is not part of
    the train-sicsrec fingerprint (those runs are not redone); set otherwise it is."""
    from sicsrec.config import SICSRecConfig
    from sicsrec.runtime.rundir import fingerprinted

    before = fingerprinted(SICSRecConfig())
    assert "content_tables" not in before  # the section as it was before the field existed
    changed = fingerprinted(dataclasses.replace(SICSRecConfig(), content_tables="trainable"))
    assert changed == dict(before, content_tables="trainable")
    nested = dataclasses.replace(SICSRecConfig(), train=dataclasses.replace(SICSRecConfig().train, lr=0.5))
    assert fingerprinted(nested)["train"] == dict(before["train"], lr=0.5)

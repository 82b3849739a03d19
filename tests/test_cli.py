import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def launcher(*args):
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_pipeline_prints_stats_and_skips_done_stages(tmp_path):
    """The whole demo pipeline (synth ... train-sicsrec) on a reduced config."""
    args = ["pipeline", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path),
            "--set", "data.synth.num_users=120", "--set", "data.synth.num_items=60", "--set", "sft.epochs=1",
            "--set", "train_id.epochs=2", "--set", "sicsrec.train.epochs=2"]
    first = launcher(*args)
    assert first.returncode == 0, first.stderr
    assert "#Users" in first.stdout and "#Interactions" in first.stdout
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["metrics"]["item_shards"] >= 1 and manifest["inputs"]["prepare"]
    assert "SASRec (step 1)" in first.stdout and "SICSRec" in first.stdout and "ndcg@10" in first.stdout
    for stage in ("label", "sft", "embeddings", "train_id", "sicsrec"):
        assert (tmp_path / stage / "manifest.json").exists(), stage
    second = launcher(*args)
    assert second.returncode == 0 and second.stderr.count("skipping") == 8
    changed = launcher(*args, "--set", "shard.items_per_shard=7")
    assert "shard: done already" not in changed.stderr and "prepare: done already" in changed.stderr


def test_help_and_clear_errors(tmp_path):
    help_text = launcher("--help").stdout
    assert "pipeline" in help_text and "prepare" in help_text and "examples:" in help_text
    bad = launcher("prepare", "--run-dir", str(tmp_path), "--set", "data.format=canonical")
    assert bad.returncode == 2 and "needs data.source" in bad.stderr
    typo = launcher("pipeline", "--set", "data.kcor=1")
    assert typo.returncode == 2 and "unknown key" in typo.stderr
    missing = launcher("shard", "--run-dir", str(tmp_path / "empty"))
    assert missing.returncode == 2 and "stage 'prepare' has not run" in missing.stderr

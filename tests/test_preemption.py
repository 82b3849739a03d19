"""Preemption: a trainer signalled mid-epoch (SIGUSR1 from itself through the test hook, or
SIGTERM sent to torchrun from outside) checkpoints at a step boundary, exits with status 75, and
the re-run ends exactly as an uninterrupted run with the same seed: final metrics, loss log,
weights. Covers step 1 (1 process via the CLI; 2 DDP ranks under torchrun) and SFT (1 process,
images, loader workers)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher import stages
from launcher.config import load_config
from sicsrec.preemption import REQUEUE_EXIT_CODE, REQUEUE_FILE_ENV, TEST_HOOK_ENV, Preempted, PreemptionGuard
from sicsrec.runtime.rundir import run_stage
from sicsrec.train import train_id
from tests.helpers import copy_run
from tests.test_train_id import TINY, make_dataset

REPO = Path(__file__).resolve().parents[1]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _checkpoint_state(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=False)["client_state"]["sicsrec"]["client"]


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert got["best_epoch"] == expected["best_epoch"] and got["epochs_run"] == expected["epochs_run"]
    for split in ("valid", "test"):
        for name, value in expected[split].items():
            assert got[split][name] == pytest.approx(value, abs=1e-6), (split, name)
    for mine, theirs in zip(got["history"], expected["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-9)
        assert mine["sequences"] == theirs["sequences"]


def _step1_sets(root: Path, **changes) -> list[str]:
    train = TINY | {"epochs": 3, "patience": 5} | changes
    return [f"run_dir={root}"] + [f"train_id.{k}={v}" for k, v in train.items()]


def _prepare(root: Path, num_users: int) -> None:
    run_stage(root / "prepare", "prepare", {}, {}, lambda out: make_dataset(out, num_users=num_users) and {})


def test_guard_records_signals_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)  # a second signal changes nothing
        assert guard.should_stop() and guard.received == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert Preempted("x").code == REQUEUE_EXIT_CODE == 75


@pytest.mark.slow
def test_step1_one_process_preempted_by_sigusr1_resumes_exactly(tmp_path):
    _prepare(tmp_path, num_users=37)  # 37 windows, batches of 8: 5 steps per epoch
    sets = _step1_sets(tmp_path, dropout=0.3, engine="single")  # dropout: the RNG state must resume too
    cfg = load_config(None, sets)
    train_id(cfg.train_id, tmp_path / "prepare", tmp_path / "reference", cfg.seed)

    marker = tmp_path / "requeue.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()),
               **{TEST_HOOK_ENV: "7", REQUEUE_FILE_ENV: str(marker)})
    cmd = [sys.executable, "-m", "launcher", "train-id"] + [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    assert "SIGUSR1: checkpoint saved at epoch 1, 2 batch(es) into it" in proc.stderr
    out = tmp_path / "train_id"
    assert not (out / "manifest.json").exists()
    state = _checkpoint_state(out)
    assert (state["epoch"], state["step"], state["position"]["epoch"], state["position"]["batches"]) == (0, 7, 1, 2)
    assert json.loads(marker.read_text())["step"] == 7 and [r["step"] for r in _log(out)] == list(range(1, 8))
    with open(out / "train_log.jsonl", "a") as f:  # as if a killed run had logged past its checkpoint
        f.write(json.dumps({"epoch": 1, "step": 8, "loss": 123.0}) + "\n")

    torch.manual_seed(12345)  # a fresh process would not continue the old RNG stream
    train_id(cfg.train_id, tmp_path / "prepare", out, cfg.seed)
    _assert_same_metrics(_metrics(out), _metrics(tmp_path / "reference"))
    assert _log(out) == _log(tmp_path / "reference")


# ------------------------------------------------------------------ 2 ranks: SIGTERM to torchrun

def _torchrun(args: list[str], env: dict) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__] + args
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_step1_two_ranks_sigterm_to_torchrun_resumes_exactly(tmp_path):
    _prepare(tmp_path, num_users=160)  # 20 steps per epoch: long enough to be signalled mid-run
    sets = json.dumps(_step1_sets(tmp_path, dropout=0.0, engine="ddp", epochs=4))
    marker = tmp_path / "requeue.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{REQUEUE_FILE_ENV: str(marker)})
    env.pop(TEST_HOOK_ENV, None)
    log_path = tmp_path / "train_id" / "train_log.jsonl"
    job = _torchrun(["train", sets], env)
    deadline = time.time() + 240
    while not (log_path.exists() and log_path.read_text()):  # one step done: send the signal
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=240)
    # torchrun forwards SIGTERM to its workers, waits for them, then exits 1 itself (its own
    # SignalException): the workers' status 75 reaches the batch script via the requeue file
    assert job.returncode != 0 and err.count(f"exiting with status {REQUEUE_EXIT_CODE}") == 1, err[-3000:]
    record = json.loads(marker.read_text())
    assert record["exit_code"] == REQUEUE_EXIT_CODE and record["signal"] == "SIGTERM"
    assert not (tmp_path / "train_id" / "manifest.json").exists()
    steps_done = len(_log(tmp_path / "train_id"))
    assert record["step"] == steps_done

    job = _torchrun(["resume-and-reference", sets], env)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-5000:]
    resumed, expected = _metrics(tmp_path / "train_id"), _metrics(tmp_path / "reference")
    assert resumed["world_size"] == 2 and steps_done < len(_log(tmp_path / "reference")) == 4 * 19
    _assert_same_metrics(resumed, expected)
    assert _log(tmp_path / "train_id") == _log(tmp_path / "reference")


# ------------------------------------------------------------------ SFT, 1 process

@pytest.mark.slow
def test_sft_one_process_preempted_mid_epoch_resumes_exactly(synth_run, tmp_path, monkeypatch):
    from sicsrec.sft import sft
    from test_sft import tiny_sft, write_labels

    root, dataset = synth_run
    copy_run(root, tmp_path)
    write_labels(dataset, tmp_path / "label")
    cfg = tiny_sft(engine="single", epochs=2, num_workers=2)  # images (random crops) via 2 loader workers
    paths = (tmp_path / "prepare", tmp_path / "shards", tmp_path / "label")
    full = sft(cfg, *paths, tmp_path / "full", seed=0)["metrics"]
    assert full["steps"] == 24  # 48 training pairs / micro batch 4, 2 epochs

    monkeypatch.setenv(TEST_HOOK_ENV, "17")  # 5 micro batches into epoch 1
    with pytest.raises(Preempted) as stopped:
        sft(cfg, *paths, tmp_path / "killed", seed=0)
    assert stopped.value.code == REQUEUE_EXIT_CODE
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    state = _checkpoint_state(tmp_path / "killed")
    assert (state["epoch"], state["step"], state["position"]["batches"]) == (0, 17, 5)
    monkeypatch.delenv(TEST_HOOK_ENV)

    torch.manual_seed(12345)
    resumed = sft(cfg, *paths, tmp_path / "killed", seed=0)["metrics"]
    assert _log(tmp_path / "killed") == _log(tmp_path / "full")
    assert resumed["after"] == full["after"] and resumed["final_loss"] == full["final_loss"]
    a = torch.load(tmp_path / "full" / "encoder" / "encoders.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "encoder" / "encoders.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ TSSR, gradient accumulation

@pytest.mark.slow
def test_tssr_with_grad_accum_preempted_at_an_odd_micro_step_resumes_exactly(synth_run, tmp_path, monkeypatch):
    """The signal arrives after micro step 3 of a grad_accum=2 run: the trainer finishes that
    optimizer step (micro step 4) before it checkpoints, so the resumed run takes every optimizer
    step of the uninterrupted one (DeepSpeed, 1 process, cached content)."""
    import numpy as np

    from test_train_tssr import tiny_tssr

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    root, dataset = synth_run
    copy_run(root, tmp_path)
    text = np.random.default_rng(0).normal(size=(dataset.num_items + 1, 6)).astype(np.float32)
    run_stage(tmp_path / "embeddings", "encode", {}, {}, lambda out: np.save(out / "text.npy", text) or {})
    for name in ("full", "killed"):
        for stage in ("prepare", "shards", "embeddings"):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / stage).symlink_to(tmp_path / stage)
    sets = ("tssr.content=cache", "tssr.use_image=false", "tssr.train.engine=deepspeed", "tssr.train.zero_stage=1",
            "tssr.train.grad_accum=2", "tssr.train.batch_size=16")  # micro batch 8
    full = stages.run(tiny_tssr(tmp_path / "full", *sets), "train-tssr")["metrics"]
    assert (full["micro_steps"], full["optimizer_steps"]) == (12, 6)  # 7 micro batches an epoch -> 6, 2 epochs

    killed = tiny_tssr(tmp_path / "killed", *sets)
    monkeypatch.setenv(TEST_HOOK_ENV, "3")
    with pytest.raises(Preempted):
        stages.run(killed, "train-tssr")
    monkeypatch.delenv(TEST_HOOK_ENV)
    assert [r["step"] for r in _log(tmp_path / "killed" / "tssr")] == [1, 2, 3, 4]  # stopped at a boundary
    torch.manual_seed(12345)
    resumed = stages.run(killed, "train-tssr")["metrics"]
    assert (resumed["micro_steps"], resumed["optimizer_steps"]) == (12, 6)
    assert _log(tmp_path / "killed" / "tssr") == _log(tmp_path / "full" / "tssr")
    for split in ("valid", "test"):
        assert resumed[split] == full[split]


if __name__ == "__main__":  # a torchrun worker: train | resume-and-reference, then the --set list as JSON
    import logging

    logging.basicConfig(level=logging.INFO)
    worker_cfg = load_config(None, json.loads(sys.argv[2]))
    run = Path(worker_cfg.run_dir)
    train_id(worker_cfg.train_id, run / "prepare", run / "train_id", worker_cfg.seed)  # Preempted: exit 75
    if sys.argv[1] == "resume-and-reference":
        train_id(worker_cfg.train_id, run / "prepare", run / "reference", worker_cfg.seed)

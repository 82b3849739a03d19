import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from sicsrec.train import train_id
from tests.helpers import REPO
from tests.test_preemption import _assert_same_metrics, _log, _metrics, _prepare, _step1_sets

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"train.sbatch", "label.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_document_themselves(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert text.splitlines()[0] in ("#!/bin/bash", "#!/usr/bin/env bash") and "#SBATCH" in text
    header = text.split("#SBATCH", 1)[0]
    assert "Environment" in header or "env" in header.lower()  # documented at the top: how to override


# ---------------------------------------------- train.sbatch's preemption trap, under a fake SLURM

FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done  # drop srun's own options, run the task here
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo localhost; else echo "$@" >> "$SCONTROL_CALLS"; fi
"""


def _fake_slurm(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_id = next(p - 15000 for p in random.sample(range(15000, 35000), 200) if _port_free(p))
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()),
                SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_NUM_NODES="1", SCONTROL_CALLS=str(tmp_path / "scontrol_calls"), VENV=str(REPO / ".venv"),
                STAGE="train-id", CONFIG=str(REPO / "configs" / "demo.yaml"), NPROC="1",
                EXTRA=" ".join(f"--set {s}" for s in _step1_sets(tmp_path, dropout=0.0, engine="single", epochs=15, patience=15)))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.slow
def test_train_sbatch_forwards_usr1_checkpoints_and_requeues(tmp_path):
    """SLURM's time-limit warning (USR1 to the batch shell) reaches the worker through srun and
    torchrun; the worker checkpoints and the script requeues the job; the requeued job finishes
    exactly like an uninterrupted run."""
    _prepare(tmp_path, num_users=160)
    env = _fake_slurm(tmp_path)
    log_path = tmp_path / "train_id" / "train_log.jsonl"
    job = subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch")], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (log_path.exists() and log_path.read_text()):  # training has started: warn of the time limit
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0 and "requeueing job" in out, out[-6000:]
    assert (tmp_path / "scontrol_calls").read_text() == f"requeue {env['SLURM_JOB_ID']}\n"
    assert not (tmp_path / "train_id" / "manifest.json").exists()
    steps_done = len(_log(tmp_path / "train_id"))

    requeued = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert (tmp_path / "scontrol_calls").read_text().count("requeue") == 1
    cfg = load_config(None, _step1_sets(tmp_path, dropout=0.0, engine="single", epochs=15, patience=15))
    train_id(cfg.train_id, tmp_path / "prepare", tmp_path / "reference", cfg.seed)
    assert 0 < steps_done < len(_log(tmp_path / "reference"))
    _assert_same_metrics(_metrics(tmp_path / "train_id"), _metrics(tmp_path / "reference"))
    assert _log(tmp_path / "train_id") == _log(tmp_path / "reference")

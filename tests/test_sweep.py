"""`launcher sweep-batch`: lr scaling rules, one row per batch size with table / JSON / plots,
finished runs skipped, and `--index` runs + `--collect` giving the full run's results."""
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.sweep import parse_batch_sizes, scaled_lr
from sicsrec.runtime.rundir import run_stage
from tests.test_train_id import make_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train_id.hidden=16", "train_id.layers=1", "train_id.max_len=8", "train_id.eval_batch_size=16",
         "train_id.lr=0.004", "train_id.batch_size=8", "train_id.epochs=3", "train_id.patience=3",
         "train_id.dropout=0.2", "train_id.engine=auto"]
DETERMINISTIC = ("batch", "world_size", "lr", "epochs", "best_epoch", "ndcg@10", "hit@10", "alignment", "uniformity")


def test_lr_scaling_rules():
    assert scaled_lr(1e-3, 128, 512, "none") == 1e-3
    assert scaled_lr(1e-3, 128, 512, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 128, 512, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 128, 32, "sqrt") == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr scaling"):
        scaled_lr(1e-3, 128, 512, "cubic")
    assert parse_batch_sizes("64,128, 256") == [64, 128, 256]
    for bad in ("64,x", "64,64", "0,8", ""):
        with pytest.raises(ValueError):
            parse_batch_sizes(bad)


def make_run_dir(root: Path) -> Path:
    run_stage(root / "prepare", "prepare", {}, {}, lambda out: make_dataset(out, num_users=30) and {})
    return root


def sweep(run: Path, *extra: str) -> int:
    sets = [a for s in TRAIN for a in ("--set", s)]
    return main(["sweep-batch", "--stage", "train-id", "--batch-sizes", "4,8", "--lr-scaling", "sqrt",
                 "--base-batch", "8", "--run-dir", str(run), *sets, *extra])


def rows(run: Path) -> list[dict]:
    return json.loads((run / "sweep" / "train-id" / "sweep.json").read_text())["rows"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("full"))
    assert sweep(run) == 0
    return run


@pytest.mark.slow
def test_full_sweep_writes_table_json_and_plots(full_run, capsys):
    out = full_run / "sweep" / "train-id"
    got = rows(full_run)
    assert [r["batch"] for r in got] == [4, 8] and all(r["world_size"] == 1 for r in got)
    assert [r["lr"] for r in got] == pytest.approx([0.004 * math.sqrt(0.5), 0.004])
    for r in got:
        sub = out / f"b{r['batch']}-sqrt"
        metrics = json.loads((sub / "train_id" / "metrics.json").read_text())
        assert r["ndcg@10"] == metrics["test"]["ndcg@10"] and r["samples_per_s"] == metrics["sequences_per_s"]
        assert r["peak_memory_mb"] > 0 and 0 <= r["alignment"] <= 4 and r["uniformity"] <= 0
        assert (sub / "prepare").is_symlink() and (sub / "prepare").resolve() == (full_run / "prepare").resolve()
        manifest = json.loads((sub / "train_id" / "manifest.json").read_text())
        assert manifest["config"]["batch_size"] == r["batch"] and manifest["config"]["lr"] == pytest.approx(r["lr"])
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| batch | world size | lr | samples/s | peak mem (MB) | epochs | test NDCG@10")
    assert len(table) == 2 + 2 and table[2].startswith("| 4 | 1 |")
    for name in ("quality", "throughput", "align_uniform"):
        assert (out / f"sweep_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_a_lost_row(full_run, capsys):
    out = full_run / "sweep" / "train-id"
    before = rows(full_run)
    stamps = {b: (out / f"b{b}-sqrt" / "train_id" / "manifest.json").stat().st_mtime_ns for b in (4, 8)}
    (out / "b4-sqrt" / "row.json").unlink()  # e.g. killed after the stage finished
    assert sweep(full_run) == 0
    assert "| 8 | 1 |" in capsys.readouterr().out  # the table is printed
    after = rows(full_run)
    assert after[1] == before[1]  # untouched
    assert {k: after[0][k] for k in DETERMINISTIC} == {k: before[0][k] for k in DETERMINISTIC}
    assert after[0]["peak_memory_mb"] is None  # not measured: the stage did not run again
    assert stamps == {b: (out / f"b{b}-sqrt" / "train_id" / "manifest.json").stat().st_mtime_ns for b in (4, 8)}


@pytest.mark.slow
def test_index_runs_and_collect_match_the_full_run(full_run, tmp_path, capsys):
    run = make_run_dir(tmp_path)
    assert sweep(run, "--index", "1") == 0
    assert not (run / "sweep" / "train-id" / "b4-sqrt" / "row.json").exists()
    assert sweep(run, "--index", "0") == 0
    assert sweep(run, "--collect") == 0
    collected = (run / "sweep" / "train-id" / "sweep.md").read_text()
    assert [{k: r[k] for k in DETERMINISTIC} for r in rows(run)] == \
           [{k: r[k] for k in DETERMINISTIC} for r in rows(full_run)]
    assert sweep(run) == 0  # the full command now only collects the finished runs
    assert (run / "sweep" / "train-id" / "sweep.md").read_text() == collected


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    assert sweep(tmp_path, "--index", "2") == 2
    assert "--index 2 is out of range" in capsys.readouterr().err
    assert sweep(tmp_path) == 2  # no prepare stage in this run dir
    assert "no finished ['prepare'] stage" in capsys.readouterr().err
    assert sweep(tmp_path, "--collect") == 2
    assert "no finished sweep runs" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path):
    run = make_run_dir(tmp_path)
    sets = [a for s in TRAIN for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "launcher", "sweep-batch", "--stage", "train-id", "--batch-sizes", "8", "--run-dir", str(run), *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = rows(run)
    assert row["world_size"] == 2 and row["batch"] == 8 and row["lr"] == 0.004 and row["peak_memory_mb"] > 0
    manifest = json.loads((run / "sweep" / "train-id" / "b8-none" / "train_id" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["engine"] == "ddp"


FAKE_SRUN = '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done  # drop srun options, run the task here\nexec "$@"\n'
FAKE_SCONTROL = "#!/bin/bash\necho localhost\n"


def _job_id_with_free_port() -> int:
    """A job id whose rendezvous port (15000 + id % 20000, as in the script) is free now."""
    for port in random.sample(range(15000, 35000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port - 15000
            except OSError:
                pass
    raise RuntimeError("no free port in 15000..35000")


@pytest.mark.slow
def test_sbatch_array_task_and_collect_step_under_fake_slurm(full_run, tmp_path):
    """slurm/sweep_batch.sbatch: array task 1 trains the 2nd batch size (through srun + torchrun),
    the COLLECT=1 step tabulates it; the row equals the in-process full sweep's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run = make_run_dir(tmp_path / "run")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID=str(_job_id_with_free_port()),
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", VENV=str(REPO / ".venv"), NPROC="1",
               SWEEP_STAGE="train-id", BATCH_SIZES="4,8", BASE_BATCH="8", RUN_DIR=str(run),
               CONFIG=str(REPO / "configs" / "demo.yaml"), EXTRA=" ".join(f"--set {s}" for s in TRAIN))
    script = str(REPO / "slurm" / "sweep_batch.sbatch")
    for extra in ({"SLURM_ARRAY_TASK_ID": "1"}, {"COLLECT": "1"}):
        done = subprocess.run(["bash", script], cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (row,) = rows(run)
    full_row = next(r for r in rows(full_run) if r["batch"] == 8)
    # another process with another thread count: float reductions may differ in the last bits
    assert {k: row[k] for k in DETERMINISTIC} == pytest.approx({k: full_row[k] for k in DETERMINISTIC}, rel=1e-5)
    assert json.loads((run / "sweep" / "train-id" / "sweep.json").read_text())["missing"] == [4]

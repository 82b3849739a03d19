"""Large item tables under DeepSpeed ZeRO-3 (issue #15 item 4), 2 gloo ranks via torchrun on CPU.

- ZeRO-3 partitions the item table: each rank holds half of `item_emb.weight` (DeepSpeed's
  `ds_tensor`), the loss sees the whole table inside each forward, the partitions in rank order
  are the table, and after training steps and after evaluation the table is partitioned again
  (tests/zero3_probe.py, with the repository's ds_config.json: a table of 7001 x 16 = 112016
  elements, above DeepSpeed's `stage3_param_persistence_threshold` of 1e5 below which a
  parameter stays whole on every rank).
- Step 1 (train_id, killed after epoch 0 and resumed from its ZeRO checkpoint) and step 2
  (launcher train-sicsrec) under ZeRO-3 follow the ZeRO-2 loss curves and end at the same
  valid/test metrics. These use a ds_config with `stage3_param_persistence_threshold: 0`, so that
  every parameter of the small test models is partitioned as a large table would be.

Tolerances (fp32 on CPU). ZeRO-2 and ZeRO-3 do the same arithmetic; what differs is where the
weights live (views into ZeRO-2's flat buffer vs tensors all-gathered from partitions) and how the
gradients are reduced (buckets vs partitions), which can move a CPU kernel's result by an ulp.
Measured: the per-step losses agree to 7.7e-08 relative at most (one fp32 ulp at a loss of ~3,
in one step of ten; step 2: 7.1e-08, also one step), the valid/test metrics exactly. Asserted:
losses rel 1e-6 (~13 ulps), metrics abs 1e-6: a one-ulp score change moves a rank only at an exact
tie, and the metrics are means over 37 users of functions of ranks, which one user's rank moving by
one (within the top 20) changes by more than 1e-4.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sicsrec.config import TrainConfig
from tests.test_train_id import TINY, _losses, _torchrun, make_dataset
from tests.helpers import copy_run
from tests.test_train_sicsrec import _cli_sets

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per torchrun: a hung collective fails the test instead of blocking it
LOSS_REL, METRIC_ABS = 1e-6, 1e-6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")


def _torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_port()), *args]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def all_partitioned_config(path: Path) -> Path:
    """The repository's ds_config.json with every parameter partitioned under ZeRO-3 (stage 2 ignores it)."""
    cfg = json.loads((REPO / "ds_config.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _assert_same_metrics(got: dict, expected: dict) -> None:
    for split in ("valid", "test"):
        assert got[split]["users"] == expected[split]["users"] == 37
        for name, value in expected[split].items():
            assert got[split][name] == pytest.approx(value, abs=METRIC_ABS), (split, name)


@pytest.mark.slow
def test_zero3_partitions_the_item_table(tmp_path):
    prepared = make_dataset(tmp_path / "prepare", num_users=37, num_items=7000)
    cfg = TrainConfig(**dict(TINY, eval_batch_size=6), dropout=0.0, epochs=1, patience=1, engine="deepspeed",
                      zero_stage=3)  # eval batches of 6: 19 and 18 users make 4 and 3 batches (padded to equal)
    _run(_torchrun_cmd(str(REPO / "tests" / "zero3_probe.py"), str(prepared), str(tmp_path / "probe"),
                       json.dumps(dataclasses.asdict(cfg))))
    reports = [json.loads((tmp_path / "probe" / f"probe_rank{r}.json").read_text()) for r in range(2)]
    full = 7001 * TINY["hidden"]
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"], report["zero_stage"]) == (rank, 2, 3)
        for when in ("built", "after_steps", "after_gather", "after_eval"):
            table = report[when]
            assert table["ds_numel"] == full and table["shape"] == [7001, TINY["hidden"]]
            assert table["status"] == "NOT_AVAILABLE" and table["data_numel"] == 0 and not table["persist"], when
            assert table["partition_numel"] == -(-full // 2) < full, when  # this rank's half only
        # inside each of the epoch's 5 forwards the loss scored against the whole table
        assert report["steps"] == 5 and report["forward_table_shapes"] == [[7001, TINY["hidden"]]] * 5
        assert report["partitions_are_the_table"]
        # the optimizer's fp32 state is partitioned too: half of all parameters per rank
        total = sum(p["ds_numel"] for p in report["parameters"].values())
        assert report["optimizer_partition_numel"] == -(-total // 2) < total
    assert sum(r["after_steps"]["partition_numel"] for r in reports) == full + reports[0]["padding"]
    assert reports[0]["padding"] < 2
    assert reports[0]["valid"] == reports[1]["valid"] and reports[0]["valid"]["users"] == 37
    assert reports[0]["loss"] == reports[1]["loss"]


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    return all_partitioned_config(tmp_path_factory.mktemp("zero3") / "ds_config_all_partitioned.json")


@pytest.mark.slow
def test_zero3_step1_follows_zero2(tmp_path, ds_config):
    """Both runs are killed after epoch 0 and resume from their own DeepSpeed checkpoint (_torchrun)."""
    prepared = make_dataset(tmp_path / "prepare", num_users=37)
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=2, patience=5, engine="deepspeed", ds_config=str(ds_config))
    metrics = {}
    for stage in (2, 3):
        _torchrun(prepared, tmp_path / f"zero{stage}", dataclasses.replace(cfg, zero_stage=stage))
        metrics[stage] = json.loads((tmp_path / f"zero{stage}" / "metrics.json").read_text())
        assert (metrics[stage]["engine"], metrics[stage]["zero_stage"], metrics[stage]["world_size"]) == \
            ("deepspeed", stage, 2)
    expected = _losses(tmp_path / "zero2")
    assert len(expected) == 10  # 37 windows in global batches of 8: 5 steps x 2 epochs
    assert _losses(tmp_path / "zero3") == pytest.approx(expected, rel=LOSS_REL)
    _assert_same_metrics(metrics[3], metrics[2])
    assert metrics[3]["best_epoch"] == metrics[2]["best_epoch"]


@pytest.mark.slow
def test_zero3_step2_follows_zero2(step1_run, tmp_path, ds_config):
    """SICSRec step 2 (fixed_id_enc: frozen encoder + LoRA, E_id and the content adapters in the
    L2 term, which its loss reads outside their modules' forwards: SICSRecLoss.external_parameters)."""
    run = copy_run(step1_run, tmp_path / "run")
    sets = [kv.replace("sicsrec.train.engine=ddp", "sicsrec.train.engine=deepspeed") for kv in _cli_sets(run)]
    sets.append(f"sicsrec.train.ds_config={ds_config}")
    losses, metrics = {}, {}
    for stage in (2, 3):
        args = [*sets, f"sicsrec.train.zero_stage={stage}"]
        _run(_torchrun_cmd("-m", "launcher", "train-sicsrec", "--force", "--run-dir", str(run),
                           *[a for kv in args for a in ("--set", kv)]))
        losses[stage] = _losses(run / "sicsrec")
        metrics[stage] = json.loads((run / "sicsrec" / "metrics.json").read_text())
        assert (metrics[stage]["engine"], metrics[stage]["zero_stage"], metrics[stage]["world_size"]) == \
            ("deepspeed", stage, 2)
    assert len(losses[2]) == 10 and losses[3] == pytest.approx(losses[2], rel=LOSS_REL)
    _assert_same_metrics(metrics[3], metrics[2])
    assert [h["extra_loss"] for h in metrics[3]["history"][1:]] == \
        pytest.approx([h["extra_loss"] for h in metrics[2]["history"][1:]], rel=LOSS_REL)  # ConCL + L2

"""The sbatch scripts on real SLURM clusters on this machine (slurm/local_cluster.sh: munged,
slurmctld and slurmd(s)), not under a fake srun/scontrol as in test_slurm.py:

- train.sbatch, 2 gloo ranks under srun + torchrun on one node, and 1 rank on each of two nodes
  (network namespaces: own address and hostname), ends with the test metrics of a plain
  1-process run on the same global batch;
- the same job, sent USR1 by SLURM (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@180`
  does before the time limit) once it has logged a step, checkpoints, requeues itself with
  `scontrol requeue`, runs a second time and ends exactly like the uninterrupted job;
- sweep_batch.sbatch as a real array job plus its dependent (afterany) collect job;
- label.sbatch: a Ray head on node1 and a Ray worker on node2 started through srun (the head
  only, on one node, where network namespaces are unavailable), the labeling driver on the batch
  host, the same records and pairs as a local run of the deterministic backend.

Needs root and Debian's slurm-wlm + munge (`apt-get install -y slurm-wlm munge`); skipped
otherwise (the two-node tests also skip without network namespaces). Each cluster lives in a
temporary folder (and its own namespaces) on free ports, so it never meets a cluster started by
hand with `slurm/local_cluster.sh up`. Each job's wall time is printed (pytest -s).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_train_id import TINY, make_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
CONFIG = REPO / "configs" / "demo.yaml"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
# 160 users, global batch 8 on 2 ranks: 20 steps an epoch, long enough to be signalled mid-run
TRAIN = TINY | {"epochs": 3, "patience": 5, "dropout": 0.0}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "real-SLURM tests need root (slurmd runs the jobs; slurm/local_cluster.sh starts the daemons)"
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return (f"real-SLURM tests need Debian's slurm-wlm and munge ({', '.join(missing)} not found): "
                "apt-get install -y slurm-wlm munge")
    return None


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 60000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


class Cluster:
    """A cluster of slurm/local_cluster.sh; SLURM commands go through `local_cluster.sh exec`
    (with several nodes they must run in node1's network namespace)."""

    def __init__(self, env: dict, folder: Path, nodes: int):
        self.env, self.folder, self.nodes = env, folder, nodes
        self.cpus = int(self.run("sinfo", "-h", "-o", "%c").stdout.split()[0])  # each node's CPUs (nproc)

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run([str(LOCAL_CLUSTER), "exec", *cmd], env=kwargs.pop("env", self.env),
                              capture_output=True, text=True, timeout=kwargs.pop("timeout", 60), **kwargs)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done

    def sbatch(self, *args: str, cwd: Path, env: dict) -> str:
        """Submit; returns the job id. Resources for this node: no GPUs."""
        out = self.run("sbatch", "--parsable", "--gpus-per-node=0", *args, cwd=cwd, env={**self.env, **env})
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o`: one dict per job (an array job: one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def finished(self, job_id: str) -> list[dict]:
        """This job's records in the cluster's jobcomp log, one per run (a requeued run: PENDING)."""
        text = (self.folder / "log" / "jobcomp.log").read_text()
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines()
                if line.startswith(f"JobId={job_id} ")]

    def wait(self, job_id: str, timeout: float = 240, until=lambda jobs: all(j["JobState"] in DONE for j in jobs),
             what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if until(jobs):
                return jobs
            assert time.monotonic() < deadline, f"job {job_id} {what}: still {[j['JobState'] for j in jobs]}"
            time.sleep(0.3)


def _local_cluster(folder: Path, nodes: int):
    """Generator: `local_cluster.sh up --nodes N` (twice: idempotent), yield a Cluster, `down`."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(SLURM_LOCAL_DIR=str(folder), SLURM_LOCAL_PORT=str(_free_port_pair()))
    up_cmd = [str(LOCAL_CLUSTER), "up", "--nodes", str(nodes)]
    start = time.monotonic()
    up = subprocess.run(up_cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        if up.returncode == 3:  # the script's "this machine cannot do several nodes"
            pytest.skip(f"a {nodes}-node local cluster needs network namespaces: {up.stderr.strip()}")
        assert up.returncode == 0, up.stderr[-3000:] + _logs(folder)
        (conf,) = re.findall(r"^export SLURM_CONF=(\S+)$", up.stdout, re.M)
        env["SLURM_CONF"] = conf
        print(f"\nlocal cluster ({nodes} node(s)) up in {time.monotonic() - start:.1f}s")
        again = subprocess.run(up_cmd, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already up" in again.stderr, again.stderr  # idempotent
        yield Cluster(env, folder, nodes)
    finally:
        down = subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr
        assert not list((folder / "run").glob("*.pid")), down.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One node: this host, on loopback."""
    yield from _local_cluster(tmp_path_factory.mktemp("slurm"), nodes=1)


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    """Two nodes, each slurmd in its own network namespace (own address, hostname, /etc/hosts)."""
    yield from _local_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)


def _logs(folder: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((folder / "log").glob("*.log")))


def _wall(job: dict) -> float:
    """Seconds from the job's (last) start to its end (scontrol's or jobcomp's timestamps)."""
    def seconds(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    return seconds(job["EndTime"]) - seconds(job["StartTime"])


def _out(job: dict) -> str:
    return Path(job["StdOut"]).read_text(errors="replace")


def _prepare(root: Path, num_users: int) -> None:
    from sicsrec.runtime.rundir import run_stage

    run_stage(root / "prepare", "prepare", {}, {}, lambda out: make_dataset(out, num_users=num_users) and {})


def _train_sets(root: Path, engine: str) -> list[str]:
    return [f"run_dir={root}"] + [f"train_id.{k}={v}" for k, v in (TRAIN | {"engine": engine}).items()]


def _train_env(root: Path) -> dict:
    return dict(STAGE="train-id", CONFIG=str(CONFIG), NPROC="2", VENV=str(REPO / ".venv"), PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1", EXTRA=" ".join(f"--set {s}" for s in _train_sets(root, "ddp")))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert (got["best_epoch"], got["epochs_run"]) == (expected["best_epoch"], expected["epochs_run"])
    for split in ("valid", "test"):
        for name, value in expected[split].items():
            assert got[split][name] == pytest.approx(value, abs=1e-6), (split, name)


def _submit_train(cluster: Cluster, root: Path, *args: str, nproc: int = 2) -> str:
    return cluster.sbatch(f"--cpus-per-task={cluster.cpus}", *args, str(REPO / "slurm" / "train.sbatch"), cwd=root,
                          env=_train_env(root) | {"NPROC": str(nproc)})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The plain 1-process run of the same config and global batch: its run directory."""
    from launcher.config import load_config
    from sicsrec.train import train_id

    root = tmp_path_factory.mktemp("one_process")
    _prepare(root, num_users=160)
    cfg = load_config(CONFIG, _train_sets(root, "single"))
    train_id(cfg.train_id, root / "prepare", root / "train_id", cfg.seed)
    assert _metrics(root / "train_id")["world_size"] == 1
    return root


def _assert_matches_one_process(run: Path, one_process: Path) -> None:
    got = _metrics(run / "train_id")
    assert got["engine"] == "ddp" and got["world_size"] == 2
    _assert_same_metrics(got, _metrics(one_process / "train_id"))
    two_ranks, one = _log(run / "train_id"), _log(one_process / "train_id")
    assert [r["step"] for r in two_ranks] == [r["step"] for r in one]  # the same loss curve, step by step
    assert [r["loss"] for r in two_ranks] == pytest.approx([r["loss"] for r in one], rel=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """train.sbatch to the end with `sbatch --wait` (2 ranks, gloo): its run directory."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _prepare(root, num_users=160)
    start = time.monotonic()
    done = subprocess.run([str(LOCAL_CLUSTER), "exec", "sbatch", "--wait", "--parsable", "--gpus-per-node=0",
                           f"--cpus-per-task={cluster.cpus}", str(REPO / "slurm" / "train.sbatch")], cwd=root,
                          env={**cluster.env, **_train_env(root)}, capture_output=True, text=True, timeout=300)
    job_id = done.stdout.strip()
    (job,) = cluster.finished(job_id)  # sbatch --wait may return after MinJobAge: not from scontrol
    out = (root / f"sicsrec-train-{job_id}.out").read_text(errors="replace")
    assert done.returncode == 0 and job["JobState"] == "COMPLETED", done.stderr + out[-5000:]
    print(f"\ntrain.sbatch (2 ranks): job {_wall(job):.0f}s, sbatch --wait {time.monotonic() - start:.0f}s")
    return root


def test_train_sbatch_two_ranks_match_one_process(uninterrupted, one_process):
    _assert_matches_one_process(uninterrupted, one_process)


def test_train_sbatch_on_two_nodes_matches_one_process(cluster2, one_process, tmp_path):
    """Two "hosts": one torchrun per node through srun, c10d rendezvous at node1's address, gloo
    between the namespaces; the same metrics as one process, and as 2 ranks on one node."""
    _prepare(tmp_path, num_users=160)
    start = time.monotonic()
    job_id = _submit_train(cluster2, tmp_path, "--nodes=2", nproc=1)
    (job,) = cluster2.wait(job_id, timeout=240, what="2-node training")
    out = _out(job)
    print(f"\ntrain.sbatch (2 nodes x 1 rank): job {_wall(job):.0f}s, test total {time.monotonic() - start:.0f}s")
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "node[1-2]", out[-5000:]
    assert "nodes=2 nproc_per_node=1 rendezvous=node1:" in out
    _assert_matches_one_process(tmp_path, one_process)


def test_train_sbatch_usr1_checkpoints_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    _prepare(tmp_path, num_users=160)
    start = time.monotonic()
    job_id = _submit_train(cluster, tmp_path)
    log_path = tmp_path / "train_id" / "train_log.jsonl"
    deadline = time.monotonic() + 180
    while not (log_path.exists() and log_path.read_text()):  # a step is done: warn of the time limit
        (job,) = cluster.jobs(job_id)
        assert job["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, job
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # the trap's `scontrol requeue`: back to PENDING with one restart. SLURM holds a requeued job
    # for about two minutes (EligibleTime); a real cluster waits, the test lets it start now.
    (job,) = cluster.wait(job_id, timeout=120, what="requeue",
                          until=lambda jobs: jobs[0]["JobState"] in DONE or jobs[0]["Restarts"] != "0")
    first = time.monotonic() - start
    assert job["Restarts"] == "1" and job["JobState"] not in DONE, job  # PENDING, COMPLETING or RUNNING
    steps_done = len(_log(tmp_path / "train_id"))
    assert not (tmp_path / "train_id" / "manifest.json").exists()
    if job["JobState"] != "RUNNING":
        # Not at once: slurmd rejects a launch whose credential is not newer (in whole seconds)
        # than the revoked one of the first run ("Job credential revoked") - what SLURM's delay
        # avoids. Wait for the first run to be cleaned up, then let the job start 2 s later.
        deadline = time.monotonic() + 60
        while cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip() != "idle":
            assert time.monotonic() < deadline, "the node did not come back idle after the requeue"
            time.sleep(0.3)
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
    (job,) = cluster.wait(job_id, timeout=240, what="second run")
    out = _out(job)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", out[-5000:]
    assert out.count("stage=train-id") == 2 and out.count("requeueing job") == 1, out[-5000:]
    assert "restarts=0" in out and "restarts=1" in out
    assert [run["JobState"] for run in cluster.finished(job_id)] == ["PENDING", "COMPLETED"]  # requeued, done
    assert "received SIGUSR1" in out and "resumed from" in out
    print(f"\ntrain.sbatch preempted: first run to requeue {first:.0f}s, second run {_wall(job):.0f}s "
          f"(after {steps_done} of {len(_log(uninterrupted / 'train_id'))} steps), "
          f"test total {time.monotonic() - start:.0f}s")
    assert 0 < steps_done < len(_log(uninterrupted / "train_id"))
    _assert_same_metrics(_metrics(tmp_path / "train_id"), _metrics(uninterrupted / "train_id"))
    assert _log(tmp_path / "train_id") == _log(uninterrupted / "train_id")


# ---------------------------------------------------------------- sweep_batch.sbatch: array + collect

SWEEP_TRAIN = ["train_id.hidden=16", "train_id.layers=1", "train_id.max_len=8", "train_id.eval_batch_size=16",
               "train_id.lr=0.004", "train_id.batch_size=8", "train_id.epochs=3", "train_id.patience=3",
               "train_id.dropout=0.2", "train_id.engine=auto"]
SWEEP_KEYS = ("batch", "world_size", "lr", "epochs", "best_epoch", "ndcg@10", "hit@10", "alignment", "uniformity")


def _sweep_rows(run: Path) -> list[dict]:
    return json.loads((run / "sweep" / "train-id" / "sweep.json").read_text())["rows"]


def test_sweep_batch_array_job_and_dependent_collect_job(cluster, tmp_path):
    from launcher.cli import main

    run = tmp_path / "run"
    _prepare(run, num_users=30)
    env = dict(SWEEP_STAGE="train-id", BATCH_SIZES="4,8", BASE_BATCH="8", LR_SCALING="sqrt", RUN_DIR=str(run),
               CONFIG=str(CONFIG), NPROC="1", VENV=str(REPO / ".venv"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               EXTRA=" ".join(f"--set {s}" for s in SWEEP_TRAIN))
    script = str(REPO / "slurm" / "sweep_batch.sbatch")
    start = time.monotonic()
    array = cluster.sbatch("--array=0-1", "--cpus-per-task=1", script, cwd=tmp_path, env=env)
    collect = cluster.sbatch(f"--dependency=afterany:{array}", "--cpus-per-task=1", "--output=%x-%j-collect.out",
                             script, cwd=tmp_path, env=env | {"COLLECT": "1"})
    tasks = cluster.wait(array, timeout=240, what="array")
    (collected,) = cluster.wait(collect, timeout=120, what="collect")
    print(f"\nsweep_batch.sbatch: array tasks {', '.join(f'{_wall(t):.0f}s' for t in tasks)}, "
          f"collect {_wall(collected):.0f}s, test total {time.monotonic() - start:.0f}s")
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    for job in tasks + [collected]:
        assert job["JobState"] == "COMPLETED", _out(job)[-5000:]
    assert all(collected["StartTime"] >= t["EndTime"] for t in tasks)  # the dependency held it back
    assert "collecting the train-id sweep" in _out(collected)

    reference = tmp_path / "reference"
    _prepare(reference, num_users=30)
    assert main(["sweep-batch", "--config", str(CONFIG), "--stage", "train-id", "--batch-sizes", "4,8",
                 "--lr-scaling", "sqrt", "--base-batch", "8", "--run-dir", str(reference),
                 *[a for s in SWEEP_TRAIN for a in ("--set", s)]]) == 0
    got, expected = _sweep_rows(run), _sweep_rows(reference)
    assert [r["batch"] for r in got] == [4, 8] == [r["batch"] for r in expected]
    assert json.loads((run / "sweep" / "train-id" / "sweep.json").read_text())["missing"] == []
    for mine, theirs in zip(got, expected):  # other processes, other thread counts: the last bits may differ
        assert {k: mine[k] for k in SWEEP_KEYS} == pytest.approx({k: theirs[k] for k in SWEEP_KEYS}, rel=1e-5)


# ---------------------------------------------------------------- label.sbatch: Ray head (+ worker) via srun

@pytest.fixture
def label_cluster(request):
    """The two-node cluster (a Ray head and a Ray worker), or one node (the head only) where
    network namespaces are not available."""
    try:
        return request.getfixturevalue("cluster2")
    except pytest.skip.Exception:
        return request.getfixturevalue("cluster")


def test_label_sbatch_ray_cluster_via_srun_labels_like_a_local_run(label_cluster, tmp_path):
    import tempfile

    from sicsrec.runtime.rundir import run_stage
    from llm_labeling.config import LabelConfig
    from llm_labeling.run import read_pairs, read_records
    from shards.prepared import PreparedDataset
    from tests.test_labeling_run import make_dataset as make_label_dataset
    from tests.test_labeling_run import reference_records

    cfg = LabelConfig(backend="deterministic", users_per_shard=8, batch_size=3, max_candidates=6)
    run_stage(tmp_path / "prepare", "prepare", {}, {}, lambda out: make_label_dataset(out.parent) and {})
    ds = PreparedDataset.load(tmp_path / "prepare")
    home = tmp_path / "home"
    home.mkdir()
    # As in llm_labeling.run.start_local_ray: on one node (loopback) Ray must not turn 127.0.0.1
    # into the host's address, and its processes must not probe cloud metadata (HOME names a
    # provider). (Two nodes live in network namespaces that reach nothing but each other.)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    sets = [f"run_dir={tmp_path}", "label.backend=deterministic", f"label.users_per_shard={cfg.users_per_shard}",
            f"label.batch_size={cfg.batch_size}", f"label.max_candidates={cfg.max_candidates}"]
    cluster, nodes = label_cluster, label_cluster.nodes
    env = dict(CONFIG=str(CONFIG), PYTHON=str(REPO / ".venv" / "bin" / "python"), PYTHONPATH=str(REPO),
               HOME=str(home), RAY_TMP=str(ray_tmp), OMP_NUM_THREADS="1")
    # 0 also forbids multi-node Ray clusters; this process may hold 0 from the session's local Ray
    # (llm_labeling.run.start_local_ray exports it), and sbatch passes the environment on.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0" if nodes == 1 else "1"
    start = time.monotonic()
    try:
        job_id = cluster.sbatch(f"--nodes={nodes}", f"--cpus-per-task={cluster.cpus}",
                                str(REPO / "slurm" / "label.sbatch"), *[a for s in sets for a in ("--set", s)],
                                cwd=tmp_path, env=env)
        (job,) = cluster.wait(job_id, timeout=240, what="label")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = _out(job)
    print(f"\nlabel.sbatch ({nodes} node(s): Ray head{' + worker' * (nodes > 1)} + driver): job {_wall(job):.0f}s, "
          f"test total {time.monotonic() - start:.0f}s")
    assert job["JobState"] == "COMPLETED", out[-6000:]
    assert re.search(rf"Ray head \S+ \(\S+\), {nodes} node\(s\)", out), out[-3000:]
    metrics = json.loads((tmp_path / "label" / "manifest.json").read_text())["metrics"]
    assert metrics["num_actors"] == nodes  # no GPUs: one actor per node, so every node labeled
    records = read_records(tmp_path / "label")
    expected = reference_records(ds, cfg)
    assert records == expected
    assert read_pairs(tmp_path / "label") == [(r["target"], r["similar"]) for r in expected if r["outcome"] == "valid"]

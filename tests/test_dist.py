import os
import socket
import subprocess
import sys

import pytest

from sicsrec.runtime.dist import DistEnv, detect, expand_nodelist


def test_single_process_by_default():
    assert detect({}) == DistEnv()


def test_torchrun_variables():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_variables_derive_master_and_port():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[07-09],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == 15000 + 123456 % 20000


def test_single_slurm_task_is_not_distributed():
    assert not detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed


def test_expand_nodelist():
    assert expand_nodelist("a[01-03,10],b5,c[7]") == ["a01", "a02", "a03", "a10", "b5", "c7"]


WORKER = """
import torch, torch.distributed as dist
from sicsrec.runtime.dist import init, detect
env = init()
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
print(f"rank={env.rank} world={env.world_size} source={env.source} sum={t.item()}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fake_slurm_two_tasks_initialise_gloo():
    """Two processes with only SLURM_* variables (as `srun --ntasks 2` sets them) find each other."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="42",
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True))
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["rank=0 world=2 source=slurm sum=3.0", "rank=1 world=2 source=slurm sum=3.0"]

"""Distributed environment detection and init: torchrun, the DeepSpeed launcher and SLURM.

torchrun and `deepspeed` export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under
`srun` with one task per GPU only SLURM_* exist, so we derive them (master = first host of the
node list, port from the job id so concurrent jobs do not collide). nccl on GPU, gloo on CPU.
"""
from __future__ import annotations

import atexit
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed node list, e.g. 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=20, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return expand_nodelist(nodelist)[0]


def detect(env: dict | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or 15000 + job % 20000),
            source="slurm",
        )
    return DistEnv()


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed from the detected environment (no-op for a single process).

    Exports the torchrun variables too, so DeepSpeed and webdataset's node splitting agree.
    """
    env = env or detect()
    if not env.distributed or dist.is_initialized():
        return env
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size)))
    device_id = None
    if torch.cuda.is_available():
        device_id = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend(), rank=env.rank, world_size=env.world_size, device_id=device_id)
    return env


def device(env: DistEnv) -> torch.device:
    return torch.device(f"cuda:{env.local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() else torch.device("cpu")


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over ranks, in place (as it is in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


atexit.register(cleanup)  # whoever initialised the group (we, or DeepSpeed for one process)

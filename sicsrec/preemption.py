"""Preemption: a trainer stops cleanly on SIGTERM / SIGUSR1 and exits to be requeued.

SLURM warns a job before its time limit with `--signal` (slurm/train.sbatch: USR1 to the batch
shell, which forwards it through srun to every node's torchrun, which forwards it to its
workers) and sends SIGTERM on preemption or cancellation. While a trainer runs inside
`PreemptionGuard`:
- the signal handler only records the signal, so a second signal (say, while the checkpoint is
  being written) changes nothing;
- after every optimizer step (never between the micro batches of one gradient accumulation)
  every rank calls `should_stop()`, a MAX all-reduce of that flag: all ranks stop after the same
  step even when only some of them were signalled;
- the trainer then writes its checkpoint, including its position inside the epoch, and calls
  `exit_for_requeue`, which raises `Preempted`: a SystemExit with status REQUEUE_EXIT_CODE, so
  `python -m launcher <stage>` exits with 75. Re-running the same command resumes mid-epoch.
The handlers that were installed before come back when the guard exits.

REQUEUE_EXIT_CODE = 75 is EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to
retry"): not 0 (the stage is not done), not 1 or 2 (errors), not 128+n (killed by signal n).
torchrun does not pass its workers' exit codes on (after forwarding a signal it exits 1), so
rank 0 also writes the file named by $SICSREC_REQUEUE_FILE, when set, before any rank exits;
slurm/train.sbatch reads it to decide on `scontrol requeue`.

Test hook: SICSREC_PREEMPT_AT_STEP=k makes a process send itself SIGUSR1 once global (micro)
step k is done (a real signal through the real handler); trainers report every micro step with
`micro_step_done`, so k may fall inside a gradient accumulation.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from sicsrec.runtime import dist as distenv

log = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_FILE_ENV = "SICSREC_REQUEUE_FILE"
TEST_HOOK_ENV = "SICSREC_PREEMPT_AT_STEP"


def ignore_preemption_signals(worker_id: int) -> None:
    """A loader worker's init: SIGTERM / SIGUSR1 are left to its trainer, which stops at a step
    boundary (torchrun and SLURM signal the whole process group)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preempted(SystemExit):
    """The run checkpointed after a preemption signal; the process exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionGuard:
    """Context manager: records SIGTERM / SIGUSR1 while training runs (see module docstring).
    `device` holds the flag for the all-reduce (a CUDA device under nccl)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.received: str | None = None
        self._previous: dict = {}
        hook = os.environ.get(TEST_HOOK_ENV)
        self._hook_step = int(hook) if hook else None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM/SIGUSR1 will not checkpoint the run")
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _record(self, signum: int, frame) -> None:
        # no logging here: the handler may interrupt the main thread inside a logging call
        if self.received is None:
            self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """This process's own flag (a Python call, so a pending handler has run by now)."""
        return self.received is not None

    def micro_step_done(self, step: int) -> None:
        """Drives the test hook only: `step` is the global (micro) step just done."""
        if self._hook_step is not None and step == self._hook_step:
            self._hook_step = None
            os.kill(os.getpid(), signal.SIGUSR1)

    def should_stop(self, step: int | None = None) -> bool:
        """Collective: every rank calls it at the same point; True on all ranks when any rank got
        a signal. `step` (the global step just done) only drives the test hook."""
        if step is not None:
            self.micro_step_done(step)
        flag = torch.tensor([1 if self.requested() else 0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def exit_for_requeue(guard: PreemptionGuard, stage_dir: Path, epoch: int, step: int, batches_done: int,
                     is_main: bool) -> NoReturn:
    """Call after the checkpoint is saved: rank 0 writes $SICSREC_REQUEUE_FILE, then every rank
    raises `Preempted` (after a barrier, so no rank exits before the file exists)."""
    where = f"epoch {epoch}, {batches_done} batch(es) into it, global step {step}"
    signal_name = guard.received or "a signal on another rank"
    if is_main:
        log.warning("%s: checkpoint saved at %s; exiting with status %d to be requeued",
                    signal_name, where, REQUEUE_EXIT_CODE)
        marker = os.environ.get(REQUEUE_FILE_ENV)
        if marker:
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(json.dumps({"stage_dir": str(stage_dir), "epoch": epoch, "step": step,
                                                "batches_done": batches_done, "signal": signal_name,
                                                "exit_code": REQUEUE_EXIT_CODE, "time": time.time()}) + "\n")
    distenv.barrier()
    raise Preempted(f"preempted by {signal_name}: checkpoint at {where}")

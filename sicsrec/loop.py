"""The one training loop: every stage that trains (step 1, step 2, the content baselines, TSSR,
encoder SFT) is a `TrainLoop` subclass that says what a batch is and what one step does.

The loop owns what must not drift between trainers: resume (state + position inside an epoch),
steps, accumulation boundaries, preemption, the per-step log, tensorboard, the epoch loop and
`stop_after_epoch` (a simulated kill, for tests). A subclass provides:
- `epoch_batches(epoch)`: the epoch's batches, the same count on every rank, indexable in order
  (a batch is made when indexed; a resumed epoch starts indexing at its first undone batch);
- `train_step(batch) -> (logs, sums)`: forward, backward and optimizer step of one micro batch;
  `logs` are this step's values reduced over ranks ("loss" is shown on the bar; all go to the
  step log and tensorboard), `sums` are added up over the epoch (and kept in the position);
- `epoch_summary(sums, steps, seconds)`, `end_epoch(epoch, summary, tb)` (records, selects and
  checkpoints), optionally `before_epochs(tb, guard, stop_after_epoch)`, and `final_metrics()`.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tqdm import tqdm

from sicsrec.preemption import PreemptionGuard, exit_for_requeue


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after_epoch` (tests simulate a kill after an epoch)."""


def trim_log(path: Path, last_step: int) -> None:
    """Drop step records past the checkpoint (a resumed run rewrites them)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


class StepLog:
    """train_log.jsonl: one record per step, appended and flushed as training goes (rank 0)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()


class LazyBatches:
    """`count` batches, batch i made by `make(i)` only when indexed (skipped batches cost nothing)."""

    def __init__(self, count: int, make):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.make(index)


@contextlib.contextmanager
def _closing(batches):
    """Close streamed batches (their loader workers) however the epoch ends."""
    try:
        yield
    finally:
        if hasattr(batches, "close"):
            batches.close()


class TrainLoop:
    """Set by the subclass: engine, env, out, epochs, checkpoint (a RunCheckpoint) and state
    (`initial_state(run_id)` plus its own keys)."""
    rate_of = "sequences"  # the sum shown as a rate on the progress bar
    desc = "epoch"

    @staticmethod
    def initial_state(run_id: str) -> dict:
        # epoch = the last finished epoch; position = progress inside the next one (preemption)
        return {"run_id": run_id, "epoch": -1, "step": 0, "history": [], "position": None}

    def resume(self, restart: bool = False) -> None:
        """Continue from this run's checkpoint, if any; `restart` (--force) trains from scratch.
        Only the state's own keys are read: DeepSpeed adds reserved ones it refuses to save again."""
        state = self.checkpoint.load(restart)
        if state is not None:
            self.state = {key: state.get(key, default) for key, default in self.state.items()}

    def save(self) -> None:
        self.checkpoint.save(self.state)

    def train_epoch(self, epoch: int, tb, guard: PreemptionGuard | None = None) -> dict:
        """One epoch of steps. After each optimizer step (never inside a gradient accumulation)
        every rank asks `guard` whether to stop; if so the position (batches done, partial sums)
        goes into the checkpoint and the process exits for requeue. A resumed epoch starts at
        its first undone batch."""
        env = self.env
        batches = self.epoch_batches(epoch)
        position = self.state["position"] if (self.state["position"] or {}).get("epoch") == epoch else {}
        done = position.get("batches", 0)
        sums = {k: v for k, v in position.items() if k not in ("epoch", "batches", "seconds")}
        self.engine.train()
        start = time.time()
        bar = tqdm(total=len(batches), initial=done, desc=f"{self.desc} {epoch}", disable=not env.is_main, leave=False)
        with StepLog(self.out / "train_log.jsonl", env.is_main) as step_log, _closing(batches):
            for index in range(done, len(batches)):
                logs, step_sums = self.train_step(batches[index])
                self.state["step"] += 1
                for name, value in step_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
                rate = (sums[self.rate_of] - position.get(self.rate_of, 0)) / max(time.time() - start, 1e-9)
                bar.update()
                bar.set_postfix(loss=f"{logs['loss']:.4f}", **{f"{self.rate_of[:3]}_s": f"{rate:.1f}"})
                if tb:
                    for name, value in logs.items():
                        tb.add_scalar(f"train/{name}", value, self.state["step"])
                step_log.write({"epoch": epoch, "step": self.state["step"], **logs})
                if guard is not None and self._preempted(guard, index):
                    bar.close()
                    seconds = position.get("seconds", 0.0) + time.time() - start
                    self.state["position"] = {"epoch": epoch, "batches": index + 1, **sums, "seconds": seconds}
                    self.save()
                    exit_for_requeue(guard, self.out, epoch, self.state["step"], index + 1, env.is_main)
        bar.close()
        return self.epoch_summary(sums, len(batches), position.get("seconds", 0.0) + time.time() - start)

    def _preempted(self, guard: PreemptionGuard, index: int) -> bool:
        """Collective, at optimizer-step boundaries only: a checkpoint never holds half-accumulated
        gradients. `index` is the micro batch just done (epochs hold whole accumulations)."""
        guard.micro_step_done(self.state["step"])
        return (index + 1) % self.engine.grad_accum == 0 and guard.should_stop()

    def before_epochs(self, tb, guard: PreemptionGuard, stop_after_epoch: int | None) -> None:
        """Work before the first epoch of a run (an evaluation of the start); once per run."""

    def fit(self, stop_after_epoch: int | None = None) -> dict:
        """Train until `epochs` (or `state["stopped"]`: early stopping); returns `final_metrics()`.
        `stop_after_epoch` simulates a kill after that epoch's checkpoint."""
        env, state = self.env, self.state
        tb = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=state["step"] + 1)
            trim_log(self.out / "train_log.jsonl", state["step"])
        try:
            with PreemptionGuard(self.engine.device) as guard:
                self.before_epochs(tb, guard, stop_after_epoch)
                for epoch in range(state["epoch"] + 1, self.epochs):
                    if state.get("stopped"):
                        break
                    summary = self.train_epoch(epoch, tb, guard)
                    self.end_epoch(epoch, summary, tb)
                    if stop_after_epoch is not None and epoch >= stop_after_epoch:
                        raise TrainingInterrupted(f"stopped after epoch {epoch} (checkpoint saved)")
                    more = epoch + 1 < self.epochs and not state.get("stopped")
                    if more and guard.should_stop():  # signalled during end_epoch: the epoch's checkpoint is saved
                        exit_for_requeue(guard, self.out, epoch + 1, state["step"], 0, env.is_main)
        finally:
            if tb:
                tb.close()
        return self.final_metrics()


def fit_summary(trainer, force: bool, stop_after_epoch: int | None) -> dict:
    """Resume (or restart with force) and fit; the metrics without the per-epoch history."""
    trainer.resume(restart=force)
    metrics = trainer.fit(stop_after_epoch)
    return {k: v for k, v in metrics.items() if k != "history"}

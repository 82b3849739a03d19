"""SICSRec step 1: train the ID encoder (SASRec or GRU4Rec) with next-item full-softmax CE.

`train_id(cfg, prepared_dir, out_dir, seed)` runs as one process, under `torchrun` with DDP
(gloo on CPU, nccl on GPU) or with DeepSpeed (`ds_config.json`). Per step:
- the global batch per optimizer step (cfg.batch_size windows, order a function of (seed, epoch))
  is split over ranks and cfg.grad_accum micro batches (DeepSpeed accumulates); a final micro
  batch smaller than the world size is dropped so every rank has work;
- the loss is the mean CE over all target positions of the global (micro) batch: each rank scales
  its CE sum by world_size / (global target count), and DDP/DeepSpeed average the gradients, so
  any world size follows the same loss curve as one process on the same global batch (with
  grad_accum > 1 DeepSpeed averages the micro batches' losses of an optimizer step).
After each epoch: validation Hit/NDCG@5/10/20 (sharded over ranks), early stopping on NDCG@10
with `patience`, the best weights in `best_model.pt`, and a checkpoint (model, optimizer, epoch,
best metric, patience counter, RNG states) from which a killed run resumes to the same result.
On SIGTERM / SIGUSR1 (SLURM preemption, sicsrec.preemption) all ranks stop after the same
step, checkpoint their position inside the epoch and exit with status 75; the re-run skips the
epoch's batches already done (without making them) and ends as an uninterrupted run would.
Test metrics use the best weights. Outputs in out_dir: metrics.json, best_model.pt,
checkpoint/, train_log.jsonl (loss per step, written as it goes), tensorboard/, manifest.json.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from shards.prepared import PreparedDataset, prepared_input
from shards.windows import collate, epoch_batches, rank_slice, train_windows, trim_left_padding
from sicsrec.config import SequenceTrainConfig, TrainConfig, micro_batch_per_rank
from sicsrec.embedding_cache import content_pca, load_embedding_cache
from sicsrec.engine import RunCheckpoint, build_engine
from sicsrec.evaluate import evaluate
from sicsrec.loop import LazyBatches, TrainingInterrupted, TrainLoop, fit_summary
from sicsrec.models import build_id_model
from sicsrec.models.sasrec import SequentialRecommender, history_offsets
from sicsrec.next_item import NextItemCriterion
from sicsrec.optim import build_optimizer
from sicsrec.preemption import exit_for_requeue
from sicsrec.runtime import dist as distenv
from sicsrec.runtime.rundir import StageRun, Upstream, read_manifest, run_declared, write_json

log = logging.getLogger(__name__)
SELECT_METRIC = "ndcg@10"


class NextItemLoss(nn.Module):
    """Wraps a recommender for DDP/DeepSpeed: (inputs, targets) -> (CE sum, number of targets).
    Target 0 marks padding: never a target; the padding item is never a candidate. `criterion`
    (sicsrec.next_item) says how the CE against `recommender.item_table()` is computed
    (`train_id.loss`: full | chunked | sampled); None = full, the exact full-softmax CE."""

    def __init__(self, recommender: SequentialRecommender, criterion: NextItemCriterion | None = None):
        super().__init__()
        self.recommender = recommender
        self.criterion = criterion or NextItemCriterion()

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        model = self.recommender
        hidden = model.hidden_states(inputs)
        ce_sum, count, _ = self.criterion(hidden, model.item_table(), targets, history_offsets(model, inputs))
        return ce_sum, count


class Trainer(TrainLoop):
    """A next-item recommender on the loop: batches of (inputs, targets) windows, the CE of its loss
    module, validation after every epoch, early stopping and the best weights on valid NDCG@10."""
    config_section = "train_id"  # where `cfg` sits in the config (named in errors); subclasses override

    def __init__(self, cfg: SequenceTrainConfig, dataset: PreparedDataset, out_dir: Path, seed: int, env, run_id: str,
                 content: dict | None = None):
        where = self.config_section
        self.micro_batch = micro_batch_per_rank(cfg.batch_size, cfg.grad_accum, env.world_size, where)
        if cfg.patience < 1 or cfg.epochs < 1:
            raise ValueError(f"{where}.epochs and {where}.patience must be >= 1")
        self.cfg, self.dataset, self.out, self.seed, self.env, self.run_id = cfg, dataset, out_dir, seed, env, run_id
        self.content = content  # the embedding cache E_id starts from (train_id.item_init=pca)
        self.windows = train_windows(dataset, cfg.max_len, cfg.windows, cfg.window_stride)
        if not self.windows:
            raise ValueError("no user has >= 2 training items: nothing to train on")
        torch.manual_seed(seed)  # the same initial weights on every rank
        self.model, loss_module = self.build()
        self.content = None  # read by build() only: do not hold the cache for the whole run
        # how the loss module computes its next-item CE (`<section>.loss`; sicsrec.next_item)
        loss_module.criterion = NextItemCriterion.from_config(cfg, dataset, self.config_section)
        optimizer = build_optimizer(loss_module, cfg)
        self.engine = build_engine(loss_module, optimizer, env, cfg, where)
        torch.manual_seed(seed * 1000 + env.rank)  # dropout streams differ per rank
        self.checkpoint = RunCheckpoint(self.engine, out_dir / "checkpoint", run_id, env)
        self.epochs = cfg.epochs
        self.state = self.initial_state(run_id) | {"best_metric": float("-inf"), "best_epoch": -1, "bad_epochs": 0,
                                                   "stopped": False, "start_evaluated": False}

    def build(self) -> tuple[SequentialRecommender, nn.Module]:
        """(recommender, loss module). Subclasses (SICSRec step 2) override this. The loss module
        maps (inputs, targets) to (CE sum, number of targets) or (CE sum, number of targets,
        extra): `extra` is a per-rank mean term added to the loss (its gradient is averaged over
        ranks like the CE's). The loss module holds the recommender as `.recommender`."""
        model = build_id_model(self.cfg, self.dataset.num_items)
        if self.content is not None:
            table = model.item_emb.weight
            init = content_pca(self.content, table.shape[1], std=float(table[1:].detach().std()))  # the model's init scale
            if init.shape != table.shape:
                raise ValueError(f"the embedding cache has {init.shape[0] - 1} items, the prepared data "
                                 f"{table.shape[0] - 1}: re-run the encode stage")
            with torch.no_grad():
                table.copy_(init)
        return model, NextItemLoss(model)

    def evaluate(self, split: str, diagnostics: bool = False) -> dict:
        """Full-ranking Hit/NDCG@5,10,20 on `split` (valid | test), users sharded over ranks, the
        items scored against the model's item table in blocks of `eval_item_chunk`; validation (test) on
        a fixed seeded sample of `eval_users` (`test_users`) users if set. Ranks make equal forward calls (ZeRO-3)."""
        engine, model, cfg = self.engine, self.model, self.cfg
        engine.eval()

        def user_fn(histories: torch.Tensor) -> torch.Tensor:
            with engine.autocast():
                return model.sequence_repr(histories)

        with engine.gathered(), torch.no_grad():
            bias = model.history_bias()
            return evaluate(user_fn, self.dataset, split, cfg.max_len, cfg.eval_batch_size,
                            history_bias=None if bias is None else float(bias),
                            mask_history=cfg.mask_history, device=engine.device, progress=self.env.is_main,
                            item_table=model.item_table(), item_chunk=cfg.eval_item_chunk,
                            user_sample=cfg.eval_users if split == "valid" else cfg.test_users,
                            equal_batches=True if engine.zero_stage == 3 else None, diagnostics=diagnostics,
                            trim_padding=cfg.trim_padding)

    def epoch_batches(self, epoch: int) -> LazyBatches:
        """This epoch's global micro batches (order a function of seed and epoch; batch_size /
        grad_accum windows each), the same count on every rank, each made (this rank's slice
        collated) when indexed; whole accumulations only. Subclasses that stream their data (TSSR
        from shards) override this."""
        env, cfg = self.env, self.cfg
        batches = [b for b in epoch_batches(len(self.windows), self.micro_batch * env.world_size, self.seed, epoch)
                   if len(b) >= env.world_size]
        batches = batches[:len(batches) // cfg.grad_accum * cfg.grad_accum]  # no accumulation spans two epochs

        def local(index: int) -> dict:
            rows = rank_slice(batches[index], env.rank, env.world_size)
            inputs, targets = collate([self.windows[i] for i in rows], cfg.max_len)
            if cfg.trim_padding:
                inputs, targets = trim_left_padding(inputs, targets)
            return {"inputs": inputs, "targets": targets}

        return LazyBatches(len(batches), local)

    def loss_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) the loss module is called with (TSSR also hands it the batch)."""
        return batch["inputs"], batch["targets"]

    def train_step(self, batch: dict) -> tuple[dict, dict]:
        """The mean CE over the global batch's targets: each rank scales its CE sum by world size /
        global target count (DDP / DeepSpeed average the gradients), plus the loss module's `extra`."""
        env, engine = self.env, self.engine
        inputs, targets = self.loss_inputs(batch)
        local_sum, local_count, *extra = engine(inputs.to(engine.device), targets.to(engine.device))
        extra = extra[0] if extra else local_sum.new_zeros(())
        totals = distenv.all_sum(torch.stack([local_sum.detach().float(), local_count.float(), extra.detach().float(),
                                       local_sum.new_tensor(float(len(inputs)))]))
        engine.backward(local_sum * env.world_size / totals[1] + extra)
        engine.step()
        loss = (totals[0] / totals[1] + totals[2] / env.world_size).item()
        return {"loss": loss}, {"loss_sum": totals[0].item(), "targets": totals[1].item(),
                                "extra_sum": totals[2].item() / env.world_size, "sequences": totals[3].item()}

    def epoch_summary(self, sums: dict, steps: int, seconds: float) -> dict:
        return {"loss": sums.get("loss_sum", 0.0) / max(sums.get("targets", 0.0), 1),
                "extra_loss": sums.get("extra_sum", 0.0) / max(steps, 1), "seconds": seconds,
                "sequences": sums.get("sequences", 0.0), "targets": sums.get("targets", 0.0)}

    # A subclass whose model starts trained (SICSRec step 2 at the step-1 function) sets this:
    # fit then evaluates the start before epoch 0 (`evaluate_start`) and may select it as best.
    starts_trained: bool = False

    def before_epochs(self, tb, guard, stop_after_epoch: int | None) -> None:
        if self._start_due():
            self.evaluate_start(tb)
            if stop_after_epoch is not None and stop_after_epoch < 0:
                raise TrainingInterrupted("stopped after the start evaluation (checkpoint saved)")
            if guard.should_stop():  # signalled during the start evaluation: its checkpoint is saved
                exit_for_requeue(guard, self.out, 0, self.state["step"], 0, self.env.is_main)

    def end_epoch(self, epoch: int, train: dict, tb) -> None:
        eval_start = time.time()
        valid = self.evaluate("valid")
        train["eval_seconds"] = time.time() - eval_start
        self._end_epoch(epoch, train, valid, tb)

    def _start_due(self) -> bool:
        """A fresh run of a trainer that starts trained, its start not yet evaluated (a resumed
        run finds `start_evaluated` in its checkpoint and does not redo it)."""
        state = self.state
        return (self.starts_trained and state["epoch"] < 0 and state["position"] is None
                and not state["start_evaluated"])

    def evaluate_start(self, tb) -> None:
        """Epoch -1: validation of the model as built, before any step. Recorded in the history
        as {"epoch": -1, "start": True, ...} and selected like an epoch (best_model.pt, best_epoch
        -1), so early stopping counts from it and the run never ends below its start on
        validation. Checkpointed, so it happens once per run."""
        eval_start = time.time()
        valid = self.evaluate("valid")
        self.state["start_evaluated"] = True
        self._end_epoch(-1, {"eval_seconds": time.time() - eval_start}, valid, tb)

    def _end_epoch(self, epoch: int, train: dict, valid: dict, tb) -> None:
        """Select, record and checkpoint after an epoch; epoch -1 is the start (evaluate_start:
        `train` holds only eval_seconds)."""
        state = self.state
        start = epoch < 0
        improved = valid[SELECT_METRIC] > state["best_metric"]
        if improved:
            state.update(best_metric=valid[SELECT_METRIC], best_epoch=epoch, bad_epochs=0)
            best = self.engine.module_state_dict()
            if self.env.is_main:
                torch.save(self.model_state(best), self.out / "best_model.pt.tmp")
                os.replace(self.out / "best_model.pt.tmp", self.out / "best_model.pt")
        elif not start:
            state["bad_epochs"] += 1
        state["stopped"] = state["bad_epochs"] >= self.cfg.patience
        state["epoch"] = epoch
        state["position"] = None
        if start:
            record = {"epoch": epoch, "start": True, "eval_seconds": train["eval_seconds"]}
        else:
            record = {"epoch": epoch, "loss": train["loss"], "extra_loss": train["extra_loss"],
                      "seconds": train["seconds"], "eval_seconds": train["eval_seconds"],
                      "sequences": train["sequences"], "targets": train["targets"]}
        state["history"].append(record | {f"valid_{k}": v for k, v in valid.items()})
        if self.env.is_main:
            if start:
                log.info("start: valid %s %.4f", SELECT_METRIC, valid[SELECT_METRIC])
            else:
                log.info("epoch %d: loss %.4f, valid %s %.4f (best %.4f at epoch %d), %.1f s", epoch, train["loss"],
                         SELECT_METRIC, valid[SELECT_METRIC], state["best_metric"], state["best_epoch"],
                         train["seconds"])
                tb.add_scalar("train/epoch_loss", train["loss"], state["step"])
                tb.add_scalar("train/sequences_per_s", train["sequences"] / train["seconds"], state["step"])
            for name, value in valid.items():
                if name != "users":
                    tb.add_scalar(f"valid/{name}", value, state["step"])
            tb.flush()
        self.save()

    @property
    def model_name(self) -> str:
        """The trained model's name in metrics.json (step 2 and TSSR name theirs)."""
        return self.cfg.model

    @staticmethod
    def model_state(full_state: dict) -> dict:
        """NextItemLoss's state dict -> the recommender's own (drop the `recommender.` prefix)."""
        prefix = "recommender."
        return {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}

    def final_metrics(self) -> dict:
        state, cfg, env = self.state, self.cfg, self.env
        distenv.barrier()
        best = torch.load(self.out / "best_model.pt", map_location="cpu", weights_only=True)
        with self.engine.gathered(modify=True):
            self.model.load_state_dict(best)
        valid = self.evaluate("valid")
        test = self.evaluate("test", diagnostics=True)  # ranking diagnostics on test only: epochs stay cheap
        history = state["history"]
        epochs = [h for h in history if not h.get("start")]  # the start evaluation is no epoch
        train_seconds = max(sum(h["seconds"] for h in epochs), 1e-9)
        metrics = {
            "model": self.model_name, "engine": self.engine.kind, "zero_stage": self.engine.zero_stage,
            "world_size": env.world_size,
            "best_epoch": state["best_epoch"], "epochs_run": len(epochs), "early_stopped": state["stopped"],
            "valid": valid, "test": test,
            "seconds_per_epoch": train_seconds / max(len(epochs), 1),
            "eval_seconds_per_epoch": sum(h["eval_seconds"] for h in epochs) / max(len(epochs), 1),
            "sequences_per_s": sum(h["sequences"] for h in epochs) / train_seconds,
            "targets_per_s": sum(h["targets"] for h in epochs) / train_seconds,
            "history": history,
        }
        start = [h for h in history if h.get("start")]
        if start:  # the starting point's validation metrics (best_epoch -1: it was kept)
            metrics["start_valid"] = {k[len("valid_"):]: v for k, v in start[0].items() if k.startswith("valid_")}
        if env.is_main:
            write_json(self.out / "metrics.json", metrics)
            log.info("best epoch %d: test ndcg@10 %.4f hit@10 %.4f", state["best_epoch"], test["ndcg@10"], test["hit@10"])
        return metrics


def load_id_encoder(train_dir: str | Path) -> SequentialRecommender:
    """The trained ID encoder of a finished `train_id` stage (best weights, eval mode), e.g. for
    SICSRec step 2, which freezes it and adds LoRA."""
    train_dir = Path(train_dir)
    manifest = read_manifest(train_dir)
    if manifest is None or not (train_dir / "best_model.pt").exists():
        raise FileNotFoundError(f"{train_dir} holds no finished train_id stage (manifest.json, best_model.pt)")
    cfg = TrainConfig(**{k: v for k, v in manifest["config"].items() if k != "seed"})
    state = torch.load(train_dir / "best_model.pt", map_location="cpu", weights_only=True)
    model = build_id_model(cfg, state["item_emb.weight"].shape[0] - 1)
    model.load_state_dict(state)
    return model.eval()


ITEM_INITS = ("random", "pca")


def train_id(cfg: TrainConfig, prepared_dir: str | Path, out_dir: str | Path, seed: int, force: bool = False,
             stop_after_epoch: int | None = None, embeddings_dir: str | Path | None = None) -> dict:
    """Stage `train-id`: train the ID encoder on <run_dir>/prepare, write <run_dir>/train_id.

    Reads the distributed environment (torchrun / SLURM) itself. Returns the stage manifest
    (metrics under "metrics"). A run with an existing matching manifest is skipped unless force;
    a run with a checkpoint but no manifest resumes. `stop_after_epoch` simulates a kill (tests).
    `train_id.item_init: pca` also reads the embedding cache in `embeddings_dir` (an upstream).
    """
    if cfg.item_init not in ITEM_INITS:
        raise ValueError(f"train_id.item_init must be one of {ITEM_INITS}, got {cfg.item_init!r}")
    inputs = {"prepare": prepared_input(prepared_dir)}
    if cfg.item_init == "pca":
        if embeddings_dir is None:
            raise ValueError("train_id.item_init=pca needs the embedding cache of the encode stage")
        inputs["embeddings"] = Upstream("encode", embeddings_dir)

    def body(run: StageRun) -> dict:
        content = load_embedding_cache(embeddings_dir) if cfg.item_init == "pca" else None
        trainer = Trainer(cfg, PreparedDataset.load(prepared_dir), run.out, seed, run.env, run.run_id, content)
        return fit_summary(trainer, force, stop_after_epoch)

    return run_declared("train-id", out_dir, cfg, inputs, body, force, seed)

"""Stage `sft`: supervised fine-tuning of the text / image encoders on LLM-labelled pairs (§3.3.2).

`sft(cfg, prepared_dir, shard_dir, label_dir, out_dir, seed)`:
1. reads the valid (target, similar) pairs of the label stage and holds out a fraction (by seed);
2. rank 0 writes pair shards of the rest into out_dir/pairs, which `EqualBatches` streams with
   the same number of micro batches on every rank (train image transform, tokenised per batch);
3. trains t2t + i2i + t2i InfoNCE (`sicsrec.losses.sft_loss`, negatives pooled over ranks)
   under the engine (DeepSpeed ZeRO by default; sft.batch_size pairs per optimizer step over all
   ranks and sft.grad_accum micro batches), checkpointing every
   epoch (model, optimizer, epoch, step, RNG) so a killed run resumes to the same weights; on
   SIGTERM / SIGUSR1 (sicsrec.preemption) all ranks stop at the same accumulation boundary,
   checkpoint their position inside the epoch and exit with status 75; the re-run streams past
   the batches already done and ends with the weights of an uninterrupted run. For that, each
   batch's augmentation draws from its own RNG, seeded by (seed, epoch, the batch's item ids);
4. saves the tuned encoders with `ContentEncoder.save(out_dir/"encoder")` (gathered under ZeRO-3).
Retrieval recall@10 before and after SFT goes to metrics.json and the manifest:
- t2i: each item with an image queries with its text; hit if its own image ranks in the top 10
  among all items' images;
- pairs: each held-out pair's target text queries all other items' texts; hit if the similar
  item's text ranks in the top 10 (the query item itself is excluded).
Similarity is the one trained: cosine when sft.normalize, else the inner product. A rank is the
number of candidates scoring strictly higher, so ties count in the query's favour.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm_labeling.run import labels_input, read_pairs
from shards.collate import PairCollate
from shards.pairs import write_pair_shards
from shards.prepared import PreparedDataset, prepared_input
from shards.reader import EqualBatches, StreamedEpoch, load_index, shards_input, stream
from sicsrec.config import SFTConfig, micro_batch_per_rank
from sicsrec.encode import ItemEmbeddings, embed_items, from_main, initial_encoder
from sicsrec.engine import Engine, RunCheckpoint, build_engine
from sicsrec.loop import TrainLoop, fit_summary
from sicsrec.losses import sft_loss
from sicsrec.preemption import ignore_preemption_signals
from sicsrec.runtime import dist as distenv
from sicsrec.runtime.rundir import StageRun, run_declared, write_json

log = logging.getLogger(__name__)
RECALL_AT = 10


def split_holdout(pairs: list[tuple[int, int]], fraction: float, seed: int
                  ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held_out): a seeded random `fraction` of the pairs (at least one when fraction > 0
    and there are two or more pairs), both in their original order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sft.holdout_fraction must be in [0, 1), got {fraction}")
    n_hold = min(len(pairs) - 1, max(1, round(fraction * len(pairs)))) if fraction > 0 and len(pairs) > 1 else 0
    held = set(random.Random(seed).sample(range(len(pairs)), n_hold))
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def _ranks_of_positives(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                        exclude: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """For each query row, how many keys score strictly higher than its positive key."""
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ keys.T
        rows = torch.arange(scores.shape[0])
        if exclude is not None:
            scores[rows, exclude[start:start + chunk]] = float("-inf")
        own = scores[rows, positives[start:start + chunk]]
        ranks.append((scores > own[:, None]).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_recall(cache: ItemEmbeddings, held_out: list[tuple[int, int]], normalize: bool,
                     k: int = RECALL_AT) -> dict:
    """t2i and held-out pair recall@k from item embeddings aligned to dense ids (see module docstring)."""
    prep = (lambda x: F.normalize(x, dim=-1)) if normalize else (lambda x: x)
    text = prep(torch.from_numpy(cache.text).double())
    out = {}
    if cache.image is not None:
        with_image = torch.from_numpy(np.flatnonzero(cache.has_image))
        image = prep(torch.from_numpy(cache.image).double())
        ranks = _ranks_of_positives(text[with_image], image[with_image], torch.arange(len(with_image)))
        out[f"t2i_recall@{k}"] = float((ranks < k).double().mean()) if len(ranks) else None
        out["t2i_queries"] = len(ranks)
    pairs = torch.tensor([p for p in held_out if p[0] != p[1]], dtype=torch.long).reshape(-1, 2)
    keys = text[1:]  # row 0 is padding
    ranks = _ranks_of_positives(text[pairs[:, 0]], keys, pairs[:, 1] - 1, exclude=pairs[:, 0] - 1)
    out[f"pair_recall@{k}"] = float((ranks < k).double().mean()) if len(ranks) else None
    out["pair_queries"] = len(ranks)
    return out


class SFTTrainer(TrainLoop):
    """Encoder SFT on the loop: batches of labelled pairs streamed from the pair shards, the
    t2t + i2i + t2i InfoNCE step, no selection (the last weights are the tuned encoders)."""
    rate_of = "pairs"
    desc = "sft epoch"

    def __init__(self, cfg: SFTConfig, dataset: PreparedDataset, shard_dir: Path, held_out: list[tuple[int, int]],
                 out: Path, seed: int, env, run_id: str):
        if cfg.epochs < 1:
            raise ValueError("sft.epochs must be >= 1")
        micro = micro_batch_per_rank(cfg.batch_size, cfg.grad_accum, env.world_size, "sft")
        self.cfg, self.shard_dir, self.held_out, self.out, self.seed, self.env, self.run_id = \
            cfg, shard_dir, held_out, out, seed, env, run_id
        self.num_items, self.epochs = dataset.num_items, cfg.epochs
        model = initial_encoder(cfg.encoders, dataset, seed)
        self.reference = copy.deepcopy(model) if env.is_main else None  # rank 0's plain copy for eval and save
        self.batches = EqualBatches(out / "pairs", "pairs", micro, env.rank, env.world_size,
                                    num_workers=cfg.num_workers, seed=seed, skip_bad_images=False,
                                    collate=PairCollate(model, seed))
        self.steps_per_epoch = len(self.batches) // cfg.grad_accum * cfg.grad_accum  # no accumulation spans epochs
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.batches)} micro batches per rank cannot fill sft.grad_accum={cfg.grad_accum}; "
                             f"lower sft.batch_size")
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.engine: Engine = build_engine(model, optimizer, env, cfg, "sft")
        # dropout / augmentation streams differ per rank; timm's crops draw from python's random
        for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
            seed_fn(seed * 1000 + env.rank)
        self.checkpoint = RunCheckpoint(self.engine, out / "checkpoint", run_id, env)
        self.state = self.initial_state(run_id) | {"before": None}

    # -- evaluation on rank 0's plain copy (no ZeRO hooks, no collectives) --
    def evaluate(self, name: str) -> dict | None:
        if not self.env.is_main:
            return None
        model = self.reference.to(self.engine.device)
        cache = embed_items(model, stream(self.shard_dir, "items", split=False), self.cfg.eval_batch_size,
                            self.engine.device, self.engine.dtype, desc=f"eval {name}")
        return retrieval_recall(cache.aligned(self.num_items), self.held_out, self.cfg.normalize)

    def epoch_batches(self, epoch: int) -> StreamedEpoch:
        return StreamedEpoch(self.batches, epoch, self.steps_per_epoch, self.cfg.num_workers, self.seed,
                             ignore_preemption_signals)

    def train_step(self, batch: dict) -> tuple[dict, dict]:
        cfg, engine = self.cfg, self.engine
        n = len(batch["ids"]) // 2  # a-sides, then b-sides
        ids = batch["ids"].to(engine.device)
        images = batch.get("images")
        if images is not None and engine.ds is not None:
            images = images.to(engine.device, engine.dtype)  # DeepSpeed casts the model, not the inputs
        out = engine(texts=batch["tokens"], images=images)
        image_kw = {}
        if images is not None:
            has = batch["has_image"]
            image_kw = dict(image_a=out["image"][:n], image_b=out["image"][n:], has_image_a=has[:n],
                            has_image_b=has[n:])
        loss = sft_loss(out["text"][:n], out["text"][n:], ids[:n], ids[n:], cfg.temperature, **image_kw,
                        normalize=cfg.normalize, symmetric=cfg.symmetric, mask_duplicates=cfg.mask_duplicates)
        engine.backward(loss.total)
        engine.step()
        parts = [loss.total, loss.t2t, loss.i2i if loss.i2i is not None else loss.total * 0,
                 loss.t2i if loss.t2i is not None else loss.total * 0]
        means = distenv.all_sum(torch.stack([p.detach().float() for p in parts])) / self.env.world_size
        logged = dict(zip(("loss", "t2t", "i2i", "t2i"), means.tolist()))
        return logged, logged | {"pairs": n * self.env.world_size}

    def epoch_summary(self, sums: dict, steps: int, seconds: float) -> dict:
        pairs = sums.get("pairs", 0)
        return {**{k: sums.get(k, 0.0) / steps for k in ("loss", "t2t", "i2i", "t2i")},
                "seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / max(seconds, 1e-9)}

    def before_epochs(self, tb, guard, stop_after_epoch: int | None) -> None:
        if self.state["before"] is None:
            self.state["before"] = self.evaluate("before")
        distenv.barrier()

    def end_epoch(self, epoch: int, summary: dict, tb) -> None:
        state = self.state
        state["history"].append({"epoch": epoch, **summary})
        state["epoch"] = epoch
        state["position"] = None
        if tb:
            tb.add_scalar("train/epoch_loss", summary["loss"], state["step"])
            tb.add_scalar("train/pairs_per_s", summary["pairs_per_s"], state["step"])
            tb.flush()
            log.info("sft epoch %d: loss %.4f, %.1f pairs/s", epoch, summary["loss"], summary["pairs_per_s"])
        self.save()

    def final_metrics(self) -> dict:
        env, state = self.env, self.state
        weights = self.engine.module_state_dict()  # collective under ZeRO-3: every rank calls it
        metrics = None
        if env.is_main:
            self.reference.load_state_dict(weights)
            self.reference.save(self.out / "encoder")
            after = self.evaluate("after")
            history = state["history"]
            seconds = sum(h["seconds"] for h in history)
            metrics = {"engine": self.engine.kind, "zero_stage": self.engine.zero_stage, "world_size": env.world_size,
                       "epochs": len(history), "steps": state["step"],
                       "train_pairs": load_index(self.out / "pairs")["pairs"]["total"],
                       "held_out_pairs": len(self.held_out), "final_loss": history[-1]["loss"],
                       "pairs_per_s": sum(h["pairs"] for h in history) / max(seconds, 1e-9),
                       "seconds_per_epoch": seconds / len(history),
                       "before": state["before"], "after": after, "features": self.reference.extracted_features(),
                       "history": history}
            write_json(self.out / "metrics.json", metrics)
            log.info("sft: recall@%d before %s after %s", RECALL_AT, state["before"], after)
        return from_main(metrics)


def sft(cfg: SFTConfig, prepared_dir: str | Path, shard_dir: str | Path, label_dir: str | Path, out_dir: str | Path,
        seed: int, force: bool = False, stop_after_epoch: int | None = None) -> dict:
    """Stage `sft` (see module docstring). Reads the distributed environment itself (torchrun /
    SLURM). Returns the manifest (metrics under "metrics"). A finished matching run is skipped
    unless force; a run with a checkpoint but no manifest resumes. `stop_after_epoch` simulates a
    kill (tests)."""
    inputs = {"prepare": prepared_input(prepared_dir), "shards": shards_input(shard_dir),
              "label": labels_input(label_dir)}

    def body(run: StageRun) -> dict:
        dataset = PreparedDataset.load(prepared_dir)
        train_pairs, held_out = split_holdout(read_pairs(label_dir), cfg.holdout_fraction, seed)
        if run.env.is_main:  # enough shards that every rank x worker gets one
            readers = run.env.world_size * max(1, cfg.num_workers)
            per_shard = max(1, min(cfg.pairs_per_shard, len(train_pairs) // readers))
            write_pair_shards(train_pairs, shard_dir, run.out / "pairs", per_shard)
            (run.out / "held_out_pairs.json").write_text(json.dumps(held_out) + "\n")
        distenv.barrier()
        trainer = SFTTrainer(cfg, dataset, shard_dir, held_out, run.out, seed, run.env, run.run_id)
        return fit_summary(trainer, force, stop_after_epoch)

    return run_declared("sft", out_dir, cfg, inputs, body, force, seed, per_world_size=True)

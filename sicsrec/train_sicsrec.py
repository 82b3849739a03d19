"""SICSRec step 2 (§3.5): the step-1 ID encoder frozen (+ peft LoRA), content encoder, mix
decoder and aggregation trained with L = L_CE + alpha L_ConCL + lambda ||Theta||^2 (eq. 19).

Reuses the step-1 trainer (sicsrec/train.py) for everything but the model and the loss: data
order, distributed steps, early stopping on validation NDCG@10, checkpoints and resume,
evaluation with the same scoring at train and test time (h_a . e_id, eq. 16).
ConCL (eq. 18) contrasts each sequence's last-position h_a with the unified content embedding
of its next item; negatives are the other sequences' next items pooled across all ranks, the
same item elsewhere in the global batch masked (sicsrec.losses.concl_loss). Similarity is the
cosine (h_a normalised as well): at tau = 0.05 raw inner products of unnormalised h_a explode.
Theta: the content adapters' weights, the trainable stand-ins of E_text and E_image (the cached
tables themselves are frozen, and E_id is frozen in step 2).

Training strategies (Table 9, `sicsrec.strategy`):
  fixed_id       ours: the step-1 encoder frozen (+ LoRA), the rest trained.
  end_to_end     the paper's "End2end (not fixed)": the whole model from scratch in one run, the
                 ID encoder re-initialised (same architecture as step 1) and trained jointly.
  fixed_content  the paper's "Fixed ConEnc": phase 1 (in <out>/content_pretrain/) trains the
                 content adapters, CMSE, MMSD and aggregation with the ID encoder frozen at its
                 random init; phase 2 (in <out>/) starts from phase 1's best weights, freezes
                 the content parts (`SICSRec.content_modules`) and trains the ID encoder, MMSD
                 and aggregation. Epochs to convergence count both phases.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher import dist as distenv
from launcher.config import Config
from launcher.rundir import fingerprint, read_manifest, run_stage
from shards.prepared import PreparedDataset
from sicsrec.config import SICSRecConfig
from sicsrec.losses import concl_loss
from sicsrec.models.sicsrec import SICSRec, SICSRecVariant, freeze_with_lora
from sicsrec.train import Trainer, load_id_encoder


class SICSRecLoss(nn.Module):
    """(inputs, targets) -> (CE sum, #targets, alpha ConCL + lambda reg) for the step-1 Trainer."""

    def __init__(self, recommender: SICSRec, alpha: float, temperature: float, reg: float):
        super().__init__()
        self.recommender, self.alpha, self.temperature, self.reg = recommender, alpha, temperature, reg

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        model = self.recommender
        hidden = model.hidden_states(inputs)
        real = targets != 0
        ce_sum = F.cross_entropy(model.logits(hidden[real]), targets[real], reduction="sum")
        extra = hidden.new_zeros(())
        if self.alpha > 0:
            last = targets[:, -1]  # windows end at their last item: the last target is always real
            extra = extra + self.alpha * concl_loss(hidden[:, -1], model.unified_content(last), last,
                                                    self.temperature, normalize=True).loss
        if self.reg > 0:
            adapters = [a for a in (model.text_adapter, model.image_adapter) if a is not None]
            extra = extra + self.reg * sum(p.pow(2).sum() for a in adapters for p in a.parameters())
        return ce_sum, real.sum(), extra


STRATEGIES = ("fixed_id", "end_to_end", "fixed_content")


class SICSRecTrainer(Trainer):
    """Step 2 on the step-1 Trainer. `phase` (fixed_content only): "content" = phase 1, "id" =
    phase 2, which starts from `init_state` (phase 1's best weights)."""

    def __init__(self, cfg: SICSRecConfig, id_encoder, tables: dict, *args, phase: str = "",
                 init_state: dict | None = None):
        if cfg.strategy not in STRATEGIES:
            raise ValueError(f"sicsrec.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
        self.step2, self.id_encoder, self.tables = cfg, id_encoder, tables
        self.phase, self.init_state = phase, init_state
        super().__init__(cfg.train, *args)

    def build(self):
        c = self.step2
        encoder = self.id_encoder
        if c.strategy != "fixed_id":  # Table 9's other strategies start the ID encoder from scratch
            encoder = copy.deepcopy(encoder)
            encoder.apply(_reset_parameters)
        encoder = freeze_with_lora(encoder, c.lora_rank, use_lora=c.use_lora and c.strategy == "fixed_id")
        variant = SICSRecVariant(c.use_imse, c.use_cmse, c.use_mmsd, c.l2norm, c.use_text, c.use_image)
        model = SICSRec(encoder, self.tables.get("text"), self.tables.get("image"), self.tables.get("has_image"),
                        c.content_layers, c.decoder_layers, c.heads, c.dropout, variant,
                        aggregate_init=c.aggregate_init if c.strategy == "fixed_id" else "random")
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        if c.strategy == "end_to_end" or self.phase == "id":
            encoder.requires_grad_(True)
        if self.phase == "id":
            for module in model.content_modules():
                module.requires_grad_(False)
        return model, SICSRecLoss(model, c.alpha, c.temperature, c.reg)


def _reset_parameters(module: nn.Module) -> None:
    """A fresh initialisation of the ID encoder (SASRec's own init where it has one)."""
    from sicsrec.models.sasrec import _init_weights

    if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
        _init_weights(module)
    elif isinstance(module, nn.GRU):
        module.reset_parameters()


def load_embedding_cache(folder: Path) -> dict:
    """text.npy / image.npy [N+1, d] and has_image.npy [N+1] written by the `encode` stage."""
    tables = {}
    for name in ("text", "image", "has_image"):
        path = folder / f"{name}.npy"
        if path.exists():
            tables[name] = torch.from_numpy(np.load(path))
    if "text" not in tables and "image" not in tables:
        raise FileNotFoundError(f"{folder} holds no text.npy or image.npy: run `launcher encode` first")
    return tables


def train_sicsrec(cfg: Config, force: bool = False, stop_after_epoch: int | None = None) -> dict:
    """Stage `train-sicsrec`: reads <run_dir>/{prepare, train_id, embeddings}, writes <run_dir>/sicsrec."""
    env = distenv.init(distenv.detect())
    run = Path(cfg.run_dir)
    inputs = {}
    for stage in ("prepare", "train_id", "embeddings"):
        manifest = read_manifest(run / stage)
        if manifest is None:
            raise FileNotFoundError(f"stage '{stage}' has not run in {run}: run it before train-sicsrec")
        inputs[stage] = manifest["fingerprint"]
    dataset = PreparedDataset.load(run / "prepare")
    section = dict(dataclasses.asdict(cfg.sicsrec), seed=cfg.seed)
    run_id = fingerprint(section, inputs)

    def body(out: Path) -> dict:
        args = (load_id_encoder(run / "train_id"), load_embedding_cache(run / "embeddings"), dataset)
        if cfg.sicsrec.strategy != "fixed_content":
            metrics = _fit(SICSRecTrainer(cfg.sicsrec, *args, out, cfg.seed, env, run_id), force, stop_after_epoch)
            metrics["epochs_to_best"] = metrics["best_epoch"] + 1
            return metrics
        phase1_dir = out / "content_pretrain"
        phase1_dir.mkdir(parents=True, exist_ok=True)
        first = _fit(SICSRecTrainer(cfg.sicsrec, *args, phase1_dir, cfg.seed, env, run_id + "-content",
                                    phase="content"), force, stop_after_epoch)
        best = torch.load(phase1_dir / "best_model.pt", map_location="cpu", weights_only=True)
        metrics = _fit(SICSRecTrainer(cfg.sicsrec, *args, out, cfg.seed, env, run_id, phase="id", init_state=best),
                       force, None if stop_after_epoch is None else stop_after_epoch - first["epochs_run"])
        metrics["content_pretrain"] = {k: first[k] for k in ("best_epoch", "epochs_run", "valid", "test")}
        metrics["epochs_run_total"] = first["epochs_run"] + metrics["epochs_run"]
        metrics["epochs_to_best"] = first["epochs_run"] + metrics["best_epoch"] + 1
        return metrics

    return run_stage(run / "sicsrec", "train_sicsrec", section, inputs, body, force, env.is_main)


def _fit(trainer: SICSRecTrainer, force: bool, stop_after_epoch: int | None) -> dict:
    trainer.resume(restart=force)
    metrics = trainer.fit(stop_after_epoch)
    return {k: v for k, v in metrics.items() if k != "history"}

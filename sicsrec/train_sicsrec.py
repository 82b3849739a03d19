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
"""
from __future__ import annotations

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


class SICSRecTrainer(Trainer):
    def __init__(self, cfg: SICSRecConfig, id_encoder, tables: dict, *args):
        self.step2, self.id_encoder, self.tables = cfg, id_encoder, tables
        super().__init__(cfg.train, *args)

    def build(self):
        c = self.step2
        if c.strategy not in ("fixed_id", "end_to_end"):
            raise ValueError(f"sicsrec.strategy must be fixed_id or end_to_end, got {c.strategy!r}")
        encoder = freeze_with_lora(self.id_encoder, c.lora_rank, use_lora=c.use_lora and c.strategy == "fixed_id")
        if c.strategy == "end_to_end":
            for p in encoder.parameters():
                p.requires_grad_(True)
        variant = SICSRecVariant(c.use_imse, c.use_cmse, c.use_mmsd, c.l2norm, c.use_text, c.use_image)
        model = SICSRec(encoder, self.tables.get("text"), self.tables.get("image"), self.tables.get("has_image"),
                        c.content_layers, c.decoder_layers, c.heads, c.dropout, variant)
        return model, SICSRecLoss(model, c.alpha, c.temperature, c.reg)


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
        trainer = SICSRecTrainer(cfg.sicsrec, load_id_encoder(run / "train_id"),
                                 load_embedding_cache(run / "embeddings"),
                                 dataset, out, cfg.seed, env, run_id)
        trainer.resume(restart=force)
        metrics = trainer.fit(stop_after_epoch)
        return {k: v for k, v in metrics.items() if k != "history"}

    return run_stage(run / "sicsrec", "train_sicsrec", section, inputs, body, force, env.is_main)

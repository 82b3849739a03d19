"""Stage `train-content`: the SASRec-Content / SASRec-Hybrid baselines (TSSR paper) on the
cached item embeddings, trained by the step-1 Trainer (full-softmax CE, early stopping on valid
NDCG@10, checkpoints, resume, single / DDP / DeepSpeed). The transformer settings and the
optimisation come from the `train_id` section, so the baselines match our SASRec row.

Reads <run_dir>/{prepare, embeddings}; writes <run_dir>/sasrec_content or <run_dir>/sasrec_hybrid
(best_model.pt, metrics.json, train_log.jsonl, checkpoint/, manifest.json).
"""
from __future__ import annotations

from pathlib import Path

from shards.prepared import PreparedDataset, prepared_input
from sicsrec.config import TrainConfig
from sicsrec.embedding_cache import load_embedding_cache
from sicsrec.loop import fit_summary
from sicsrec.models.content_sasrec import VARIANTS, ContentSASRec
from sicsrec.runtime.rundir import StageRun, Upstream, fingerprinted, run_declared
from sicsrec.train import NextItemLoss, Trainer


class ContentTrainer(Trainer):
    def __init__(self, variant: str, tables: dict, *args):
        self.variant, self.tables = variant, tables
        super().__init__(*args)

    def build(self):
        c, t = self.cfg, self.tables
        model = ContentSASRec(self.variant, t.get("text"), t.get("image"), t.get("has_image"), c.hidden, c.layers,
                              c.heads, c.dropout, c.max_len, c.ffn_dim, c.activation)
        if model.num_items != self.dataset.num_items:
            raise ValueError(f"the embedding cache has {model.num_items} items, the dataset {self.dataset.num_items}: "
                             f"re-run `launcher encode`")
        return model, NextItemLoss(model)


def train_content(cfg: TrainConfig, prepared_dir: Path, embeddings_dir: Path, out_dir: Path, seed: int,
                  variant: str = "content", force: bool = False, stop_after_epoch: int | None = None) -> dict:
    """SASRec-Content (variant "content") or SASRec-Hybrid ("hybrid") with the `train_id`
    section's settings -> out_dir (<run_dir>/sasrec_<variant>)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    inputs = {"prepare": prepared_input(prepared_dir), "embeddings": Upstream("encode", embeddings_dir)}
    tables = load_embedding_cache(embeddings_dir)
    section = dict(fingerprinted(cfg), variant=variant, content=sorted(k for k in tables if k != "has_image"))

    def body(stage: StageRun) -> dict:
        dataset = PreparedDataset.load(prepared_dir)
        trainer = ContentTrainer(variant, tables, cfg, dataset, stage.out, seed, stage.env, stage.run_id)
        return dict(fit_summary(trainer, force, stop_after_epoch), model=f"sasrec_{variant}")

    return run_declared(f"train-{variant}", out_dir, section, inputs, body, force, seed)

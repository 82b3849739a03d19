"""Stage `train-content`: the SASRec-Content / SASRec-Hybrid baselines (TSSR paper) on the
cached item embeddings, trained by the step-1 Trainer (full-softmax CE, early stopping on valid
NDCG@10, checkpoints, resume, single / DDP / DeepSpeed). The transformer settings and the
optimisation come from the `train_id` section, so the baselines match our SASRec row.

Reads <run_dir>/{prepare, embeddings}; writes <run_dir>/sasrec_content or <run_dir>/sasrec_hybrid
(best_model.pt, metrics.json, train_log.jsonl, checkpoint/, manifest.json).
"""
from __future__ import annotations


from shards.prepared import PreparedDataset, prepared_input
from sicsrec.config import RunConfig
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


def train_content(cfg: RunConfig, variant: str = "content", force: bool = False, use_text: bool = True,
                  use_image: bool = True, stop_after_epoch: int | None = None) -> dict:
    """SASRec-Content (variant "content") or SASRec-Hybrid ("hybrid") -> <run_dir>/sasrec_<variant>."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    d = cfg.stage_dir
    inputs = {"prepare": prepared_input(d("prepare")), "embeddings": Upstream("encode", d("encode"))}
    tables = load_embedding_cache(d("encode"))
    tables = {k: v for k, v in tables.items() if (k != "text" or use_text) and (k != "image" or use_image)}
    if "text" not in tables and "image" not in tables:
        raise ValueError("train-content needs text or image embeddings (use_text / use_image)")
    section = dict(fingerprinted(cfg.train_id), variant=variant,
                   content=sorted(k for k in tables if k != "has_image"))

    def body(stage: StageRun) -> dict:
        dataset = PreparedDataset.load(d("prepare"))
        trainer = ContentTrainer(variant, tables, cfg.train_id, dataset, stage.out, cfg.seed, stage.env, stage.run_id)
        return dict(fit_summary(trainer, force, stop_after_epoch), model=f"sasrec_{variant}")

    return run_declared(f"train-{variant}", d(f"train-{variant}"), section, inputs, body, force, cfg.seed)

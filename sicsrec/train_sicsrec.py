"""SICSRec step 2 (§3.5): on top of the step-1 ID encoder, the content encoder, mix decoder and
aggregation trained with L = L_CE + alpha L_ConCL + lambda ||Theta||^2 (eq. 19).

Reuses the step-1 trainer (sicsrec/train.py) for everything but the model and the loss: data
order, distributed steps, early stopping on validation NDCG@10, checkpoints and resume,
evaluation with the same scoring at train and test time (h_a . e_id, eq. 16).
ConCL (eq. 18) contrasts each sequence's last-position h_a with the unified content embedding
of its next item; negatives are the other sequences' next items pooled across all ranks, the
same item elsewhere in the global batch masked (sicsrec.losses.concl_loss). Similarity
(`concl_similarity`): cosine by default (h_a normalised as well, as the official code does): at
tau = 0.05 raw inner products of unnormalised h_a explode; `inner` is the raw product.
Theta (`reg`, `reg_id_emb`): the trainable ones of E_id (the ID encoder's item table) and of
E_text, E_image: the content adapters' weights, and the cached tables themselves with
`content_tables: trainable` (else frozen buffers); a frozen member would only add a constant,
so it is left out.

Training strategies (Table 9, `sicsrec.strategy`; parameter groups as in
`SICSRec.parameter_groups`: "Emb" = E_id or the content adapters, "Enc" = the sequence encoder
on top of them, positions and norm included):
  fixed_id_enc     default, the paper's "Fixed IDEnc" (= its headline SICSRec, Table 4): the
                   step-1 encoder layers frozen + LoRA (B = 0), E_id keeps training (and is in
                   Theta), the content and mix parts train.
  fixed_id_emb     "Fixed IDEmb": E_id frozen at step 1, the step-1 encoder layers fine-tuned in
                   full. No LoRA: a low-rank update of weights that train anyway adds nothing.
  fixed_id_emb_enc "Fixed IDEmb&Enc": E_id and the encoder layers frozen + LoRA (this module's
                   `fixed_id` before the Table 9 names).
  These three start exactly at the step-1 model (identity aggregation, LoRA B = 0), so the
  trainer evaluates that start first (epoch -1 in the history) and may select it: step 2 never
  ends below step 1 on validation.
  fixed_content_enc, fixed_content_emb, fixed_content_emb_enc  "Fixed ConEnc", "Fixed ConEmb",
                   "Fixed ConEmb&Enc": phase 1 (in <out>/content_pretrain/) trains the content
                   adapters, content encoder, MMSD and aggregation with the ID encoder (E_id
                   included) frozen at a random init; phase 2 (in <out>/) starts from phase 1's
                   best weights (evaluated first, as above), freezes the content encoder (CMSE,
                   content positions and norm), the adapters, or both, and trains the ID encoder
                   in full, MMSD, aggregation and the unfrozen content part. Epochs to
                   convergence count both phases. The earlier `fixed_content` froze both:
                   fixed_content_emb_enc.
  end_to_end       "End2end (not fixed)": the whole model from scratch in one run, the ID encoder
                   re-initialised (same architecture as step 1) and trained jointly.
Deprecated aliases: fixed_id -> fixed_id_emb_enc, fixed_content -> fixed_content_emb_enc.
A part with no gradient path in a variant stays frozen whatever the strategy (w/o IMSE: the ID
encoder layers, and no LoRA; w/o CMSE: content positions and norm, and the adapters too when
alpha = 0), so DDP never meets a trainable parameter without a gradient.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shards.prepared import PreparedDataset, prepared_input
from sicsrec.config import SICSRecConfig
from sicsrec.embedding_cache import load_embedding_cache
from sicsrec.loop import fit_summary
from sicsrec.losses import concl_loss
from sicsrec.models.sasrec import history_offsets
from sicsrec.models.sicsrec import SICSRec, SICSRecVariant, freeze_with_lora
from sicsrec.next_item import criterion_of
from sicsrec.runtime.rundir import StageRun, Upstream, run_declared
from sicsrec.train import Trainer, load_id_encoder


class SICSRecLoss(nn.Module):
    """(inputs, targets) -> (CE sum, #targets, alpha ConCL + lambda reg) for the step-1 Trainer."""

    def __init__(self, recommender: SICSRec, alpha: float, temperature: float, reg: float,
                 similarity: str = "cosine", reg_id_emb: bool = True):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"sicsrec.concl_similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.recommender, self.alpha, self.temperature, self.reg = recommender, alpha, temperature, reg
        self.normalize = similarity == "cosine"
        self.reg_id_emb = reg_id_emb

    def regularized(self) -> list[nn.Parameter]:
        """Theta of eq. 19, its trainable members: E_id (with reg_id_emb), the content adapters and
        the content tables when they train."""
        model = self.recommender
        theta = [p for _, p in model.parameter_groups()["id_emb"]] if self.reg_id_emb else []  # E_id: its tables (+ history bias)
        theta += [p for a in (model.text_adapter, model.image_adapter) if a is not None for p in a.parameters()]
        theta += [t for t in (model.text_table, model.image_table) if isinstance(t, nn.Parameter)]
        return [p for p in theta if p.requires_grad]

    def external_parameters(self) -> list[nn.Parameter]:
        """What forward uses outside their submodules' forwards (the L2 term): ZeRO-3 must gather them."""
        return self.regularized() if self.reg > 0 else []

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        model = self.recommender
        hidden = model.hidden_states(inputs)
        # `criterion` (set by the Trainer from sicsrec.train.loss): full | chunked | sampled
        ce_sum, count, _ = criterion_of(self)(hidden, model.item_table(), targets, history_offsets(model, inputs))
        extra = hidden.new_zeros(())
        if self.alpha > 0:
            last = targets[:, -1]  # windows end at their last item: the last target is always real
            extra = extra + self.alpha * concl_loss(hidden[:, -1], model.unified_content(last), last,
                                                    self.temperature, normalize=self.normalize).loss
        theta = self.regularized() if self.reg > 0 else []
        if theta:
            extra = extra + self.reg * sum(p.pow(2).sum() for p in theta)
        return ce_sum, count, extra


SIMILARITIES = ("cosine", "inner")


@dataclass(frozen=True)
class Strategy:
    """One row of Table 9: which parameter groups (SICSRec.parameter_groups) stay frozen."""
    label: str  # the row's name in Table 9
    frozen: frozenset  # groups frozen (phase 2 of a two-phase strategy)
    from_step1: bool  # the ID encoder starts at the step-1 weights (else re-initialised)
    lora: bool = False  # LoRA on the frozen ID encoder layers (with sicsrec.use_lora)
    content_pretrain: bool = False  # phase 1 first: the content parts with the ID side frozen at random


STRATEGIES: dict[str, Strategy] = {
    "fixed_id_enc": Strategy("Fixed IDEnc", frozenset({"id_enc"}), True, lora=True),
    "fixed_id_emb": Strategy("Fixed IDEmb", frozenset({"id_emb"}), True),
    "fixed_id_emb_enc": Strategy("Fixed IDEmb&Enc", frozenset({"id_emb", "id_enc"}), True, lora=True),
    "fixed_content_enc": Strategy("Fixed ConEnc", frozenset({"content_enc"}), False, content_pretrain=True),
    "fixed_content_emb": Strategy("Fixed ConEmb", frozenset({"content_emb"}), False, content_pretrain=True),
    "fixed_content_emb_enc": Strategy("Fixed ConEmb&Enc", frozenset({"content_emb", "content_enc"}), False,
                                      content_pretrain=True),
    "end_to_end": Strategy("End2end (not fixed)", frozenset(), False),
}
# Deprecated names (before the Table 9 names), mapped to the strategies that do what they did.
ALIASES = {"fixed_id": "fixed_id_emb_enc", "fixed_content": "fixed_content_emb_enc"}
CONTENT_PHASE_FROZEN = frozenset({"id_emb", "id_enc"})  # phase 1 of the content strategies


def resolve_strategy(name: str) -> str:
    """The strategy's Table 9 name (deprecated aliases mapped)."""
    if name in ALIASES:
        return ALIASES[name]
    if name not in STRATEGIES:
        raise ValueError(f"sicsrec.strategy must be one of {list(STRATEGIES)} (or the deprecated "
                         f"{list(ALIASES)}), got {name!r}")
    return name


def starts_at_step1(cfg: SICSRecConfig, phase: str = "") -> bool:
    """Whether the step-2 model starts as a trained model: exactly the step-1 function (a
    from-step-1 strategy with IMSE and identity aggregation; LoRA starts at B = 0), or phase 2 of
    a content strategy (phase 1's best weights)."""
    strategy = STRATEGIES[resolve_strategy(cfg.strategy)]
    if phase == "id":
        return True
    return phase == "" and strategy.from_step1 and cfg.use_imse and cfg.aggregate_init == "identity"


CONTENT_TABLES = ("frozen", "trainable")


def content_tables_train(cfg: SICSRecConfig) -> bool:
    if cfg.content_tables not in CONTENT_TABLES:
        raise ValueError(f"sicsrec.content_tables must be one of {CONTENT_TABLES}, got {cfg.content_tables!r}")
    return cfg.content_tables == "trainable"


def build_step2_model(cfg: SICSRecConfig, id_encoder, tables: dict, phase: str = "",
                      init_state: dict | None = None) -> SICSRec:
    """The step-2 model under `cfg.strategy`, its parameters frozen or trainable as the strategy
    (and `phase`: "content" = phase 1, "id" = phase 2 of a content strategy) says. The step-1
    `id_encoder` is copied, never modified. Parts with no gradient path in the variant stay frozen."""
    strategy = STRATEGIES[resolve_strategy(cfg.strategy)]
    if strategy.content_pretrain != (phase in ("content", "id")):
        raise ValueError(f"phase {phase!r} does not fit strategy {cfg.strategy!r}")
    if strategy.content_pretrain and not cfg.use_cmse:
        raise ValueError(f"sicsrec.strategy={cfg.strategy} pre-trains the content encoder: it needs use_cmse")
    frozen = CONTENT_PHASE_FROZEN if phase == "content" else strategy.frozen
    encoder = copy.deepcopy(id_encoder)
    if not strategy.from_step1:  # Table 9's other strategies start the ID encoder from scratch
        encoder.apply(_reset_parameters)
    # LoRA only where the ID encoder runs (IMSE) and its layers are frozen
    lora = cfg.use_lora and strategy.lora and cfg.use_imse and phase == ""
    encoder = freeze_with_lora(encoder, cfg.lora_rank, use_lora=lora)
    variant = SICSRecVariant(cfg.use_imse, cfg.use_cmse, cfg.use_mmsd, cfg.l2norm, cfg.use_text, cfg.use_image)
    model = SICSRec(encoder, tables.get("text"), tables.get("image"), tables.get("has_image"),
                    cfg.content_layers, cfg.decoder_layers, cfg.heads, cfg.dropout, variant,
                    aggregate_init=cfg.aggregate_init if strategy.from_step1 else "random",
                    trainable_tables=content_tables_train(cfg))
    if init_state is not None:
        model.load_state_dict(init_state)
    used = model.used_groups(concl=cfg.alpha > 0)
    for group, params in model.parameter_groups().items():
        for _, p in params:
            p.requires_grad_(group in used and group not in frozen)
    return model


class SICSRecTrainer(Trainer):
    """Step 2 on the step-1 Trainer. `phase` (content strategies only): "content" = phase 1, "id" =
    phase 2, which starts from `init_state` (phase 1's best weights). A step 2 that starts as a
    trained model (`starts_at_step1`) has its start evaluated and selectable (Trainer.starts_trained)."""

    config_section = "sicsrec.train"
    model_name = "sicsrec"

    def __init__(self, cfg: SICSRecConfig, id_encoder, tables: dict, *args, phase: str = "",
                 init_state: dict | None = None):
        resolve_strategy(cfg.strategy)  # a clear error before anything is built
        self.step2, self.id_encoder, self.tables = cfg, id_encoder, tables
        self.phase, self.init_state = phase, init_state
        self.starts_trained = starts_at_step1(cfg, phase)
        super().__init__(cfg.train, *args)

    def build(self):
        c = self.step2
        model = build_step2_model(c, self.id_encoder, self.tables, self.phase, self.init_state)
        return model, SICSRecLoss(model, c.alpha, c.temperature, c.reg, c.concl_similarity, c.reg_id_emb)


def _reset_parameters(module: nn.Module) -> None:
    """A fresh initialisation of the ID encoder (SASRec's own init where it has one)."""
    from sicsrec.models.sasrec import _init_weights

    if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
        _init_weights(module)
    elif isinstance(module, nn.GRU):
        module.reset_parameters()


def train_sicsrec(cfg: SICSRecConfig, prepared_dir: Path, step1_dir: Path, embeddings_dir: Path, out_dir: Path,
                  seed: int, force: bool = False, stop_after_epoch: int | None = None) -> dict:
    """Stage `train-sicsrec`: reads the prepared dataset, the step-1 model (train_id) and the
    embedding cache; writes out_dir (<run_dir>/sicsrec)."""
    inputs = {"prepare": prepared_input(prepared_dir), "train_id": Upstream("train-id", step1_dir),
              "embeddings": Upstream("encode", embeddings_dir)}
    strategy = STRATEGIES[resolve_strategy(cfg.strategy)]
    if cfg.strategy in ALIASES:
        warnings.warn(f"sicsrec.strategy={cfg.strategy} is deprecated: it means "
                      f"{ALIASES[cfg.strategy]} (Table 9 names)", DeprecationWarning, stacklevel=2)

    def body(stage: StageRun) -> dict:
        out, env, run_id = stage.out, stage.env, stage.run_id
        args = (load_id_encoder(step1_dir), load_embedding_cache(embeddings_dir), PreparedDataset.load(prepared_dir))
        if not strategy.content_pretrain:
            trainer = SICSRecTrainer(cfg, *args, out, seed, env, run_id)
            metrics = fit_summary(trainer, force, stop_after_epoch)
            metrics["epochs_to_best"] = metrics["best_epoch"] + 1  # 0: the start (step 1) was kept
            return metrics
        phase1_dir = out / "content_pretrain"
        phase1_dir.mkdir(parents=True, exist_ok=True)
        first = fit_summary(SICSRecTrainer(cfg, *args, phase1_dir, seed, env, run_id + "-content",
                                           phase="content"), force, stop_after_epoch)
        best = torch.load(phase1_dir / "best_model.pt", map_location="cpu", weights_only=True)
        second = SICSRecTrainer(cfg, *args, out, seed, env, run_id, phase="id", init_state=best)
        remaining = None if stop_after_epoch is None else stop_after_epoch - first["epochs_run"]
        metrics = fit_summary(second, force, remaining)
        metrics["content_pretrain"] = {k: first[k] for k in ("best_epoch", "epochs_run", "valid", "test")}
        metrics["epochs_run_total"] = first["epochs_run"] + metrics["epochs_run"]
        # phase 2 kept its start (best_epoch -1): the best model is phase 1's
        metrics["epochs_to_best"] = (first["best_epoch"] + 1 if metrics["best_epoch"] < 0
                                     else first["epochs_run"] + metrics["best_epoch"] + 1)
        return metrics

    return run_declared("train-sicsrec", out_dir, cfg, inputs, body, force, seed)

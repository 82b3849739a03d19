"""The optimizer of the recommender trainers (one place, so that every trainer builds it alike).

`build_optimizer(module, cfg)`: AdamW over the module's trainable parameters (lr, weight_decay of
the section), what every trainer used before.

With `<section>.sparse_item_grad: true` (issue #15; `loss: sampled`, engine single or DDP on gloo,
the step-1 SASRec / GRU4Rec): the recommender's item table gets row-sparse gradients (its input
lookup `nn.Embedding(sparse=True)`, the sampled candidates' rows a sparse `F.embedding`, see
`SequentialRecommender.use_sparse_item_grad` and sicsrec.next_item), as large-vocabulary systems
(TorchRec, HSTU) update only the rows a step touches. A sparse gradient needs an optimizer that
takes one: the table is updated by `torch.optim.SparseAdam`, everything else by AdamW, both
behind one `SparseDenseOptimizer` (step, zero_grad, state_dict / load_state_dict, param_groups:
what sicsrec.engine calls).
- SparseAdam is *lazy* Adam: a step updates the first and second moments and the weights of the
  rows in that step's gradient only (the bias correction uses the step count, which counts every
  step); untouched rows keep weights and moments. Dense AdamW would move every row by its
  momentum each step: the two give different trajectories (same lr, betas, eps).
- No weight decay on the item table (SparseAdam has none): `weight_decay` applies to the dense
  parameters only; a warning says so when weight_decay > 0.
- Its moments are dense [N+1, d] tensors (as AdamW's): the optimizer state does not shrink, the
  per-step gradient memory does.
- Gradient clipping (`grad_clip`, torch.nn.utils.clip_grad_norm_ in the engine) handles sparse
  gradients: the norm of the coalesced gradient, scaled in place (tested against dense).
- DDP averages sparse gradients with the process group's sparse all-reduce: gloo has one, NCCL
  does not (torch: "NCCL does not support all_reduce with sparse tensors"), so more than one
  NCCL rank is refused; one GPU process (engine single) works. DeepSpeed is refused (its optimizer
  wrappers and ZeRO partitioning take dense gradients only).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
SPARSE_ENGINES = ("auto", "single", "ddp")


def build_optimizer(module: nn.Module, cfg, where: str | None = None):
    """AdamW over `module`'s trainable parameters with the section's lr and weight decay; with
    `cfg.sparse_item_grad`, a SparseDenseOptimizer (SparseAdam on the item table, AdamW on the
    rest) after switching the recommender's item table to sparse gradients. `where` (the config
    section, named in errors): default the section of `module.criterion` (the Trainer sets it)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not getattr(cfg, "sparse_item_grad", False):
        return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    where = where or getattr(getattr(module, "criterion", None), "where", None) or "train_id"
    table = enable_sparse_item_grad(module, cfg, where)
    if not table.requires_grad:
        raise ValueError(f"{where}.sparse_item_grad=true: the item table does not train (frozen)")
    dense = [p for p in trainable if p is not table]
    if cfg.weight_decay > 0:
        log.warning("%s.sparse_item_grad: weight_decay=%g applies to the dense parameters only; the item "
                    "table (SparseAdam) gets none", where, cfg.weight_decay)
    return SparseDenseOptimizer(dense=torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay),
                                sparse=torch.optim.SparseAdam([table], lr=cfg.lr))


def check_sparse_item_grad(cfg, where: str = "train_id") -> None:
    """The settings sparse_item_grad needs besides the model (sicsrec.next_item checks loss=sampled)."""
    if cfg.loss != "sampled":
        raise ValueError(f"{where}.sparse_item_grad=true needs {where}.loss=sampled, got loss={cfg.loss}")
    if cfg.engine not in SPARSE_ENGINES:
        raise ValueError(f"{where}.sparse_item_grad=true needs {where}.engine single or ddp (or auto), got "
                         f"engine={cfg.engine}: DeepSpeed's optimizer wrappers and ZeRO take dense gradients only")
    if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() == "nccl":
        raise ValueError(f"{where}.sparse_item_grad=true with {dist.get_world_size()} NCCL ranks: NCCL has no "
                         f"sparse all-reduce for DDP to average the item table's sparse gradient; use the gloo "
                         f"backend, or one process (engine single)")


def enable_sparse_item_grad(module: nn.Module, cfg, where: str = "train_id") -> nn.Parameter:
    """Check the settings, switch `module.recommender`'s item table to sparse gradients and return
    it. Refused (ValueError naming the section) for models other than the step-1 SASRec / GRU4Rec."""
    recommender = getattr(module, "recommender", module)
    use = getattr(recommender, "use_sparse_item_grad", None)
    table = use() if use is not None and _plain_loss(module) else None
    if table is None:
        raise ValueError(f"{where}.sparse_item_grad=true is not supported for the {type(recommender).__name__} "
                         f"model of this stage (its item table is not a plain embedding, or its loss uses the "
                         f"whole table): only the step-1 SASRec / GRU4Rec (train_id with model sasrec | gru4rec)")
    check_sparse_item_grad(cfg, where)
    return table


def _plain_loss(module: nn.Module) -> bool:
    """The loss module is the step-1 next-item CE (nothing but the criterion touches the table)."""
    from sicsrec.train import NextItemLoss  # sicsrec.train imports this module

    return type(module) is NextItemLoss


class SparseDenseOptimizer:
    """Two torch optimizers stepped as one: `sparse` (SparseAdam) over the parameters with sparse
    gradients, `dense` (AdamW) over the others. Offers what sicsrec.engine uses (step, zero_grad,
    state_dict, load_state_dict) and the param_groups / state views of a torch optimizer (a
    learning-rate change in a group applies). Not a torch.optim.Optimizer subclass: torch's LR
    schedulers and DeepSpeed would not take it (neither is used with it)."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.dense, self.sparse = dense, sparse

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"dense": self.dense, "sparse": self.sparse}

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups

    @property
    def state(self) -> dict:
        return {**self.dense.state, **self.sparse.state}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sparse.step()
        self.dense.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"sparse_dense": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("sparse_dense") if isinstance(state, dict) else None
        if not isinstance(parts, dict) or set(parts) != {"dense", "sparse"}:
            raise ValueError("the optimizer state is not a SparseDenseOptimizer's (SparseAdam + AdamW): a "
                             "checkpoint written without sparse_item_grad cannot be resumed with it")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(parts[name])

    def __repr__(self) -> str:
        return f"SparseDenseOptimizer(sparse={self.sparse!r}, dense={self.dense!r})"

"""The next-item cross-entropy of every trainer (step 1, SICSRec step 2, content baselines, TSSR),
with a choice of how it is computed (`TrainConfig.loss`, i.e. `train_id.loss`,
`sicsrec.train.loss`, `tssr.train.loss`):

- `full` (default): cross_entropy(h @ E.T) over all N+1 columns, the padding column -inf,
  reduction sum: exactly what the trainers computed before this module (same ops, same numbers).
  Memory: one [targets x (N+1)] fp32 logit matrix, and its gradient, per step.
- `chunked`: the same loss and gradients without that matrix: `loss_chunk` target rows at a time
  (memory O(loss_chunk x N)). Uses torch's `F.linear_cross_entropy(..., options=
  LinearCrossEntropyOptions(batch_chunk_size=loss_chunk))`; the padding column is excluded by
  dropping row 0 of the table and shifting the targets by -1 (padding is never a target). On a
  torch without it, a fallback recomputes each chunk's logits in backward (activation
  checkpointing per chunk), with the same result.
- `sampled`: a sampled softmax. Row t (hidden h_t, positive p_t) is scored against a candidate
  list shared by all rows of the step: the positives of every row of the *global* batch (their
  ids gathered from all ranks with `sicsrec.losses.gather_sizes` / `gather_rows`) followed by
  `num_negatives` shared negatives drawn from `sampler` (uniform over 1..N, or item popularity
  = training frequency, see `item_counts`). The negatives are drawn on rank 0 (torch's global
  RNG, whose state the run checkpoints per rank, so a resumed run draws what an uninterrupted
  one would) and broadcast, so every rank uses the same ones.
  Masking: a candidate holding the row's own positive item, other than the row's own column, is
  an accidental hit (counted in `stats["accidental_hits"]`), and a candidate repeating an item
  that appears earlier in the list is a duplicate (`stats["duplicate_columns"]`); both would get
  -inf, so the list is deduplicated before scoring (`torch.unique`): each item is in the
  denominator once and no [rows x candidates] mask is built. Hence with negatives = all of 1..N
  and no logQ the loss *is* the full softmax.
  The candidates' embeddings are looked up in this rank's item table, not gathered: the table
  is replicated (a function of replicated parameters in every model), so the local rows equal
  the owner's, and the gradient each rank sends into them is averaged by DDP/DeepSpeed exactly
  as an all-gather-with-autograd would route it (tested: 2 gloo ranks == 1 process), without a
  d-wide collective.
  logQ correction (`logq=True`, the default): every candidate's logit (the row's own positive,
  the other rows' positives and the shared negatives alike) gets `- log q(item)`, q being the
  sampler's distribution (uniform: 1/N; popularity: frequency / total). Using the same q for the
  in-batch positives is a choice: they actually arrive at the data's target frequency, which
  `popularity` approximates and `uniform` ignores. Under `uniform` the correction is the same
  constant on every column and changes nothing; it matters with `popularity`.
  Memory: [targets x unique candidates] logits, unique candidates <= min(N, global targets + K).
  With `sparse_item_grad` (`<section>.sparse_item_grad`, sampled only; the same loss and, densified,
  the same gradients) the step's memory has a bound independent of N: the candidates' rows are gathered
  with a sparse `F.embedding`, so the table's gradient from the loss is a sparse [unique
  candidates x d] tensor instead of a dense [N+1, d] one (with the model's sparse input lookup,
  SequentialRecommender.use_sparse_item_grad, and SparseAdam, sicsrec.optim, nothing N x d is
  allocated), and the [targets x unique candidates] logits are computed `loss_chunk` target rows
  at a time as `chunked` does (logQ as the linear bias): the unique candidates themselves grow
  with N (at N = 1e4 many of 6,400 + 1,024 draws collide, ~5,200 unique; at 1e6 ~7,400), and
  their logits, not the table's gradient, set the step's peak memory up to 1e6 items
  (benchmarks/loss_memory.py).

Scaling across ranks: every mode returns this rank's CE *sum* and target count; the trainer
scales the sum by world_size / global count and DDP/DeepSpeed average gradients. For `sampled`
the gather's backward sends each rank's gradient for another rank's positive embeddings to the
owner, so 2 ranks give the gradients of 1 process over the concatenated batch (tested).
Every rank must call `sampled` the same number of times (it runs collectives).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sicsrec.losses import _world, gather_rows, gather_sizes

LOSSES = ("full", "chunked", "sampled")
SAMPLERS = ("uniform", "popularity")


@dataclass(frozen=True)
class NextItemParams:
    loss: str = "full"  # full | chunked | sampled
    loss_chunk: int = 1024  # chunked: target rows per chunk
    num_negatives: int = 1024  # sampled: K shared negatives per step
    sampler: str = "uniform"  # sampled: uniform | popularity
    logq: bool = True  # sampled: subtract log q(item) from every candidate's logit
    sparse_item_grad: bool = False  # sampled: the candidates' rows with a sparse gradient (F.embedding sparse)

    @classmethod
    def from_config(cls, cfg, where: str = "train_id") -> "NextItemParams":
        """From a TrainConfig (section `where`: train_id, sicsrec.train, tssr.train), validated."""
        params = cls(loss=cfg.loss, loss_chunk=cfg.loss_chunk, num_negatives=cfg.num_negatives, sampler=cfg.sampler,
                     sparse_item_grad=getattr(cfg, "sparse_item_grad", False))
        params.validate(where)
        return params

    def validate(self, where: str = "train_id") -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"{where}.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{where}.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for key in ("loss_chunk", "num_negatives"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.sparse_item_grad, bool):
            raise ValueError(f"{where}.sparse_item_grad must be true or false, got {self.sparse_item_grad!r}")
        if self.sparse_item_grad and self.loss != "sampled":
            raise ValueError(f"{where}.sparse_item_grad=true needs {where}.loss=sampled, got loss={self.loss}: with "
                             f"full or chunked every item row gets a gradient each step, so a sparse gradient "
                             f"would save nothing")


FULL = NextItemParams()


class NextItemOutput(NamedTuple):
    loss_sum: Tensor  # fp32 CE summed over this rank's (non-padding) targets
    count: Tensor  # number of those targets (long)
    stats: dict  # sampled (this rank): accidental_hits, duplicate_columns, candidates, unique_candidates; else {}


# ---------------------------------------------------------------- popularity

def item_counts(dataset) -> Tensor:
    """[N+1] float64 training frequency of every item (padding 0 gets 0), from the users'
    training sequences of a PreparedDataset (validation and test items are not counted)."""
    items = torch.from_numpy(np.asarray(dataset.sequence_store().items, dtype=np.int64))
    return torch.bincount(items, minlength=dataset.num_items + 1).double()


def popularity_probs(counts: Tensor) -> Tensor:
    """[N+1] counts -> [N+1] sampling distribution over 1..N (entry 0 = 0). Items never seen in
    training count as seen once, so every item can be drawn and log q stays finite."""
    probs = counts.double().clamp(min=1.0)
    probs[0] = 0.0
    return probs / probs.sum()


# ---------------------------------------------------------------- negatives

def draw_negatives(k: int, num_items: int, item_probs: Tensor | None, device: torch.device,
                   generator: torch.Generator | None = None) -> Tensor:
    """K item ids in 1..N (with replacement): uniform when item_probs is None, else ~ item_probs
    ([N+1], entry 0 ignored). Drawn on rank 0 (on `device`, with `generator` or torch's global
    RNG) and broadcast: the same on every rank."""
    world, rank = _world()
    if rank == 0:
        if item_probs is None:
            ids = torch.randint(1, num_items + 1, (k,), device=device, generator=generator)
        else:
            ids = torch.multinomial(item_probs[1:].to(device), k, replacement=True, generator=generator) + 1
    else:
        ids = torch.empty(k, dtype=torch.long, device=device)
    if world > 1:
        dist.broadcast(ids, src=0)
    return ids


# ---------------------------------------------------------------- the three losses

def _full(hidden: Tensor, table: Tensor, targets: Tensor, offsets: Tensor | None = None) -> Tensor:
    scores = hidden.float() @ table.float().T
    if offsets is not None:
        scores = scores + offsets.float()
    scores[..., 0] = float("-inf")
    return F.cross_entropy(scores, targets, reduction="sum")


def _chunk_ce(hidden: Tensor, table: Tensor, targets: Tensor, bias: Tensor | None = None) -> Tensor:
    logits = hidden @ table.T
    return F.cross_entropy(logits if bias is None else logits + bias, targets, reduction="sum")


def _linear_ce(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, bias: Tensor | None = None) -> Tensor:
    """CE sum of (hidden @ weight.T + bias) against targets, `chunk` rows at a time: never the
    whole [rows x columns] logit matrix (torch's linear_cross_entropy, else the checkpointed loop)."""
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        return F.linear_cross_entropy(hidden, weight, targets, linear_bias=bias, reduction="sum", options=options)
    return _chunked_checkpointed(hidden, weight, targets, chunk, bias)


def _chunked(hidden: Tensor, table: Tensor, targets: Tensor, chunk: int) -> Tensor:
    items, shifted = table.float()[1:], targets - 1  # drop the padding column: never a target
    hidden = hidden.float()
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        return F.linear_cross_entropy(hidden, items, shifted, reduction="sum", options=options)
    return _chunked_checkpointed(hidden, items, shifted, chunk)


def _chunked_checkpointed(hidden: Tensor, items: Tensor, shifted: Tensor, chunk: int,
                          bias: Tensor | None = None) -> Tensor:
    """Fallback (a torch without linear_cross_entropy): per chunk, logits recomputed in backward."""
    total = hidden.new_zeros(())
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        if torch.is_grad_enabled() and (hidden.requires_grad or items.requires_grad):
            total = total + checkpoint(_chunk_ce, hidden[rows], items, shifted[rows], bias, use_reentrant=False)
        else:
            total = total + _chunk_ce(hidden[rows], items, shifted[rows], bias)
    return total


def _sampled(hidden: Tensor, table: Tensor, targets: Tensor, params: NextItemParams, item_probs: Tensor | None,
             negatives: Tensor | None) -> tuple[Tensor, dict]:
    device, n = hidden.device, hidden.shape[0]
    num_items = table.shape[0] - 1
    if params.sampler == "popularity":
        if item_probs is None:
            raise ValueError("sampler=popularity needs item_probs (see next_item.item_counts / popularity_probs)")
        probs = item_probs
    else:
        probs = None
    if negatives is None:
        negatives = draw_negatives(params.num_negatives, num_items, probs, device)
    negatives = negatives.to(device=device, dtype=torch.long)
    _, rank = _world()
    sizes = gather_sizes(n, device)
    offset = sum(sizes[:rank])
    # Candidate list: every rank's positives (rank order), then the shared negatives. Each item
    # is scored once: the repeats and the accidental hits (the row's own positive item elsewhere
    # in the list) are exactly the columns a -inf mask would remove, so they are never built.
    ids = torch.cat([gather_rows(targets, sizes, with_grad=False), negatives])
    unique, inverse = torch.unique(ids, return_inverse=True)
    own = inverse[offset:offset + n]  # the row's positive among the unique candidates
    if params.sparse_item_grad:
        # the candidates' rows with a sparse [unique x d] gradient (not a dense [N+1, d] one), and
        # their logits loss_chunk rows at a time: [loss_chunk x unique], unique <= global targets + K
        rows = F.embedding(unique, table, sparse=True).float()
        bias = None
        if params.logq:
            bias = (torch.full((unique.shape[0],), math.log(num_items), device=device) if probs is None
                    else -torch.log(probs[unique].float()))
        loss = _linear_ce(hidden.float(), rows, own, params.loss_chunk, bias)
    else:
        logits = hidden.float() @ table[unique].float().T
        if params.logq:  # in place: the matmul keeps no output for its backward
            if probs is None:  # uniform: the same constant on every candidate
                logits = logits.sub_(-math.log(num_items))
            else:
                logits = logits.sub_(torch.log(probs[unique].float()).unsqueeze(0))
        loss = F.cross_entropy(logits, own, reduction="sum")
    occurrences = torch.bincount(inverse, minlength=unique.shape[0])
    stats = {"accidental_hits": (occurrences[own] - 1).sum(),  # (row, column) pairs holding the row's positive
             "duplicate_columns": ids.shape[0] - unique.shape[0],  # columns repeating an earlier item
             "candidates": int(ids.shape[0]), "unique_candidates": int(unique.shape[0])}
    return loss, stats


def next_item_loss(hidden: Tensor, item_table: Tensor, targets: Tensor, params: NextItemParams | None = None,
                   item_probs: Tensor | None = None, *, negatives: Tensor | None = None,
                   offsets: Tensor | None = None) -> NextItemOutput:
    """Next-item CE of hidden states against the output item table.

    hidden [..., d]; item_table [N+1, d] (row 0 = padding, what the model's `logits` scores
    against); targets [...] item ids, 0 = padding (those positions are dropped). `params`: a
    NextItemParams (None = full). `item_probs` [N+1]: the popularity sampling distribution
    (sampler=popularity). `negatives` [K]: explicit shared negatives for `sampled` (tests);
    otherwise drawn. `offsets` [..., N+1]: added to the scores (a model's history bias,
    `sicsrec.models.sasrec.history_offsets`; full only). Scores and loss are fp32 whatever the
    autocast context (as `logits`). Returns (CE sum over this rank's targets, their count, stats)."""
    params = params or FULL
    if offsets is not None and params.loss != "full":
        raise ValueError(f"a history bias needs loss=full, got loss={params.loss}")
    real = targets != 0
    hidden, targets = hidden[real], targets[real]
    offsets = None if offsets is None else offsets[real]
    count = real.sum()
    stats: dict = {}
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits: bf16 would tie many items
        if params.loss == "full":
            loss = _full(hidden, item_table, targets, offsets)
        elif params.loss == "chunked":
            loss = _chunked(hidden, item_table, targets, params.loss_chunk)
        elif params.loss == "sampled":
            loss, stats = _sampled(hidden, item_table, targets, params, item_probs, negatives)
        else:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {params.loss!r}")
    return NextItemOutput(loss, count, stats)


class NextItemCriterion:
    """What a trainer's loss module holds: the validated params, the popularity distribution (when
    sampler=popularity), and the last call's stats. Not an nn.Module: nothing of it is saved in
    checkpoints or state dicts."""

    def __init__(self, params: NextItemParams | None = None, item_probs: Tensor | None = None,
                 where: str = "train_id"):
        self.params = params or FULL
        self.where = where  # the config section (named in errors, e.g. by sicsrec.optim)
        if self.params.loss == "sampled" and self.params.sampler == "popularity" and item_probs is None:
            raise ValueError("sampler=popularity needs the item popularity (item_probs)")
        self.item_probs = item_probs
        self._probs_on: dict = {}
        self.last_stats: dict = {}

    @classmethod
    def from_config(cls, cfg, dataset=None, where: str = "train_id") -> "NextItemCriterion":
        """From a TrainConfig; `dataset` (a PreparedDataset) gives the popularity when needed."""
        params = NextItemParams.from_config(cfg, where)
        probs = None
        if params.loss == "sampled" and params.sampler == "popularity":
            if dataset is None:
                raise ValueError(f"{where}.sampler=popularity needs the training data's item counts")
            probs = popularity_probs(item_counts(dataset))
        return cls(params, probs, where)

    def _probs(self, device: torch.device) -> Tensor | None:
        if self.item_probs is None:
            return None
        if device not in self._probs_on:
            self._probs_on[device] = self.item_probs.to(device)
        return self._probs_on[device]

    def __call__(self, hidden: Tensor, item_table: Tensor, targets: Tensor,
                 offsets: Tensor | None = None) -> NextItemOutput:
        out = next_item_loss(hidden, item_table, targets, self.params, self._probs(hidden.device), offsets=offsets)
        self.last_stats = out.stats
        return out


_FULL_CRITERION = NextItemCriterion()


def criterion_of(loss_module) -> NextItemCriterion:
    """The loss module's `criterion` (the Trainer sets it from `<section>.loss`), else full CE."""
    return getattr(loss_module, "criterion", None) or _FULL_CRITERION

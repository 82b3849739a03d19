"""Leave-one-out full-ranking evaluation: Hit@K and NDCG@K over all items, sharded over ranks.

Conventions (RecBole 1.2.1 full sort, checked in its source):
- Every item 1..N is a candidate; padding item 0 never is (its score is set to -inf).
- History items: RecBole's `FullSortEvalDataLoader` builds `history_index` only for general
  (non-sequential) models; for sequential models it passes `None`, so SASRec & co. are ranked
  WITHOUT masking the user's history (`trainer._full_sort_batch_eval`). That is our default
  (`mask_history=False`), and it is also what the official SICSRec code did. `mask_history=True`
  gives RecBole's general-model behaviour: the user's earlier items score -inf, except the target
  itself (RecBole masks used items minus positives).
- Rank (0-based) = number of candidates scoring strictly higher than the target, plus, with
  `ties="pessimistic"` (default), the other candidates scoring exactly as high. Pessimistic ties
  keep a degenerate model (constant scores) at the bottom instead of the top; RecBole leaves ties
  to `torch.topk`'s order. `ties="optimistic"` counts strictly higher items only.
- Hit@K = [rank < K]; NDCG@K = 1 / log2(rank + 2) if rank < K (one relevant item, so IDCG = 1).
  K larger than the number of items is allowed (every target is then a hit).

Sharding: the users are split over ranks without padding or duplicates (rank r takes users
r, r+W, ...); each rank sums its metrics and the [sums..., count] vector is all-reduced, so the
result equals a single-process evaluation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from shards.prepared import PreparedDataset
from sicsrec.data import pad_left

KS = (5, 10, 20)
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, histories: Sequence[Sequence[int]] | None = None,
                 ties: str = "pessimistic") -> torch.Tensor:
    """0-based rank of each target among items 1..N.

    scores: [B, N+1] (column 0 is padding and never ranks); targets: [B] ids in 1..N;
    histories: per row, items to mask (-inf) unless equal to the target; None masks nothing.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    if scores.dim() != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores must be [batch, num_items+1], got {tuple(scores.shape)} for {targets.shape[0]} targets")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if (targets < 1).any() or (targets >= scores.shape[1]).any():
        raise ValueError(f"targets must be item ids in 1..{scores.shape[1] - 1}")
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    target_scores = scores.gather(1, targets[:, None])
    if histories is not None:
        rows = [r for r, h in enumerate(histories) for _ in h]
        cols = [i for h in histories for i in h]
        if cols:
            scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = float("-inf")
        scores.scatter_(1, targets[:, None], target_scores)  # the target is never masked, even if seen before
    higher = (scores > target_scores).sum(1)
    if ties == "optimistic":
        return higher
    same = (scores == target_scores).sum(1) - 1  # minus the target itself
    return higher + same


def metric_sums(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Sums (not means) of Hit@K and NDCG@K over the given ranks."""
    ranks = ranks.double()
    gains = 1.0 / torch.log2(ranks + 2.0)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hit@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((gains * hit).sum())
    return out


@torch.no_grad()
def evaluate(score_fn: ScoreFn, dataset: PreparedDataset, split: str, max_len: int, batch_size: int = 512,
             ks: Sequence[int] = KS, mask_history: bool = False, ties: str = "pessimistic",
             device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
             progress: bool = False) -> dict[str, float]:
    """Mean Hit@K / NDCG@K on `split` (valid or test) over all users.

    score_fn maps [B, max_len] left-padded histories (on `device`) to [B, N+1] scores. Under
    torch.distributed every rank must call this; rank/world_size default to the process group's.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"evaluation split must be valid or test, got {split!r}")
    if dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    users = dataset.users[rank::world_size]
    names = [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    for start in tqdm(range(0, len(users), batch_size), desc=f"eval {split}", disable=not progress, leave=False):
        chunk = users[start:start + batch_size]
        histories = [u.history(split) for u in chunk]
        targets = torch.tensor([u.target(split) for u in chunk], device=device)
        scores = score_fn(pad_left(histories, max_len).to(device))
        if scores.shape != (len(chunk), dataset.num_items + 1):
            raise ValueError(f"score_fn returned {tuple(scores.shape)}, expected ({len(chunk)}, {dataset.num_items + 1})")
        ranks = target_ranks(scores, targets, histories if mask_history else None, ties)
        sums = metric_sums(ranks, ks)
        totals[:-1] += torch.tensor([sums[n] for n in names], dtype=torch.float64)
        totals[-1] += len(chunk)
    if dist.is_initialized() and world_size > 1:
        backend_device = device if dist.get_backend() == "nccl" else "cpu"
        totals = totals.to(backend_device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    count = totals[-1].item()
    if count == 0:
        raise ValueError("no users to evaluate")
    result = {n: totals[i].item() / count for i, n in enumerate(names)}
    result["users"] = int(count)
    return result

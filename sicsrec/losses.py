"""InfoNCE with in-batch negatives pooled across all ranks, and the losses built on it.

`info_nce` is the one primitive: each rank scores its local rows against the columns of every
rank (gathered with autograd), row i's positive is its own pair's column (global index
`offset(rank) + i`; local batches may differ in size across ranks), and columns holding the
same item as the row (duplicates elsewhere in the global batch) are masked with -inf.

Gradient scaling. The rank's loss is `sum(local row losses) * world_size / global_rows`, which
is the mean over the local rows whenever every rank has the same number of valid rows. The
all-gather's backward sums every rank's gradient into the owner's rows, so when DDP / ZeRO
average the parameter gradients over ranks, the result equals the gradient of the mean loss
over the whole global batch computed in one process (never world_size times bigger). To log
the global mean loss, all-reduce-average `loss.detach()`.

Every rank must call these functions the same number of times with the same arguments present
(they run collectives), even when it has no valid rows.

Built on it: `sft_loss` (SICSRec eq. 2-4), `concl_loss` (SICSRec eq. 18), and TSSR's
`user_contrastive_loss` (L_u, eq. 1) and `item_contrastive_loss` (L_i, eq. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor

from sicsrec.models.sasrec import masked_mean


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size."""
    world, _ = _world()
    if world == 1:
        return [n]
    local = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def gather_rows(x: Tensor, sizes: list[int], with_grad: bool) -> Tensor:
    """Concatenate every rank's `x` along dim 0 (rank order). With `with_grad`, gradients flow
    back to the owning rank (summed over ranks). Ranks may hold different numbers of rows."""
    if len(sizes) == 1:
        return x
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    x = x.contiguous()
    if with_grad:
        parts = dist_nn.all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


@dataclass
class ContrastiveOutput:
    loss: Tensor  # scaled as described in the module docstring (local mean for equal batches)
    directions: tuple[Tensor, ...]  # the a->b (and b->a) losses, same scaling; loss is their mean
    masked_pairs: Tensor  # false-negative (row, column) pairs masked on this rank, summed over directions
    rows: int  # valid rows in the global batch


def _one_direction(rows: Tensor, cols: Tensor, row_ids: Tensor | None, pos_ids: Tensor | None,
                   col_ids: Tensor | None, row_valid: Tensor, col_valid: Tensor, offset: int,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """Sum of the valid local rows' InfoNCE losses, and the number of masked duplicate pairs."""
    n = rows.shape[0]
    logits = (rows @ cols.T).float() / temperature
    local = torch.arange(n, device=rows.device)
    positives = local + offset
    blocked = (~col_valid).unsqueeze(0).repeat(n, 1)
    masked = torch.zeros((), dtype=torch.long, device=rows.device)
    if col_ids is not None:
        same = (col_ids.unsqueeze(0) == pos_ids.unsqueeze(1)) | (col_ids.unsqueeze(0) == row_ids.unsqueeze(1))
        same[local, positives] = False
        same &= col_valid.unsqueeze(0) & row_valid.unsqueeze(1)
        masked = same.sum()
        blocked = blocked | same
    blocked[local, positives] = False
    logits = logits.masked_fill(blocked, float("-inf"))
    loss_sum = F.cross_entropy(logits[row_valid], positives[row_valid], reduction="sum")
    return loss_sum, masked


def info_nce(query: Tensor, key: Tensor, temperature: float, *, query_ids: Tensor | None = None,
             key_ids: Tensor | None = None, valid: Tensor | None = None, normalize: bool = False,
             symmetric: bool = False, mask_duplicates: bool = True,
             local_negatives: bool = False) -> ContrastiveOutput:
    """InfoNCE over paired rows (query[i], key[i]) with negatives from every rank's keys.

    query, key: (n, d) local rows, n may differ across ranks. Row i's logits are
    `sim(query[i], key_j) / temperature` for every key j of the global batch; sim is the inner
    product, or cosine when `normalize`. `valid` (n,) bool drops pairs (e.g. items without an
    image) both as rows and as columns. `query_ids` / `key_ids` (n,) are the items shown on each
    side; if only one is given the other is taken equal (both sides show the same item). With
    `mask_duplicates`, a column whose item equals the row's positive item or the row's own
    item is not a negative (-inf), except the positive itself. `symmetric` adds the key->query
    direction and averages the two. `local_negatives` skips every collective: negatives come
    from this rank's rows only (plain DDP's behaviour; for benchmarks) and the loss is the
    local mean.
    """
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"query and key must both be (n, d) with the same shape, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, device = query.shape[0], query.device
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device, torch.bool)
    if not mask_duplicates:
        query_ids = key_ids = None
    elif query_ids is None:
        query_ids = key_ids
    elif key_ids is None:
        key_ids = query_ids
    for name, ids in (("valid", valid), ("query_ids", query_ids), ("key_ids", key_ids)):
        if ids is not None and ids.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(ids.shape)}")
    if not bool(valid.all()):  # dropped rows are neither queries nor negatives: leave them out of the n x N logits
        query, key = query[valid], key[valid]
        query_ids, key_ids = (None if ids is None else ids[valid.to(ids.device)] for ids in (query_ids, key_ids))
        n, valid = int(valid.sum()), valid[valid]
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)

    _, rank = (1, 0) if local_negatives else _world()
    sizes = [n] if local_negatives else gather_sizes(n, device)
    offset = sum(sizes[:rank])
    all_valid = gather_rows(valid.to(torch.uint8), sizes, with_grad=False).bool()
    global_rows = int(all_valid.sum())
    all_key = gather_rows(key, sizes, with_grad=True)
    if query_ids is not None:
        query_ids, key_ids = query_ids.to(device), key_ids.to(device)
        all_query_ids = gather_rows(query_ids, sizes, with_grad=False)
        all_key_ids = gather_rows(key_ids, sizes, with_grad=False)
    else:
        all_query_ids = all_key_ids = None

    sums, masked = [], []
    s, m = _one_direction(query, all_key, query_ids, key_ids, all_key_ids, valid, all_valid, offset, temperature)
    sums.append(s)
    masked.append(m)
    if symmetric:
        all_query = gather_rows(query, sizes, with_grad=True)
        s, m = _one_direction(key, all_query, key_ids, query_ids, all_query_ids, valid, all_valid, offset,
                              temperature)
        sums.append(s)
        masked.append(m)

    world = len(sizes)
    if global_rows == 0:  # nothing to contrast anywhere: a zero that keeps the graph connected
        directions = tuple((query.sum() + key.sum()) * 0.0 for _ in sums)
    else:
        directions = tuple(s * (world / global_rows) for s in sums)
    loss = directions[0] if len(directions) == 1 else (directions[0] + directions[1]) / 2
    return ContrastiveOutput(loss, directions, sum(masked), global_rows)


@dataclass
class SFTLoss:
    total: Tensor  # L_t2t + L_i2i + L_t2i (eq. 4); just L_t2t without images
    t2t: Tensor
    i2i: Tensor | None
    t2i: Tensor | None
    masked_pairs: Tensor  # duplicate pairs masked on this rank, all terms together


def sft_loss(text_a: Tensor, text_b: Tensor, ids_a: Tensor, ids_b: Tensor, temperature: float, *,
             image_a: Tensor | None = None, image_b: Tensor | None = None,
             has_image_a: Tensor | None = None, has_image_b: Tensor | None = None,
             normalize: bool = True, symmetric: bool = False, mask_duplicates: bool = True) -> SFTLoss:
    """SICSRec's encoder SFT loss (§3.3.2, eq. 2-4) over a batch of LLM-selected pairs (a_i, b_i).

    - t2t (eq. 2): text of a_i vs text of b_i; negatives are the b-side texts of the other pairs.
    - i2i: the same with images, over pairs where both items have an image.
    - t2i (eq. 3): text vs image of the same item, over every item of the batch that has an image
      (both sides of each pair, 2n rows); negatives are the other items' images.
    Duplicated items are masked (see `info_nce`). The paper's sim is the inner product; the
    default here is cosine (`normalize=True`), which keeps logits bounded at tau = 0.05.
    Images: pass all four of image_a/b (placeholders for missing ones) and has_image_a/b,
    or none of them (text-only datasets).
    """
    kw = dict(normalize=normalize, symmetric=symmetric, mask_duplicates=mask_duplicates)
    t2t = info_nce(text_a, text_b, temperature, query_ids=ids_a, key_ids=ids_b, **kw)
    if image_a is None and image_b is None:
        return SFTLoss(t2t.loss, t2t.loss, None, None, t2t.masked_pairs)
    if image_a is None or image_b is None:
        raise ValueError("sft_loss: pass both image_a and image_b, or neither")
    n = text_a.shape[0]
    has_a = torch.ones(n, dtype=torch.bool) if has_image_a is None else has_image_a.bool()
    has_b = torch.ones(n, dtype=torch.bool) if has_image_b is None else has_image_b.bool()
    has_a, has_b = has_a.to(text_a.device), has_b.to(text_a.device)
    i2i = info_nce(image_a, image_b, temperature, query_ids=ids_a, key_ids=ids_b, valid=has_a & has_b, **kw)
    t2i = info_nce(torch.cat([text_a, text_b]), torch.cat([image_a, image_b]), temperature,
                   key_ids=torch.cat([ids_a, ids_b]), valid=torch.cat([has_a, has_b]), **kw)
    total = t2t.loss + i2i.loss + t2i.loss
    return SFTLoss(total, t2t.loss, i2i.loss, t2i.loss, t2t.masked_pairs + i2i.masked_pairs + t2i.masked_pairs)


def concl_loss(user: Tensor, content: Tensor, target_ids: Tensor, temperature: float,
               normalize: bool = False, local_negatives: bool = False) -> ContrastiveOutput:
    """SICSRec's content-aware contrastive loss (eq. 18): the aggregated sequence representation
    h_i^a vs the content embedding e_i^c of the sequence's target item; negatives are the other
    sequences' target contents, across ranks (this rank's only with `local_negatives`), with
    repeated target items masked."""
    return info_nce(user, content, temperature, key_ids=target_ids, normalize=normalize,
                    local_negatives=local_negatives)


def user_contrastive_loss(seq_id: Tensor, seq_con: Tensor, mask: Tensor, temperature: float,
                          user_ids: Tensor | None = None) -> Tensor:
    """TSSR's L_u (eq. 1): cosine InfoNCE between the time-averaged ID-stream and content-stream
    encoder outputs of each sequence, both directions summed as in the paper. seq_*: (B, T, d)
    unimodal encoder outputs, mask: (B, T) true at real items. `user_ids` masks the same user
    appearing twice in the global batch (e.g. several prefixes of one sequence)."""
    mask = mask.bool()
    out = info_nce(masked_mean(seq_id, mask), masked_mean(seq_con, mask), temperature, key_ids=user_ids,
                   valid=mask.any(1), normalize=True, symmetric=True)
    return out.directions[0] + out.directions[1]


def item_contrastive_loss(out_id: Tensor, out_con: Tensor, emb_id: Tensor, emb_con: Tensor, items: Tensor,
                          temperature: float, mask: Tensor | None = None) -> Tensor:
    """TSSR's L_i (eq. 2): next-step cross-modality prediction with inner-product similarity.

    out_*: (B, T, d) unimodal encoder outputs F; emb_*: (B, T, d) the input embeddings E of the
    same positions; items: (B, T) item ids (0 = padding). The output of one stream at step l is
    contrasted with the other stream's embedding of the item at step l+1; the negatives are all
    next-step embeddings of the global batch (the same item elsewhere is masked). Averaged over
    the valid (l, l+1) positions rather than the paper's sum over l then mean over users (a
    per-batch constant factor that λ2 absorbs); the two terms are summed as in the paper.
    """
    mask = (items > 0) if mask is None else mask.bool()
    valid = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
    next_items = items[:, 1:].reshape(-1)

    def flat(x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    id_to_con = info_nce(flat(out_id[:, :-1]), flat(emb_con[:, 1:]), temperature, key_ids=next_items, valid=valid)
    con_to_id = info_nce(flat(out_con[:, :-1]), flat(emb_id[:, 1:]), temperature, key_ids=next_items, valid=valid)
    return id_to_con.loss + con_to_id.loss

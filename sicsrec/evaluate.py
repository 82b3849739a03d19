"""Leave-one-out full-ranking evaluation: Hit@K and NDCG@K over all items, sharded over ranks.

Conventions (RecBole 1.2.1 full sort, checked in its source):
- Every item 1..N is a candidate; padding item 0 never is.
- History items: RecBole's `FullSortEvalDataLoader` builds `history_index` only for general
  (non-sequential) models; for sequential models it passes `None`, so SASRec & co. are ranked
  WITHOUT masking the user's history (`trainer._full_sort_batch_eval`). That is our default
  (`mask_history=False`), and it is also what the official SICSRec code did. `mask_history=True`
  gives RecBole's general-model behaviour: the user's earlier items are no candidates, except the
  target itself (RecBole masks used items minus positives).
- Rank (0-based) = number of candidates scoring strictly higher than the target, plus, with
  `ties="pessimistic"` (default), the other candidates scoring exactly as high. Pessimistic ties
  keep a degenerate model (constant scores) at the bottom instead of the top; RecBole leaves ties
  to `torch.topk`'s order. `ties="optimistic"` counts strictly higher items only.
- Hit@K = [rank < K]; NDCG@K = 1 / log2(rank + 2) if rank < K (one relevant item, so IDCG = 1).
  K larger than the number of items is allowed (every target is then a hit).

Chunked ranking (one implementation for every path): items are visited in chunks of `item_chunk`
ids and `RankCounter` adds, per user, the candidates of each [batch, chunk] score block that beat
the target's score, so no [users, N] matrix exists beyond one block. A `score_fn` returning the full
[B, N+1] matrix is the same code with the matrix sliced into blocks (one block by default); with an
`item_table` the function gives [B, d] user representations and each block is
`hidden @ table[chunk].T` in fp32 (the models' `logits`). The target's score comes from the same
fp32 matmul on the target's row; the target's own column never counts. Caveat: BLAS may round a
dot product differently for other matrix shapes (seen on CPU for 1-row or 1-column products, in
the last bit), so a rival within one ulp of the target's score can rank either side of it,
against the full matrix as between chunk sizes; with exact scores (tests) every path agrees.

Sharding, either of:
- users (default): rank r takes users r, r+W, ... (no padding, no duplicates); each rank sums its
  metrics and the [sums..., count] vector is all-reduced. Ranks make the same number of forward
  calls (`equal_batches`, on by default when W > 1: a rank with fewer batches runs one-row dummy
  forwards whose output is discarded), since a ZeRO-3 forward is a collective.
- items (`item_shard=True`): rank r ranks every user against item ids `item_range(N, r, W)` only,
  its slice of the table; per batch the targets' scores (from the rank owning each target) and
  then the per-user counts are all-reduced, so every rank gets the single-process ranks.
Either way the result equals a single-process evaluation.

Extras: `top_k` > 0 keeps a running top-K per user merged over chunks (and item shards) and writes
it to `top_k_path` as JSONL; `user_sample` > 0 evaluates a fixed seeded sample of users (still
against every item), stated in the result: "users" (the sample's size), "user_sample_of" (all
users), "user_sample_seed".

Diagnostics (`diagnostics=True`, flat keys, means over the evaluated users unless said): "hit@1";
"mrr" (1 / (rank + 1), the rank as above, so pessimistic ties by default); "median_rank" (1-based,
the mean of the two middle ranks for an even count; under user sharding every rank's per-user ranks
are all-gathered); "top1_in_history" (the user's top-1 item is one of its history items: the whole
history of the split, not only the last max_len the model sees), "top1_is_last" (it is the last
history item), "target_is_repeat" (the target is a history item). The top-1 is the best candidate
(with `mask_history`, history items other than the target are none), kept over chunks (and merged
over item shards) like the top-K; ties go to the lowest item id, so it does not depend on chunking
or sharding (the top-K file leaves ties to torch.topk's order).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from shards.prepared import PreparedDataset, UserSequence
from shards.windows import pad_left, trim_left_padding

KS = (5, 10, 20)
DIAGNOSTICS = ("hit@1", "mrr", "top1_in_history", "top1_is_last", "target_is_repeat")  # sums; median_rank apart
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
# an item table: a [rows, d] tensor, or a function mapping item ids (a 1-d LongTensor) to their rows
ItemTable = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def item_range(num_items: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """Item ids [start, end) of `rank` under item sharding: 1..N in contiguous near-equal slices."""
    per, extra = divmod(num_items, world_size)
    start = 1 + rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def item_chunks(start: int, end: int, chunk: int = 0) -> list[tuple[int, int]]:
    """[start, end) split into id ranges of `chunk` items (0: one range)."""
    step = chunk if chunk > 0 else max(end - start, 1)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


def score_block(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, d] x [C, d] -> [B, C] fp32 scores (as the models' `logits`: bf16 would tie many items)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ rows.to(hidden.device).float().T


class RankCounter:
    """Running 0-based target ranks of a batch over item chunks (`add` each [B, C] block once),
    and optionally the running top-K items per row and the top-1 item (`top1`: the best score,
    ties to the lowest id, order-independent).

    target_scores: [B]; targets: [B] item ids; histories: per row, the user's history items, or
    None. Their scores get `history_offset`: -inf (default) masks them (no candidates, except the
    target); a finite offset is a history bias added to every history item's score, the target's
    too when it is a repeat (a model's learned `history_bias`). The target's own column never counts.
    """

    def __init__(self, target_scores: torch.Tensor, targets: torch.Tensor,
                 histories: Sequence[Sequence[int]] | None = None, ties: str = "pessimistic", top_k: int = 0,
                 top1: bool = False, history_offset: float = float("-inf")):
        if ties not in ("pessimistic", "optimistic"):
            raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
        if torch.isnan(target_scores).any():
            raise ValueError("scores contain NaN")
        device = target_scores.device
        self.targets, self.ties, self.top_k, self.top1 = targets.to(device), ties, top_k, top1
        self.offset = float(history_offset)
        rows, cols, repeats = [], [], []
        for row, (history, target) in enumerate(zip(histories or [], targets.tolist())):
            seen = sorted(set(history) - {target})  # each history item once; the target apart
            rows += [row] * len(seen)
            cols += seen
            if target in history:
                repeats.append(row)
        self.masked_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.masked_cols = torch.tensor(cols, dtype=torch.long, device=device)
        # a finite offset moves a repeated target's score as well (masking leaves it a candidate)
        self.repeat_rows = torch.tensor(repeats if math.isfinite(self.offset) else [], dtype=torch.long, device=device)
        self.repeat_targets = self.targets[self.repeat_rows]
        target_scores = target_scores.float().clone()
        target_scores[self.repeat_rows] += self.offset
        self.target_scores = target_scores[:, None]
        self.counts = torch.zeros(len(targets), dtype=torch.long, device=device)
        # top-K starts as K placeholders (score -inf, item 0) that any real candidate replaces
        self.top_scores = torch.full((len(targets), top_k), float("-inf"), device=device)
        self.top_items = torch.zeros(len(targets), top_k, dtype=torch.long, device=device)
        self.top1_scores = torch.full((len(targets),), float("-inf"), device=device)  # placeholder item 0
        self.top1_items = torch.zeros(len(targets), dtype=torch.long, device=device)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Count the items start .. start+C-1, whose scores are `block` [B, C]."""
        if torch.isnan(block).any():
            raise ValueError("scores contain NaN")
        end = start + block.shape[1]
        beats = self._beats(block, self.target_scores)
        self.counts += beats.sum(1, dtype=torch.int32)  # int32: the sum's [B, C] temporary (CPU) is half of int64's
        own = ((self.targets >= start) & (self.targets < end)).nonzero()[:, 0]
        self.counts[own] -= beats[own, self.targets[own] - start].long()  # the target is not its own rival
        inside = (self.masked_cols >= start) & (self.masked_cols < end)
        rows, cols = self.masked_rows[inside], self.masked_cols[inside] - start
        # history items count with their offset score: never when masked (-inf)
        shifted = block[rows, cols].float() + self.offset
        rival = self._beats(shifted, self.target_scores[rows, 0])
        self.counts.index_add_(0, rows, rival.long() - beats[rows, cols].long())
        if self.top_k or self.top1:
            in_block = (self.repeat_targets >= start) & (self.repeat_targets < end)
            repeats, repeat_cols = self.repeat_rows[in_block], self.repeat_targets[in_block] - start
            if len(rows) or len(repeats):
                block = block.float().index_put((rows, cols), shifted)
                block = block.index_put((repeats, repeat_cols), block[repeats, repeat_cols] + self.offset)
            if self.top_k:
                scores, items = block.float().topk(min(self.top_k, block.shape[1]), dim=1)
                self.merge_top_k(scores, items + start)
            if self.top1:
                scores, items = block.float().max(1)  # the first (lowest id) of equal maxima
                self.merge_top1(scores, items + start)

    def _beats(self, scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
        """Where `scores` rank at or above (pessimistic) / above (optimistic) the target's."""
        return scores >= target_scores if self.ties == "pessimistic" else scores > target_scores

    def merge_top_k(self, scores: torch.Tensor, items: torch.Tensor) -> None:
        """Merge candidate (scores, items) [B, *] into the running top-K."""
        scores, items = torch.cat([self.top_scores, scores], 1), torch.cat([self.top_items, items], 1)
        self.top_scores, pick = scores.topk(self.top_k, dim=1)
        self.top_items = items.gather(1, pick)

    def merge_top1(self, scores: torch.Tensor, items: torch.Tensor) -> None:
        """Merge candidate top-1s (scores, items) [B]: a higher score wins, an equal one the lower id."""
        better = (scores > self.top1_scores) | ((scores == self.top1_scores) & (items < self.top1_items))
        self.top1_scores = torch.where(better, scores, self.top1_scores)
        self.top1_items = torch.where(better, items, self.top1_items)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, histories: Sequence[Sequence[int]] | None = None,
                 ties: str = "pessimistic", item_chunk: int = 0, history_offset: float = float("-inf")) -> torch.Tensor:
    """0-based rank of each target among items 1..N.

    scores: [B, N+1] (column 0 is padding and never ranks); targets: [B] ids in 1..N;
    histories: per row, items that are no candidates unless equal to the target; None masks
    nothing; a finite `history_offset` adds that to their scores instead (RankCounter).
    item_chunk > 0 counts the columns in blocks of that many items (same result).
    """
    if scores.dim() != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores must be [batch, num_items+1], got {tuple(scores.shape)} for {targets.shape[0]} targets")
    if (targets < 1).any() or (targets >= scores.shape[1]).any():
        raise ValueError(f"targets must be item ids in 1..{scores.shape[1] - 1}")
    counter = RankCounter(scores.gather(1, targets[:, None])[:, 0], targets, histories, ties,
                          history_offset=history_offset)
    for start, end in item_chunks(1, scores.shape[1], item_chunk):
        counter.add(start, scores[:, start:end])
    return counter.counts


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


def diagnostic_sums(ranks: torch.Tensor, top1: torch.Tensor, targets: Sequence[int],
                    histories: Sequence[Sequence[int]]) -> dict[str, float]:
    """Sums over a batch of the DIAGNOSTICS: hit@1 and reciprocal ranks of the 0-based `ranks`;
    users whose `top1` item is in / is the last of their history; targets in their history."""
    ranks = ranks.double().cpu()
    in_history = is_last = repeats = 0
    for item, target, history in zip(top1.tolist(), list(targets), histories):
        seen = set(history)
        in_history += item in seen
        is_last += bool(history) and item == history[-1]
        repeats += target in seen
    return {"hit@1": float((ranks < 1).sum()), "mrr": float((1.0 / (ranks + 1.0)).sum()),
            "top1_in_history": float(in_history), "top1_is_last": float(is_last), "target_is_repeat": float(repeats)}


def median_rank(ranks: torch.Tensor) -> float:
    """Median 1-based rank of 0-based `ranks` (the mean of the two middle ones for an even count)."""
    ordered = ranks.double().sort().values + 1
    n = len(ordered)
    if n == 0:
        raise ValueError("no ranks")
    return float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def sample_users(users: list[UserSequence], size: int, seed: int = 0) -> tuple[list[UserSequence], dict | None]:
    """A fixed seeded sample of `size` users (in dataset order) and its description; every user
    and None when size is 0 or at least the number of users."""
    if size <= 0 or size >= len(users):
        return users, None
    pick = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return [users[i] for i in pick.tolist()], {"size": size, "seed": seed, "of": len(users)}


class _Items:
    """Rows of an item table (a tensor, or a function of item ids) whose first row is item `offset`."""

    def __init__(self, table: ItemTable, offset: int):
        self.table, self.offset = table, offset

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if callable(self.table):
            return self.table(ids)
        return self.table[ids.to(self.table.device) - self.offset]

    def chunk(self, start: int, end: int) -> torch.Tensor:
        if callable(self.table):
            return self.table(torch.arange(start, end))
        return self.table[start - self.offset:end - self.offset]


def _on_backend(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return tensor.to(device if dist.get_backend() == "nccl" else "cpu")


def _all_reduce(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    out = _on_backend(tensor, device)
    dist.all_reduce(out)
    return out.to(tensor.device)


def _all_gather(tensor: torch.Tensor, device: torch.device | str, world_size: int) -> list[torch.Tensor]:
    local = _on_backend(tensor, device)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return [p.to(tensor.device) for p in parts]


def _write_top_k(path: str | Path, records: list[tuple[list[UserSequence], torch.Tensor, torch.Tensor]],
                 writers: Sequence[int], rank: int) -> None:
    """JSONL, one line per user: {"user", "user_id", "items", "scores"}, best first (placeholders
    and masked items, score -inf, left out). Ranks in `writers` append in turn."""
    for writer in writers:
        if writer == rank:
            with open(path, "w" if writer == writers[0] else "a") as f:
                for users, scores, items in records:
                    for user, s, i in zip(users, scores.tolist(), items.tolist()):
                        keep = [j for j, value in enumerate(s) if value != float("-inf")]
                        f.write(json.dumps({"user": user.user, "user_id": user.user_id,
                                            "items": [i[j] for j in keep], "scores": [s[j] for j in keep]}) + "\n")
        if len(writers) > 1 and dist.is_initialized():
            dist.barrier()


@torch.no_grad()
def evaluate(score_fn: ScoreFn, dataset: PreparedDataset, split: str, max_len: int, batch_size: int = 512,
             ks: Sequence[int] = KS, mask_history: bool = False, ties: str = "pessimistic",
             device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
             progress: bool = False, *, item_table: ItemTable | None = None, item_chunk: int = 0,
             item_shard: bool = False, top_k: int = 0, top_k_path: str | Path | None = None,
             user_sample: int = 0, user_seed: int = 0, equal_batches: bool | None = None,
             diagnostics: bool = False, trim_padding: bool = False, history_bias: float | None = None) -> dict:
    """Mean Hit@K / NDCG@K on `split` (valid or test) over all users (or a seeded sample).

    score_fn maps [B, max_len] left-padded histories (on `device`) to [B, N+1] scores or, when
    `item_table` is given, to [B, d] user representations scored against the table: [N+1, d]
    (row 0 padding), or under `item_shard` this rank's rows `item_range(N, rank, W)` (the full
    table works too), or a function of item ids giving their rows. Items are ranked in chunks
    of `item_chunk` ids (0: all at once). top_k > 0 writes each user's top-K items to
    `top_k_path` (JSONL). user_sample > 0 evaluates that many users drawn with `user_seed`.
    equal_batches (default: on when W > 1) gives every rank the same number of forward calls.
    diagnostics adds hit@1, mrr, median_rank, top1_in_history, top1_is_last, target_is_repeat.
    trim_padding hands score_fn each batch padded to its longest history instead of max_len
    (shards.windows.trim_left_padding). history_bias (with `item_table`): a model's learned
    offset added to the scores of the history items its input holds (the last max_len; SASRec
    `train_id.history_bias`); mask_history (the whole history) overrides it.
    Under torch.distributed every rank must call this; rank/world_size default to the group's.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"evaluation split must be valid or test, got {split!r}")
    if top_k and top_k_path is None:
        raise ValueError("top_k needs a top_k_path to write to")
    if dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = rank or 0, world_size or 1
    shared = item_shard and world_size > 1  # every rank sees every user; counts are all-reduced
    if shared and not dist.is_initialized():
        raise ValueError("item_shard over several ranks needs torch.distributed")
    num_items = dataset.num_items
    all_users, sample = sample_users(dataset.users, user_sample, user_seed)
    start, end = item_range(num_items, rank, world_size) if item_shard else (1, num_items + 1)
    items = None
    if item_table is not None:
        full = not callable(item_table) and item_table.shape[0] == num_items + 1
        if not callable(item_table) and not full and item_table.shape[0] != end - start:
            raise ValueError(f"item_table has {item_table.shape[0]} rows: expected {num_items + 1} "
                             f"(all items) or {end - start} (items {start}..{end - 1})")
        items = _Items(item_table, 0 if full or callable(item_table) else start)

    users = all_users if item_shard else all_users[rank::world_size]
    batches = [users[i:i + batch_size] for i in range(0, len(users), batch_size)]
    if equal_batches is None:
        equal_batches = world_size > 1
    if equal_batches and not item_shard:  # pad to the most batches any rank has (ranks differ by <= 1 user)
        most = math.ceil(math.ceil(len(all_users) / world_size) / batch_size)
        batches += [[] for _ in range(most - len(batches))]

    def rank_batch(out: torch.Tensor, targets: torch.Tensor, histories: list[list[int]] | None,
                   offset: float) -> RankCounter:
        """The batch's targets counted over this rank's items [start, end), block by block. `out`
        is score_fn's output. (A function: its blocks are freed before the next forward.)"""
        if items is None:
            if out.shape != (len(targets), num_items + 1):
                raise ValueError(f"score_fn returned {tuple(out.shape)}, expected ({len(targets)}, {num_items + 1})")
            target_scores = out.gather(1, targets[:, None])[:, 0].float()
            block = lambda s, e: out[:, s:e]  # noqa: E731
        else:
            if out.dim() != 2 or out.shape[0] != len(targets):
                raise ValueError(f"score_fn returned {tuple(out.shape)}, expected ({len(targets)}, d): "
                                 "user representations")
            target_scores = torch.zeros(len(targets), device=out.device)
            own = ((targets >= start) & (targets < end)).nonzero()[:, 0]  # targets among this rank's items
            if len(own):  # the same fp32 matmul as a block, on the targets' rows
                target_scores[own] = score_block(out[own], items.rows(targets[own])).diagonal()
            if shared:
                target_scores = _all_reduce(target_scores, device)  # each target's score from its owner
            block = lambda s, e: score_block(out, items.chunk(s, e))  # noqa: E731
        counter = RankCounter(target_scores, targets, histories, ties, top_k, diagnostics, history_offset=offset)
        for s, e in item_chunks(start, end, item_chunk):
            counter.add(s, block(s, e))
        return counter

    names = [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]
    if diagnostics:
        names += [n for n in DIAGNOSTICS if n not in names]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    top_records, all_ranks = [], []
    def padded(histories: list) -> torch.Tensor:
        out = pad_left(histories, max_len)
        return (trim_left_padding(out)[0] if trim_padding else out).to(device)

    for batch in tqdm(batches, desc=f"eval {split}", disable=not progress, leave=False):
        if not batch:  # equal_batches padding: the forward runs (a collective under ZeRO-3), its output is unused
            score_fn(padded([all_users[0].history(split)]))
            continue
        histories = [u.history(split) for u in batch]
        targets = torch.tensor([u.target(split) for u in batch], device=device)
        if mask_history:  # the whole history is no candidate
            marked, offset = histories, float("-inf")
        elif history_bias is not None:  # part of the model: on the items its input holds (the last max_len)
            marked, offset = [h[-max_len:] for h in histories], history_bias
        else:
            marked, offset = None, float("-inf")
        counter = rank_batch(score_fn(padded(histories)), targets, marked, offset)
        ranks = counter.counts
        if shared:
            ranks = _all_reduce(ranks, device)  # the per-user counts over all item slices
            if top_k:
                parts = zip(_all_gather(counter.top_scores, device, world_size),
                            _all_gather(counter.top_items, device, world_size))
                for other, (scores, ids) in enumerate(parts):
                    if other != rank:  # this rank's own top-K is already in the counter
                        counter.merge_top_k(scores, ids)
            if diagnostics:  # each rank's best of its slice -> the best over all items, on every rank
                parts = zip(_all_gather(counter.top1_scores, device, world_size),
                            _all_gather(counter.top1_items, device, world_size))
                for other, (scores, ids) in enumerate(parts):
                    if other != rank:
                        counter.merge_top1(scores, ids)
        if top_k:
            top_records.append((batch, counter.top_scores.cpu(), counter.top_items.cpu()))
        sums = metric_sums(ranks, ks)
        if diagnostics:
            sums.update(diagnostic_sums(ranks, counter.top1_items, targets.tolist(), histories))
            all_ranks.append(ranks.cpu())
        totals[:-1] += torch.tensor([sums[n] for n in names], dtype=torch.float64)
        totals[-1] += len(batch)
    if diagnostics:
        all_ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)
    if dist.is_initialized() and world_size > 1 and not shared:
        totals = _all_reduce(totals, device)
        if diagnostics:  # every rank's per-user ranks, padded with -1 to the most users a rank has
            most = math.ceil(len(all_users) / world_size)
            padded = torch.full((most,), -1, dtype=torch.long)
            padded[:len(all_ranks)] = all_ranks
            all_ranks = torch.cat(_all_gather(padded, device, world_size))
            all_ranks = all_ranks[all_ranks >= 0]
    if top_k:
        _write_top_k(top_k_path, top_records, [0] if shared else list(range(world_size)), rank)
    count = totals[-1].item()
    if count == 0:
        raise ValueError("no users to evaluate")
    result = {n: totals[i].item() / count for i, n in enumerate(names)}
    if diagnostics:
        result["median_rank"] = median_rank(all_ranks)
    result["users"] = int(count)
    if sample is not None:  # flat keys: a result is a dict of numbers (logged as scalars)
        result.update(user_sample_of=sample["of"], user_sample_seed=sample["seed"])
    return result

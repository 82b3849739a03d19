"""`prepare`: canonical dataset -> PreparedDataset (k-core, time order, dense ids, leave-one-out)."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

from shards.canonical import CanonicalDataset, Interaction
from shards.prepared import Item, PreparedDataset, UserSequence

log = logging.getLogger(__name__)


def kcore(interactions: list[Interaction], k: int) -> list[Interaction]:
    """Repeatedly drop users and items with fewer than k interactions until none is left."""
    while k > 1:
        users = Counter(x.user_id for x in interactions)
        items = Counter(x.item_id for x in interactions)
        kept = [x for x in interactions if users[x.user_id] >= k and items[x.item_id] >= k]
        if len(kept) == len(interactions):
            break
        interactions = kept
    return interactions


def prepare(data: CanonicalDataset, k: int = 5) -> PreparedDataset:
    """Users are ordered by first appearance in the file; items are numbered in order of first
    interaction of that ordering, so ids are deterministic. Each user's interactions are sorted
    by (timestamp, file order): equal timestamps keep the file's order, as RecBole does."""
    if k < 1:
        raise ValueError(f"kcore must be >= 1, got {k}")
    stats = Counter(data.warnings)
    raw_count = len(data.interactions)
    kept = kcore(data.interactions, k)
    stats["interactions_dropped_by_kcore"] = raw_count - len(kept)

    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for x in kept:
        by_user[x.user_id].append(x)
    sequences = []
    for user_id, rows in by_user.items():
        rows.sort(key=lambda x: (x.timestamp, x.order))
        if len(rows) < 3:  # leave-one-out needs one train, one valid and one test item
            stats["users_dropped_too_short"] += 1
            stats["interactions_dropped_too_short"] += len(rows)
            continue
        sequences.append((user_id, [x.item_id for x in rows]))
    if not sequences:
        raise ValueError(f"no user has >= 3 interactions after {k}-core filtering; lower data.kcore")

    dense: dict[str, int] = {}
    for _, seq in sequences:
        for item_id in seq:
            dense.setdefault(item_id, len(dense) + 1)
    items = [Item(i, item_id, data.items[item_id].title, data.items[item_id].image) for item_id, i in dense.items()]
    users = []
    for u, (user_id, seq) in enumerate(sequences, 1):
        ids = [dense[x] for x in seq]
        users.append(UserSequence(u, user_id, ids[:-2], ids[-2], ids[-1]))

    n_inter = sum(len(s) for _, s in sequences)
    stats.update({
        "users": len(users),
        "items": len(items),
        "interactions": n_inter,
        "sparsity": round(1 - n_inter / (len(users) * len(items)), 6),
        "avg_sequence_length": round(n_inter / len(users), 3),
        "items_with_image": sum(1 for i in items if i.image),
        "kcore": k,
        "raw_interactions": raw_count,
        "raw_items": len(data.items),
        "items_unused": len(data.items) - len(items),
    })
    return PreparedDataset(items, users, dict(stats))


STATS_ROWS = [("users", "#Users"), ("items", "#Items"), ("interactions", "#Interactions"),
              ("sparsity", "Sparsity"), ("avg_sequence_length", "Avg. length"),
              ("items_with_image", "Items with image"), ("items_without_title", "Items without title"),
              ("interactions_dropped_by_kcore", "Dropped by k-core"),
              ("users_dropped_too_short", "Users dropped (<3 items)")]


def stats_table(stats: dict) -> str:
    rows = [(label, stats.get(key, 0)) for key, label in STATS_ROWS]
    rows = [(label, f"{v:.4%}" if label == "Sparsity" else f"{v:,}" if isinstance(v, int) else str(v)) for label, v in rows]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label:<{width}}  {value:>12}" for label, value in rows)

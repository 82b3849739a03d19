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
    for key in RAW_ITEM_COUNTS:
        stats[key] += 0  # listed in stats.json even when zero
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
    stats = {
        **stats,
        "users": len(users),
        "items": len(items),
        "interactions": n_inter,
        "sparsity": round(1 - n_inter / (len(users) * len(items)), 6),
        "avg_sequence_length": round(n_inter / len(users), 3),
        "items_with_image": sum(1 for i in items if i.image),  # readable images only
        "kcore": k,
        "image_check": data.image_check,
        "raw_interactions": raw_count,
        "raw_items": len(data.items),
        "items_unused": len(data.items) - len(items),
    }
    return PreparedDataset(items, users, stats)


# Counted over all raw items (data.warnings), before any filtering.
RAW_ITEM_COUNTS = ("items_without_title", "items_without_image", "images_missing", "images_unreadable")


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def stats_table(stats: dict) -> str:
    """stats.json as text. Each section has one denominator, named in its title; a count that is
    a share of it is printed with its percentage."""
    g = lambda key: stats.get(key, 0)  # noqa: E731
    k, users_after_kcore = g("kcore"), g("users") + g("users_dropped_too_short")
    sections = [
        (f"Raw input: {_fmt(g('raw_items'))} items (items.jsonl)", g("raw_items"), [
            ("without title", g("items_without_title"), True),
            ("without usable image", g("items_without_image"), True),
            ("  image file missing", g("images_missing"), True),
            (f"  image unreadable ({stats.get('image_check', 'no')} check)", g("images_unreadable"), True),
            ("in no prepared sequence", g("items_unused"), True),
        ]),
        (f"Raw input: {_fmt(g('raw_interactions'))} interactions (interactions.csv)", g("raw_interactions"), [
            (f"dropped by {k}-core", g("interactions_dropped_by_kcore"), True),
            ("dropped with their user (< 3 left)", g("interactions_dropped_too_short"), True),
        ]),
        (f"After {k}-core: {_fmt(users_after_kcore)} users", users_after_kcore, [
            ("dropped (< 3 interactions)", g("users_dropped_too_short"), True),
        ]),
        (f"Prepared dataset: {_fmt(g('items'))} items", g("items"), [
            ("#Users", g("users"), False),
            ("#Items", g("items"), False),
            ("#Interactions", g("interactions"), False),
            ("Sparsity", f"{g('sparsity'):.4%}", False),
            ("Avg. length", g("avg_sequence_length"), False),
            ("Items with image", g("items_with_image"), True),
        ]),
    ]
    width = max(len(label) for _, _, rows in sections for label, _, _ in rows)
    lines = []
    for title, total, rows in sections:
        lines.append(title)
        for label, value, is_share in rows:
            pct = f"  {value / total:8.2%}" if is_share and total else ""
            lines.append(f"  {label:<{width}}  {_fmt(value):>12}{pct}")
    return "\n".join(lines)

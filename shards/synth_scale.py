"""The scale-test dataset (`launcher synth` with data.synth.images=false): an ID + text catalogue
in the canonical format, without images, generated with numpy a step at a time for all users at
once, so that 10^6 users x 10^6 items x ~20 interactions take a minute or two and a few GB.

The same kind of signal as shards/synth.py: every item has a topic (its title's words say which);
item popularity is Zipf-like (weight 1 / rank**popularity_exponent over a random ranking); each
user likes two topics, keeps the current item's topic with probability topic_stickiness and
otherwise jumps to one of the two, which drift with probability drift per step; with probability
SUCCESSOR_PROB the next item is the current item's successor (an item of its topic), so item ids
carry sequential signal that content alone does not. interactions.csv (or .parquet) is a log in
time order: users interleave, and a user's rows are in order of their integer timestamps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.config import SynthConfig
from shards.synth import STYLE_WORDS, TOPICS, check_sizes

SUCCESSOR_PROB = 0.3


class TopicSampler:
    """Draws items of given topics, each topic's items weighted by popularity."""

    def __init__(self, topic_of: np.ndarray, weight: np.ndarray, num_topics: int):
        self.members = [np.flatnonzero(topic_of == t) for t in range(num_topics)]
        self.cdf = []
        for m in self.members:
            c = np.cumsum(weight[m])
            self.cdf.append(c / c[-1])

    def __call__(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty(len(topics), dtype=np.int64)
        for t, (members, cdf) in enumerate(zip(self.members, self.cdf)):
            where = np.flatnonzero(topics == t)
            pick = np.searchsorted(cdf, rng.random(len(where)), side="right")
            out[where] = members[np.minimum(pick, len(members) - 1)]
        return out


def _titles(topic_of: np.ndarray, rng: np.random.Generator) -> list[str]:
    style, w1, w2 = (rng.integers(0, n, len(topic_of)) for n in (len(STYLE_WORDS), 10, 10))
    words = [[w.title() for w in topic[3]] for topic in TOPICS]
    styles = [w.title() for w in STYLE_WORDS]
    return [f"{styles[s]} {words[t][a]} {words[t][b]}" if a != b else f"{styles[s]} {words[t][a]}"
            for t, s, a, b in zip(topic_of.tolist(), style.tolist(), w1.tolist(), w2.tolist())]


def interactions(cfg: SynthConfig, rng: np.random.Generator, topic_of: np.ndarray):
    """(user, item, timestamp) index arrays, one row per interaction, in time order."""
    num_users, num_topics, steps = cfg.num_users, cfg.num_topics, cfg.max_seq_len
    weight = 1.0 / (rng.permutation(cfg.num_items) + 1.0) ** cfg.popularity_exponent
    draw = TopicSampler(topic_of, weight, num_topics)
    successor = draw(topic_of, rng)
    lengths = rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1, num_users)
    liked = rng.integers(0, num_topics, (num_users, 2))
    everyone = np.arange(num_users)
    seq = np.empty((num_users, steps), dtype=np.int64)
    seq[:, 0] = draw(liked[:, 0], rng)
    for step in range(1, steps):
        drifting = np.flatnonzero(rng.random(num_users) < cfg.drift)
        liked[drifting, rng.integers(0, 2, len(drifting))] = rng.integers(0, num_topics, len(drifting))
        prev = seq[:, step - 1]
        topic = np.where(rng.random(num_users) < cfg.topic_stickiness, topic_of[prev],
                         liked[everyone, rng.integers(0, 2, num_users)])
        seq[:, step] = np.where(rng.random(num_users) < SUCCESSOR_PROB, successor[prev], draw(topic, rng))
    start = 1_600_000_000 + rng.integers(0, 30_000_000, num_users)
    times = start[:, None] + np.cumsum(rng.integers(60, 86_400, (num_users, steps)), axis=1)
    used = np.arange(steps)[None, :] < lengths[:, None]
    users, items, times = np.broadcast_to(everyone[:, None], used.shape)[used], seq[used], times[used]
    order = np.argsort(times, kind="stable")  # a log in time order
    return users[order], items[order], times[order]


def synthesize_scale(cfg: SynthConfig, out: str | Path) -> dict:
    """Write items.jsonl and interactions.csv (or .parquet) to `out`; returns counts."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    check_sizes(cfg, min_seq_len=2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    topic_of = rng.permutation(np.arange(cfg.num_items) % cfg.num_topics)
    item_ids = [f"i{i}" for i in range(cfg.num_items)]
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        for item_id, title in zip(item_ids, _titles(topic_of, rng)):
            f.write(json.dumps({"item_id": item_id, "title": title, "image": None}) + "\n")
    users, items, times = interactions(cfg, rng, topic_of)
    user_ids = pa.array([f"u{u}" for u in range(cfg.num_users)], pa.string())
    table = pa.table({"user_id": user_ids.take(users), "item_id": pa.array(item_ids, pa.string()).take(items),
                      "timestamp": times})
    if cfg.parquet:
        pq.write_table(table, out / "interactions.parquet")
    else:
        with open(out / "interactions.csv", "wb") as f:
            f.write(",".join(table.column_names).encode() + b"\n")
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return {"items": cfg.num_items, "users": cfg.num_users, "interactions": len(table)}

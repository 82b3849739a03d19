import numpy as np
from PIL import Image

from shards.canonical import read_canonical
from shards.config import SynthConfig
from shards.synth import TOPICS, synthesize

CFG = SynthConfig(seed=5, num_users=50, num_items=48, num_topics=4, image_size=24)


def test_same_seed_same_bytes(tmp_path):
    synthesize(CFG, tmp_path / "a")
    synthesize(CFG, tmp_path / "b")
    for name in ["items.jsonl", "interactions.csv", "images/s00000.jpg", "images/s00003.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    synthesize(SynthConfig(**{**vars(CFG), "seed": 6}), tmp_path / "c")
    assert (tmp_path / "a" / "interactions.csv").read_bytes() != (tmp_path / "c" / "interactions.csv").read_bytes()


def topic_of_title(title):
    return next(k for k, (_, _, _, words) in enumerate(TOPICS) if any(w.title() in title.split() for w in words))


def test_content_carries_the_topic(tmp_path):
    synthesize(CFG, tmp_path)
    data = read_canonical(tmp_path)
    topics = {i: topic_of_title(it.title) for i, it in data.items.items()}
    # titles: consecutive items of a user share a topic far more often than chance (1 / num_topics)
    by_user = {}
    for x in sorted(data.interactions, key=lambda x: (x.user_id, x.timestamp)):
        by_user.setdefault(x.user_id, []).append(topics[x.item_id])
    same = [a == b for seq in by_user.values() for a, b in zip(seq, seq[1:])]
    assert np.mean(same) > 0.5
    # images: the median colour (the background) is closer to the item's topic colour than to any other topic's
    hits = total = 0
    for item_id, it in data.items.items():
        if it.image:
            median = np.median(np.asarray(Image.open(it.image).convert("RGB"), dtype=float).reshape(-1, 3), 0)
            dist = [np.linalg.norm(median - np.array(TOPICS[k][1])) for k in range(CFG.num_topics)]
            hits += int(np.argmin(dist) == topics[item_id])
            total += 1
    assert hits / total > 0.85
    assert sum(1 for it in data.items.values() if it.image is None) >= 1  # some items lack images on purpose


SCALE = SynthConfig(seed=2, num_users=2000, num_items=300, num_topics=6, images=False, min_seq_len=5, max_seq_len=25)


def test_scale_mode_is_deterministic_and_canonical(tmp_path):
    from shards.canonical import read_columns

    counts = synthesize(SCALE, tmp_path / "a")
    synthesize(SCALE, tmp_path / "b")
    for name in ["items.jsonl", "interactions.csv"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "a" / "images").exists()
    data = read_canonical(tmp_path / "a")
    assert counts == {"items": 300, "users": 2000, "interactions": len(data.interactions)}
    assert 5 * 2000 <= len(data.interactions) <= 25 * 2000
    assert all(it.image is None and it.title for it in data.items.values())
    assert [x.timestamp for x in data.interactions] == sorted(x.timestamp for x in data.interactions)  # a log
    synthesize(SynthConfig(**{**vars(SCALE), "parquet": True}), tmp_path / "p")
    assert not (tmp_path / "p" / "interactions.csv").exists()
    a, p = read_columns(tmp_path / "a").interactions, read_columns(tmp_path / "p").interactions
    assert a.user_ids == p.user_ids and (a.items == p.items).all() and (a.timestamps == p.timestamps).all()


def test_scale_mode_has_popularity_skew_topics_and_successors(tmp_path):
    synthesize(SCALE, tmp_path)
    data = read_canonical(tmp_path)
    popularity = np.sort(np.unique([x.item_id for x in data.interactions], return_counts=True)[1])[::-1]
    assert popularity[:15].sum() > 0.15 * popularity.sum()  # the top 5% of items: over 15% of interactions
    topics = {i: topic_of_title(it.title) for i, it in data.items.items()}
    by_user = {}
    for x in data.interactions:  # already in time order
        by_user.setdefault(x.user_id, []).append(x.item_id)
    pairs = [(a, b) for seq in by_user.values() for a, b in zip(seq, seq[1:])]
    assert np.mean([topics[a] == topics[b] for a, b in pairs]) > 0.6  # chance: 1/6
    # each item's most frequent next item (its successor) follows it far more often than by chance
    nexts = {}
    for a, b in pairs:
        nexts.setdefault(a, []).append(b)
    share = [np.unique(v, return_counts=True)[1].max() / len(v) for v in nexts.values() if len(v) >= 20]
    assert np.mean(share) > 0.27  # 0.33 here; 0.16 without successors

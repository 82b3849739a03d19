"""The embedded default dataset: a small multimodal dataset in the canonical format,
deterministic from a seed.

Every item belongs to a latent topic. The topic picks the title's words and the image's colour,
shape and texture, so both modalities carry it. Users prefer a few topics, drift between them,
and tend to stay on a topic; each item also has a "successor" item that users often take next,
so item ids carry collaborative signal that content alone does not.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.canonical import write_canonical
from shards.config import SynthConfig

TOPICS = [
    ("ocean", (30, 90, 200), "circle", ["coral", "tide", "wave", "harbor", "reef", "sail", "anchor", "lagoon", "shell", "current"]),
    ("forest", (40, 140, 60), "triangle", ["pine", "moss", "fern", "cedar", "trail", "grove", "acorn", "timber", "canopy", "maple"]),
    ("desert", (220, 170, 60), "square", ["dune", "cactus", "mirage", "oasis", "canyon", "sand", "mesa", "scorpion", "sun", "caravan"]),
    ("city", (120, 120, 130), "stripes", ["metro", "tower", "avenue", "neon", "bridge", "plaza", "taxi", "skyline", "loft", "subway"]),
    ("kitchen", (200, 60, 50), "ring", ["pasta", "spice", "bakery", "soup", "garlic", "oven", "noodle", "pepper", "bread", "honey"]),
    ("space", (60, 20, 110), "star", ["orbit", "comet", "nebula", "rocket", "galaxy", "meteor", "lunar", "planet", "quasar", "cosmos"]),
    ("music", (230, 90, 180), "diamond", ["guitar", "melody", "rhythm", "piano", "chorus", "violin", "drum", "ballad", "tempo", "jazz"]),
    ("winter", (200, 230, 250), "cross", ["snow", "frost", "glacier", "sled", "blizzard", "icicle", "parka", "cocoa", "ski", "polar"]),
    ("garden", (150, 200, 60), "circle", ["tulip", "rose", "bloom", "petal", "orchard", "daisy", "seed", "hedge", "ivy", "lily"]),
    ("sports", (250, 120, 20), "triangle", ["soccer", "sprint", "goal", "racket", "stadium", "relay", "medal", "tackle", "coach", "arena"]),
    ("history", (140, 90, 50), "square", ["empire", "castle", "scroll", "knight", "dynasty", "ruins", "temple", "legend", "crown", "saga"]),
    ("tech", (20, 200, 200), "stripes", ["circuit", "laptop", "robot", "pixel", "server", "code", "sensor", "drone", "chip", "cloud"]),
]
STYLE_WORDS = ["classic", "deluxe", "mini", "grand", "little", "wild", "golden", "silent", "bright", "hidden",
               "modern", "ancient", "secret", "happy", "lost", "first", "last", "royal", "simple", "great"]


def draw_item_image(topic: int, rng: random.Random, size: int) -> Image.Image:
    _, colour, shape, _ = TOPICS[topic % len(TOPICS)]
    jitter = lambda c: tuple(int(np.clip(v + rng.randint(-35, 35), 0, 255)) for v in c)  # noqa: E731
    img = Image.new("RGB", (size, size), jitter(colour))
    draw = ImageDraw.Draw(img)
    fg = tuple(255 - v for v in jitter(colour))
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "ring":
        draw.ellipse(box, outline=fg, width=max(2, r // 3))
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=fg)
    elif shape == "cross":
        w = max(2, r // 3)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r // 2
            ang = np.pi / 5 * k - np.pi / 2
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        draw.polygon(pts, fill=fg)
    else:  # stripes across the whole image
        step = max(4, size // 8)
        for x in range(0, size, step * 2):
            draw.rectangle((x, 0, x + step - 1, size), fill=fg)
    noise = np.asarray(img, dtype=np.int16) + np.array(
        [rng.randint(-12, 12) for _ in range(size * size * 3)], dtype=np.int16).reshape(size, size, 3)
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))


def check_sizes(cfg: SynthConfig, min_seq_len: int) -> None:
    """The topic, item and sequence-length bounds both generators need."""
    if not 2 <= cfg.num_topics <= len(TOPICS):
        raise ValueError(f"num_topics must be in 2..{len(TOPICS)}, got {cfg.num_topics}")
    if cfg.num_items < 2 * cfg.num_topics:
        raise ValueError(f"num_items ({cfg.num_items}) must be at least 2 x num_topics")
    if not min_seq_len <= cfg.min_seq_len <= cfg.max_seq_len:
        raise ValueError(f"need {min_seq_len} <= min_seq_len <= max_seq_len")


def synthesize(cfg: SynthConfig, out: str | Path) -> dict:
    """Write the dataset to `out` (items.jsonl, images/, interactions.csv); returns counts.
    cfg.images=false writes the image-less scale-test dataset instead (shards/synth_scale.py)."""
    if not cfg.images:
        from shards.synth_scale import synthesize_scale

        return synthesize_scale(cfg, out)
    check_sizes(cfg, min_seq_len=3)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    nprng = np.random.default_rng(cfg.seed)

    topic_of = [i % cfg.num_topics for i in range(cfg.num_items)]
    rng.shuffle(topic_of)
    items, titles = [], set()
    for i, topic in enumerate(topic_of):
        words = TOPICS[topic][3]
        while True:
            title = " ".join([rng.choice(STYLE_WORDS).title()] + [w.title() for w in rng.sample(words, rng.randint(1, 2))])
            if title not in titles or len(titles) > 50 * cfg.num_items:
                break
            title += f" {rng.randint(2, 9)}"
            if title not in titles:
                break
        titles.add(title)
        item_id = f"s{i:05d}"
        image = None
        if i % 50 != 7:  # ~2% of items have no image, like real catalogues
            ext = "png" if i % 10 == 3 else "jpg"
            image = f"images/{item_id}.{ext}"
            draw_item_image(topic, rng, cfg.image_size).save(out / image, quality=92) if ext == "jpg" else \
                draw_item_image(topic, rng, cfg.image_size).save(out / image)
        items.append({"item_id": item_id, "title": title, "image": image})

    by_topic = [[i for i, t in enumerate(topic_of) if t == k] for k in range(cfg.num_topics)]
    popularity = [nprng.permutation(1.0 / np.arange(1, len(members) + 1) ** cfg.popularity_exponent)
                  for members in by_topic]
    popularity = [p / p.sum() for p in popularity]
    successor = [rng.choice(by_topic[topic_of[i]]) for i in range(cfg.num_items)]

    rows, clock = [], 1_600_000_000
    for u in range(cfg.num_users):
        prefs = nprng.dirichlet([0.3] * cfg.num_topics)
        topic = int(nprng.choice(cfg.num_topics, p=prefs))
        prev = None
        for _ in range(rng.randint(cfg.min_seq_len, cfg.max_seq_len)):
            if rng.random() < cfg.drift:
                prefs = 0.5 * prefs + 0.5 * nprng.dirichlet([0.3] * cfg.num_topics)
            if prev is not None and rng.random() < 0.3:
                item = successor[prev]
            else:
                if rng.random() > cfg.topic_stickiness:
                    topic = int(nprng.choice(cfg.num_topics, p=prefs))
                item = int(by_topic[topic][nprng.choice(len(by_topic[topic]), p=popularity[topic])])
            topic = topic_of[item]
            clock += rng.randint(60, 86_400)
            rows.append((f"u{u:05d}", items[item]["item_id"], clock))
            prev = item
    write_canonical(out, items, rows, parquet=cfg.parquet)
    return {"items": len(items), "users": cfg.num_users, "interactions": len(rows)}

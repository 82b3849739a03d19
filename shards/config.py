"""Config sections of the data stages in `shards/` (synth, prepare, shard): one dataclass per
section, loaded into the run's config tree by launcher.config."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SynthConfig:
    """The embedded default dataset (`launcher synth`)."""
    seed: int = 0
    num_users: int = 800
    num_items: int = 400
    num_topics: int = 8
    image_size: int = 64
    min_seq_len: int = 6
    max_seq_len: int = 30
    topic_stickiness: float = 0.7  # chance the next item keeps the current topic
    drift: float = 0.1  # chance a user's preferred topic drifts to another at each step
    popularity_exponent: float = 0.8  # Zipf-like item popularity: weight 1 / rank**exponent
    # false: the scale-test generator (shards/synth_scale.py): ID + text only, vectorised, 10^6
    # users and items in a minute or two
    images: bool = True
    parquet: bool = False  # write interactions.parquet instead of interactions.csv


@dataclass
class DataConfig:
    """Where the raw dataset comes from and how `prepare` cleans it."""
    format: str = "synth"  # synth | canonical | ninerec | ml100k
    source: str = ""  # folder for canonical/ninerec (e.g. ../shared/data/ninerec/Bili_Food); posters folder for ml100k
    kcore: int = 5
    title_field: str = "english"  # ninerec only: english | chinese
    # How `prepare` checks image files (shards.images.check_image): header (cheap, default) |
    # full (decode every pixel) | none. An unreadable image is counted and its item has no image.
    validate_images: str = "header"
    # Run prepare's per-interaction work on this Ray cluster ("auto" or host:port; empty: locally).
    # Same result either way, so it is not part of the stage's fingerprint.
    ray_address: str = ""
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ShardConfig:
    """WebDataset shards written by `launcher shard`."""
    items_per_shard: int = 200
    users_per_shard: int = 400
    max_shard_bytes: int = 256 * 1024 * 1024
    image_size: int = 0  # >0 resizes images (longest side) at shard time; 0 keeps them
    jpeg_quality: int = 90

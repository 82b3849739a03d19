"""Builders of small datasets for tests (plain functions: call them from fixtures)."""
from __future__ import annotations

import shutil
from pathlib import Path

from shards.canonical import read_canonical
from shards.config import ShardConfig, SynthConfig
from shards.prepare import prepare
from shards.synth import synthesize
from shards.writer import write_shards

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_synth(root: Path, users: int = 60, items: int = 40, topics: int = 4, seed: int = 0, kcore: int = 2,
               items_per_shard: int = 9, users_per_shard: int = 13):
    """Synthesise, prepare and shard a tiny dataset under root/{synth,prepare,shards}."""
    synthesize(SynthConfig(seed=seed, num_users=users, num_items=items, num_topics=topics, image_size=16,
                           min_seq_len=4, max_seq_len=10), root / "synth")
    ds = prepare(read_canonical(root / "synth"), kcore)
    ds.save(root / "prepare")
    write_shards(ds, root / "shards", ShardConfig(items_per_shard=items_per_shard, users_per_shard=users_per_shard))
    return ds


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a session-scoped run directory (tests/conftest.py) to write in; dst may exist."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    return dst

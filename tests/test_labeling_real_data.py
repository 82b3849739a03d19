"""Labeling the paper's Bili_Food subset (English and Chinese titles) with the deterministic backend."""
from __future__ import annotations

from pathlib import Path

import pytest

from llm_labeling.config import LabelConfig
from llm_labeling.run import label, read_records
from shards.canonical import read_canonical
from shards.prepare import prepare

FOOD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ninerec" / "Bili_Food"


@pytest.mark.slow
@pytest.mark.skipif(not FOOD.exists(), reason=f"{FOOD} absent (shared datasets not mounted)")
@pytest.mark.parametrize("title_field", ["english", "chinese"])
def test_bili_food(ray_session, tmp_path, title_field):
    from shards.sources import convert_ninerec

    convert_ninerec(FOOD, tmp_path / "raw", title_field)
    ds = prepare(read_canonical(tmp_path / "raw"), 5)
    ds.save(tmp_path / "prepare")
    metrics = label(LabelConfig(users_per_shard=2000), tmp_path / "prepare", tmp_path / "label")
    records = read_records(tmp_path / "label")
    assert len(records) == metrics["eligible_users"] == ds.num_users - sum(metrics["ineligible_users"].values())
    users = {u.user: u for u in ds.users}
    for r in records:  # targets are last training items, answers earlier training items: no leakage
        user = users[r["user"]]
        assert r["target"] == user.train[-1]
        assert r["similar"] == -1 or r["similar"] in user.train[:-1] and r["similar"] != r["target"]
    assert metrics["outcomes"]["malformed"] == 0 and metrics["valid_rate"] > 0.5

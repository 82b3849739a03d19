"""The labeling stage on Ray: one record per eligible user, resumable, redone when the config changes."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llm_labeling.backends import DeterministicEngine
from llm_labeling.config import LabelConfig
from llm_labeling.parse import parse_answer
from llm_labeling.prompt import build_prompts, clean_title
from llm_labeling.run import PROGRESS, label, ray_home, read_pairs, read_records
from shards.prepared import Item, PreparedDataset, UserSequence

WORDS = ["spicy", "noodles", "beef", "cake", "tea", "dance", "street", "hotpot", "cat", "guitar", "tofu", "rice"]


def make_dataset(root: Path) -> PreparedDataset:
    """30 users (3 of them ineligible) over 40 items with titles drawn from a small vocabulary."""
    rng = random.Random(7)
    items = [Item(i, f"it{i}", " ".join(rng.sample(WORDS, 2)), None) for i in range(1, 41)]
    users = []
    for u in range(1, 31):
        train = [rng.randint(1, 40) for _ in range(rng.randint(2, 12))]
        if u in (4, 17):
            train = train[:1]  # fewer than 2 training items
        if u == 23:
            train = [5, 5, 5]  # nothing but the target
        users.append(UserSequence(u, f"user{u}", train, valid=rng.randint(1, 40), test=rng.randint(1, 40)))
    ds = PreparedDataset(items, users)
    ds.save(root / "prepare")
    return ds


def reference_records(ds: PreparedDataset, cfg: LabelConfig) -> list[dict]:
    """Single process, no Ray: prompts -> deterministic engine -> parser."""
    prompts, _ = build_prompts(ds, ds.users, cfg.max_candidates, cfg.max_title_chars, cfg.item_noun)
    engine = DeterministicEngine([clean_title(t, cfg.max_title_chars) for t in ds.titles()[1:]])
    records = []
    for prompt, answer in zip(prompts, engine.generate(prompts)):
        outcome, similar = parse_answer(answer.text, prompt)
        records.append({"user": prompt.user, "target": prompt.target, "similar": similar, "answer": answer.text,
                        "outcome": outcome})
    return records


def shard_files(out: Path) -> dict[str, bytes]:
    """The shard files and any temp files: not the stage manifest, not checkpoint/."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"}


CFG = LabelConfig(backend="deterministic", users_per_shard=8, num_actors=2, batch_size=3, max_candidates=6)


@pytest.mark.slow
def test_two_actors_four_shards_one_record_per_eligible_user(ray_session, tmp_path):
    ds = make_dataset(tmp_path)
    metrics = label(CFG, tmp_path / "prepare", tmp_path / "label")
    assert sorted(shard_files(tmp_path / "label")) == [f"pairs-0000{k}.jsonl" for k in range(4)]
    records = read_records(tmp_path / "label")
    eligible = [u.user for u in ds.users if u.user not in (4, 17, 23)]
    assert [r["user"] for r in records] == eligible  # exactly once each, in user order
    assert records == reference_records(ds, CFG)
    assert metrics["num_actors"] == 2 and metrics["shards"] == 4 and metrics["shards_labeled_now"] == 4
    assert metrics["eligible_users"] == 27 and metrics["ineligible_users"] == {"no_other_item": 1, "short_history": 2}
    assert sum(metrics["outcomes"].values()) == 27 and metrics["outcomes"]["valid"] > 0
    assert read_pairs(tmp_path / "label") == [(r["target"], r["similar"]) for r in records if r["outcome"] == "valid"]
    # no valid or test item ever reaches labeling
    users = {u.user: u for u in ds.users}
    assert all(r["target"] == users[r["user"]].train[-1] and r["similar"] in users[r["user"]].train[:-1] + [-1]
               for r in records)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(ray_session, tmp_path):
    make_dataset(tmp_path)
    out = tmp_path / "label"
    label(CFG, tmp_path / "prepare", out)
    complete = shard_files(out)
    # what a run killed while writing shard 2 leaves behind: shard 2 missing, a partial temp file
    (out / "pairs-00002.jsonl").unlink()
    (out / "pairs-00002.jsonl.tmp").write_text('{"user": 17, "targ')
    with pytest.raises(FileNotFoundError, match="unfinished"):
        read_pairs(out)
    metrics = label(CFG, tmp_path / "prepare", out)
    assert metrics["shards_labeled_now"] == 1 and metrics["prompts_labeled_now"] == 6  # users 18-24 but 23
    assert shard_files(out) == complete  # same records, no duplicates, no temp files left

    # settings that do not change answers keep the shards; ones that do redo every shard
    assert label(dataclasses.replace(CFG, num_actors=1, max_restarts=0), tmp_path / "prepare", out)[
        "shards_labeled_now"] == 0
    metrics = label(dataclasses.replace(CFG, max_candidates=2), tmp_path / "prepare", out)
    assert metrics["shards_labeled_now"] == 4
    assert json.loads((out / PROGRESS).read_text())["config"]["max_candidates"] == 2
    assert read_records(out) == reference_records(PreparedDataset.load(tmp_path / "prepare"),
                                                  dataclasses.replace(CFG, max_candidates=2))
    assert label(dataclasses.replace(CFG, max_candidates=2), tmp_path / "prepare", out, force=True)[
        "shards_labeled_now"] == 4


@pytest.mark.slow
def test_a_second_driver_connects_to_a_running_cluster(ray_session, tmp_path):
    """`label.ray_address`: a separate driver process uses the existing cluster (as on SLURM)."""
    ds = make_dataset(tmp_path)
    address = ray_session.get_runtime_context().gcs_address
    code = ("import sys; from pathlib import Path; from llm_labeling.run import label, LabelConfig; "
            f"label(LabelConfig(users_per_shard=8, max_candidates=6, ray_address={address!r}), "
            "Path(sys.argv[1]) / 'prepare', Path(sys.argv[1]) / 'label')")
    env = dict(os.environ, HOME=str(ray_home()))  # where the cluster's auth token is
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=Path(__file__).resolve().parents[1],
                   env=env, timeout=120)
    assert read_records(tmp_path / "label") == reference_records(ds, CFG)
    assert ray_session.is_initialized() and ray_session.cluster_resources()["CPU"] == 3  # still up


def test_bad_config_is_a_clear_error(tmp_path):
    make_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown label.backend"):
        label(LabelConfig(backend="gpt"), tmp_path / "prepare", tmp_path / "label")
    with pytest.raises(ValueError, match="users_per_shard"):
        label(LabelConfig(users_per_shard=0), tmp_path / "prepare", tmp_path / "label")
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        label(LabelConfig(), tmp_path / "nothing", tmp_path / "label")


@pytest.mark.slow
def test_max_users_labels_a_seeded_sample_in_dataset_order(ray_session, tmp_path):
    """label.max_users: the same seeded users every time, in dataset order, their records those of a
    full run; the default (0 = everyone) leaves the fingerprint of earlier runs unchanged."""
    from llm_labeling.run import _fingerprint, labeled_users

    ds = make_dataset(tmp_path)
    sample = labeled_users(ds, 12, seed=3)
    assert [u.user for u in sample] == [u.user for u in labeled_users(ds, 12, seed=3)]
    assert [u.user for u in sample] == sorted(u.user for u in sample) and len(sample) == 12
    assert [u.user for u in labeled_users(ds, 12, seed=4)] != [u.user for u in sample]
    assert labeled_users(ds, 0, seed=3) == ds.users == labeled_users(ds, 99, seed=3)
    cfg = dataclasses.replace(CFG, max_users=12)
    metrics = label(cfg, tmp_path / "prepare", tmp_path / "label", seed=3)
    records = read_records(tmp_path / "label")
    wanted = {u.user for u in sample}
    assert [r["user"] for r in records] == [r["user"] for r in reference_records(ds, CFG) if r["user"] in wanted]
    assert records == [r for r in reference_records(ds, CFG) if r["user"] in wanted]
    assert metrics["users_sampled"] == 12 and metrics["users"] == 30
    before = {k: v for k, v in dataclasses.asdict(CFG).items() if k != "max_users"}
    assert _fingerprint(CFG, 0, tmp_path / "prepare") == _fingerprint_of(before, 0, tmp_path / "prepare")


def _fingerprint_of(config: dict, seed: int, prepared: Path) -> str:
    """llm_labeling.run._fingerprint as it was computed before max_users existed."""
    import hashlib

    from llm_labeling.run import _NOT_IN_FINGERPRINT
    from sicsrec.runtime.rundir import hash_files

    relevant = {k: v for k, v in config.items() if k not in _NOT_IN_FINGERPRINT}
    dataset = hash_files([prepared / "items.jsonl", prepared / "sequences.jsonl"])
    blob = json.dumps({"config": relevant, "seed": seed, "dataset": dataset}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.slow
def test_a_run_directory_of_the_old_layout_is_migrated_without_relabelling(ray_session, tmp_path):
    """Before checkpoint/progress.json the resume state was `label/label_manifest.json`: such a run
    directory, finished or killed, keeps its shards, and its label manifest keeps its fingerprint."""
    from launcher.config import load_config
    from launcher.stages import run
    from llm_labeling.run import OLD_PROGRESS, labels_input
    from sicsrec.runtime.rundir import write_json

    make_dataset(tmp_path)
    write_json(tmp_path / "prepare" / "manifest.json", {"stage": "prepare", "fingerprint": "prepared-by-hand"})
    cfg = load_config(None, [f"run_dir={tmp_path}", "label.users_per_shard=8", "label.batch_size=3",
                             "label.max_candidates=6"])
    out = cfg.stage_dir("label")
    first = run(cfg, "label")
    complete, progress, pairs = shard_files(out), (out / PROGRESS).read_bytes(), labels_input(out).fingerprint()
    records = read_records(out)

    def to_old_layout() -> None:
        os.replace(out / PROGRESS, out / OLD_PROGRESS)
        (out / PROGRESS).parent.rmdir()

    to_old_layout()  # a finished run: skipped, its resume state moved
    assert read_records(out) == records  # readable before the move
    assert run(cfg, "label") == first
    assert not (out / OLD_PROGRESS).exists() and (out / PROGRESS).read_bytes() == progress

    to_old_layout()  # killed while writing shard 2, before the stage manifest
    (out / "manifest.json").unlink()
    (out / "pairs-00002.jsonl").unlink()
    resumed = run(cfg, "label")
    assert resumed["metrics"]["shards_labeled_now"] == 1 and shard_files(out) == complete
    assert resumed["fingerprint"] == first["fingerprint"] and not (out / OLD_PROGRESS).exists()
    # SFT reads the label stage by its pairs' content: unchanged, so a finished SFT is not redone
    assert labels_input(out).fingerprint() == pairs

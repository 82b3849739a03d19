"""benchmarks/recbole_compare.py: time to quality on a hand-written curve, and the atomic file
written from our prepared split giving RecBole the same valid/test targets (ties included)."""
from __future__ import annotations

import argparse
import json
import sys

import pytest

from shards.canonical import read_canonical, write_canonical
from shards.prepare import prepare
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import recbole_compare as rc  # noqa: E402


def points(values, seconds=10.0):
    return rc.curve([seconds] * len(values), [1.0] * len(values), values)


def test_curve_is_cumulative_train_plus_eval():
    assert [p["wall_s"] for p in points([0.1, 0.2, 0.3])] == [11.0, 22.0, 33.0]


def test_time_to_reach_first_epoch_at_or_above():
    curve = points([0.01, 0.05, 0.04, 0.06])
    assert rc.time_to_reach(curve, 0.05) == 22.0
    assert rc.time_to_reach(curve, 0.061) is None


def test_time_to_quality_ratio_and_bar():
    recbole = {"best_valid_ndcg@10": 0.05, "wall_s_to_best": 100.0, "test_ndcg@10": 0.04, "curve": points([0.05])}
    fast = {"test_ndcg@10": 0.041, "curve": points([0.02, 0.03, 0.05, 0.06])}  # reaches 0.05 at 33 s
    slow = {"test_ndcg@10": 0.05, "curve": points([0.01] * 5 + [0.05])}  # at 66 s
    never = {"test_ndcg@10": 0.05, "curve": points([0.01])}
    q = rc.time_to_quality({rc.RECBOLE: recbole, "fast": fast, "slow": slow, "never": never})
    assert q["fast"]["wall_s_to_reach"] == 33.0 and q["fast"]["ratio"] == pytest.approx(0.33)
    assert q["fast"]["meets_bar"] and not q["slow"]["meets_bar"]
    assert q["never"]["wall_s_to_reach"] is None and q["never"]["ratio"] is None and not q["never"]["meets_bar"]
    assert rc.time_to_quality({rc.RECBOLE: {"error": "x"}, "fast": fast}) == {}


def test_atomic_file_gives_recbole_our_split(tmp_path):
    pytest.importorskip("recbole")
    # equal timestamps within a user: our order (file order) must survive RecBole's time sort
    rows = [(f"u{u}", f"i{(u * 3 + k) % 7}", 100 + k // 2) for u in range(6) for k in range(4 + u % 3)]
    write_canonical(tmp_path / "raw", [{"item_id": f"i{i}", "title": f"t{i}", "image": None} for i in range(7)], rows)
    prepare(read_canonical(tmp_path / "raw"), k=1).save(tmp_path / "prepare")
    rc.write_atomic(tmp_path / "prepare", tmp_path / "recbole", "tiny")
    config = rc.recbole_config("tiny", tmp_path / "recbole", tmp_path, rc.HPARAMS, 0)
    dataset, _, valid, test = rc.recbole_data(config)
    split = rc.compare_splits(dataset, valid, test, tmp_path / "prepare")
    assert split == {"users_ours": 6, "users_recbole": 6, "users_with_different_targets": 0}


def test_write_result_keeps_the_other_datasets(tmp_path):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"rows": {}, "epochs": 4}))  # the former layout is replaced
    rc.write_result(out, {"ml100k": {"a": 1}})
    rc.write_result(out, {"ninerec_food": {"b": 2}})
    rc.write_result(out, {"ml100k": {"a": 3}})
    assert json.loads(out.read_text()) == {"datasets": {"ml100k": {"a": 3}, "ninerec_food": {"b": 2}}}


def test_windows_entries_parse_and_bad_ones_are_refused():
    assert rc.parse_windows("all") == ("all", 0, None) and rc.parse_windows("prefix") == ("prefix", 0, None)
    assert rc.parse_windows("all:10") == ("all", 10, None) and rc.parse_windows("all:5@64") == ("all", 5, 64)
    assert rc.parse_windows("prefix@32") == ("prefix", 0, 32)
    for bad in ("every", "prefix:3", "all:0", "all:x", "all:", "all:5@", "all@0", "all:5@x"):
        with pytest.raises(ValueError, match="all:S"):
            rc.parse_windows(bad)


def test_ours_only_keeps_the_stored_recbole_row_and_refuses_a_mismatch(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    args = argparse.Namespace(out=str(out), ours_only=True, windows="all:5", max_epochs=3, patience=1, seed=0,
                              hidden=None, batch_size=None)
    with pytest.raises(SystemExit, match="no finished RecBole row for ml100k"):
        rc.run_dataset("ml100k", args)
    recbole = {"best_valid_ndcg@10": 0.05, "wall_s_to_best": 100.0, "test_ndcg@10": 0.04, "curve": points([0.05])}
    stored = {"hyper_parameters": dict(rc.HPARAMS), "argv": ["--dataset", "ml100k"], "threads": 1,
              "rows": {rc.RECBOLE: recbole, "ours SASRec (windows=all)": {"old": 1},
                       "ours SASRec (windows=all:5)": {"old": 2}}}
    rc.write_result(out, {"ml100k": stored})
    monkeypatch.setattr(rc, "build_ours", lambda dataset, work: work)
    monkeypatch.setattr(rc.PreparedDataset, "load", lambda path: argparse.Namespace(stats={"users": 3}))
    monkeypatch.setattr(rc, "run_recbole", lambda *a: pytest.fail("RecBole must not run with --ours-only"))
    ran = []

    def fake_ours(prepared, work, hparams, windows, *rest):
        ran.append(windows)
        return {"test_ndcg@10": 0.041, "curve": points([0.02, 0.05])}

    monkeypatch.setattr(rc, "run_ours", fake_ours)
    entry = rc.run_dataset("ml100k", args)
    assert ran == ["all:5"] and entry["rows"][rc.RECBOLE] == recbole
    assert entry["rows"]["ours SASRec (windows=all)"] == {"old": 1}  # kept
    assert entry["rows"]["ours SASRec (windows=all:5)"]["argv"] == sys.argv[1:]  # replaced by this run's
    assert entry["time_to_quality"]["ours SASRec (windows=all:5)"]["wall_s_to_reach"] == 22.0
    assert entry["recbole_row_from"] == {"argv": ["--dataset", "ml100k"], "threads": 1}
    with pytest.raises(SystemExit, match="used .* this run"):
        rc.run_dataset("ml100k", argparse.Namespace(**{**vars(args), "hidden": 32}))

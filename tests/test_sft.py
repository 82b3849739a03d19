"""Encoder SFT stage and the encode stage: hold-out split, recall@k on a hand-made case, a
single-process text-only run, and one 2-rank DeepSpeed torchrun (ZeRO-2 run, killed + resumed
run, encode over 2 ranks, a short ZeRO-3 run) checked against single-process references."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import copy_run
from shards.prepared import Item, PreparedDataset
from sicsrec.config import EncodeConfig, SFTConfig
from sicsrec.encode import ItemEmbeddings, encode, initial_encoder
from sicsrec.encoders import ContentEncoder
from sicsrec.sft import retrieval_recall, sft, split_holdout
from sicsrec.train import TrainingInterrupted
from test_encoders import tiny_config

REPO = Path(__file__).resolve().parents[1]


def write_labels(dataset: PreparedDataset, label_dir: Path) -> list[tuple[int, int]]:
    """A finished label stage in llm_labeling.run's format: one valid pair per user, one invalid."""
    label_dir.mkdir(parents=True, exist_ok=True)
    records = [{"user": u.user, "target": u.train[-1], "similar": u.train[-2], "answer": "", "outcome": "valid"}
               for u in dataset.users]
    records.append({"user": 0, "target": 1, "similar": None, "answer": "?", "outcome": "unparsable"})
    (label_dir / "pairs-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (label_dir / "manifest.json").write_text(json.dumps({"stage": "label", "fingerprint": "by-hand",
                                                         "metrics": {"shards": 1}}))
    return [(r["target"], r["similar"]) for r in records[:-1]]


def tiny_sft(**changes) -> SFTConfig:
    cfg = SFTConfig(encoders=tiny_config(), batch_size=4, epochs=2, lr=1e-3, holdout_fraction=0.2, eval_batch_size=16)
    return dataclasses.replace(cfg, **changes)


def test_split_holdout_is_seeded_and_disjoint():
    pairs = [(i, i + 1) for i in range(1, 21)]
    train, held = split_holdout(pairs, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == pairs and not set(train) & set(held)
    assert split_holdout(pairs, 0.1, seed=3) == (train, held)
    assert split_holdout(pairs, 0.1, seed=4)[1] != held
    assert split_holdout(pairs, 0.0, seed=3) == (pairs, [])
    assert len(split_holdout(pairs[:2], 0.01, seed=0)[1]) == 1  # at least one pair when fraction > 0
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_holdout(pairs, 1.0, seed=0)


def test_retrieval_recall_hand_computed():
    # 3 items (row 0 padding). Inner product, k=1: a hit only when the positive scores the highest.
    text = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    image = np.array([[0, 0], [2, 0], [0, 0], [0, 1]], dtype=np.float32)
    has = np.array([False, True, False, True])
    cache = ItemEmbeddings(np.arange(4), text, image, has)
    got = retrieval_recall(cache, held_out=[(1, 3), (2, 1), (3, 3)], normalize=False, k=1)
    # t2i over items 1 and 3: item 1 text.[img1, img3] = [2, 0] -> rank 0; item 3: [2, 1] -> rank 1
    assert got["t2i_recall@1"] == 0.5 and got["t2i_queries"] == 2
    # pairs (self excluded; (3, 3) dropped): 1 -> scores {2: 0, 3: 1}: 3 ranks 0, hit;
    # 2 -> scores {1: 0, 3: 1}: 1 ranks 1, miss
    assert got["pair_recall@1"] == 0.5 and got["pair_queries"] == 2
    assert retrieval_recall(cache, [(2, 1)], normalize=False, k=2)["pair_recall@2"] == 1.0


def test_aligned_rows_and_missing_items():
    part = ItemEmbeddings(np.array([2, 1]), np.array([[2.0], [1.0]]), None, np.array([False, False]))
    aligned = part.aligned(2)
    assert aligned.text[:, 0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"1 item\(s\) missing \(e.g. \[3\]\)"):
        part.aligned(3)
    with pytest.raises(ValueError, match=r"2 repeated \(e.g. \[1, 2\]\)"):
        ItemEmbeddings.concat([part, part]).aligned(2)


def test_text_only_sft_single_process_and_untuned_encode(synth_run, tmp_path):
    root, dataset = synth_run
    copy_run(root, tmp_path)
    write_labels(dataset, tmp_path / "label")
    cfg = tiny_sft(encoders=tiny_config(image_model=""), engine="single", epochs=1, num_workers=2)  # loader workers
    manifest = sft(cfg, tmp_path / "prepare", tmp_path / "shards", tmp_path / "label", tmp_path / "sft", seed=0)
    m = manifest["metrics"]
    assert m["engine"] == "single" and m["steps"] == 12 and m["train_pairs"] == 48 and m["held_out_pairs"] == 12
    assert "t2i_recall@10" not in m["after"] and 0.0 <= m["after"]["pair_recall@10"] <= 1.0
    log = [json.loads(line) for line in (tmp_path / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all(r["i2i"] == 0.0 and r["loss"] == r["t2t"] for r in log)
    assert list((tmp_path / "sft" / "tensorboard").iterdir())
    again = sft(cfg, tmp_path / "prepare", tmp_path / "shards", tmp_path / "label", tmp_path / "sft", seed=0)
    assert again["finished_at"] == manifest["finished_at"]  # done already: skipped

    tuned = encode(EncodeConfig(), tmp_path / "prepare", tmp_path / "shards", tmp_path / "sft", tmp_path / "enc")
    assert tuned["metrics"]["encoder_source"] == "sft"
    assert not (tmp_path / "enc" / "image.npy").exists()
    assert json.loads((tmp_path / "enc" / "encoders.json").read_text())["files"] == ["text.npy", "has_image.npy"]
    reference = ContentEncoder.load(tmp_path / "sft" / "encoder").eval()
    with torch.no_grad():
        expected = reference.encode_text(dataset.titles()[1:]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "enc" / "text.npy")[1:], expected, atol=1e-5)

    untuned = encode(EncodeConfig(use_sft=False), tmp_path / "prepare", tmp_path / "shards", tmp_path / "sft",
                     tmp_path / "enc0", encoders=cfg.encoders, seed=0)
    assert untuned["metrics"]["encoder_source"] == "untuned" and untuned["config"]["encoder_source"] == "untuned"
    initial = initial_encoder(cfg.encoders, dataset, seed=0).eval()
    with torch.no_grad():
        expected = initial.encode_text(dataset.titles()[1:]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "enc0" / "text.npy")[1:], expected, atol=1e-5)

    extra = Item(dataset.num_items + 1, "extra", "an item the shards lack", None)
    PreparedDataset(dataset.items[1:] + [extra], dataset.users).save(tmp_path / "prepare_extra")
    with pytest.raises(ValueError, match=rf"1 item\(s\) missing \(e.g. \[{extra.item}\]\)"):
        encode(EncodeConfig(), tmp_path / "prepare_extra", tmp_path / "shards", tmp_path / "sft", tmp_path / "enc_bad")
    assert not (tmp_path / "enc_bad" / "manifest.json").exists()


# ------------------------------------------------------------------ 2 ranks, DeepSpeed on CPU

@pytest.fixture(scope="module")
def two_rank_run(synth_run, tmp_path_factory):
    root, dataset = copy_run(synth_run[0], tmp_path_factory.mktemp("sft2")), synth_run[1]
    write_labels(dataset, root / "label")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, str(root)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, dataset


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero2_sft_resumes_to_the_uninterrupted_result(two_rank_run):
    root, _ = two_rank_run
    full = json.loads((root / "full" / "metrics.json").read_text())
    assert (full["engine"], full["zero_stage"], full["world_size"], full["epochs"]) == ("deepspeed", 2, 2, 2)
    assert full["steps"] == 2 * 6  # 48 training pairs / (2 ranks x 4) per epoch
    assert set(full["before"]) == set(full["after"]) == {"t2i_recall@10", "t2i_queries", "pair_recall@10",
                                                         "pair_queries"}
    manifest = json.loads((root / "full" / "manifest.json").read_text())
    assert manifest["metrics"]["after"] == full["after"]
    killed = json.loads((root / "killed" / "metrics.json").read_text())
    assert [r["epoch"] for r in _log(root / "killed")] == [0] * 6 + [1] * 6
    assert _log(root / "killed") == _log(root / "full")
    assert killed["after"] == full["after"] and killed["before"] == full["before"]
    a = torch.load(root / "full" / "encoder" / "encoders.pt", weights_only=True)
    b = torch.load(root / "killed" / "encoder" / "encoders.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = initial_encoder(tiny_config(), PreparedDataset.load(root / "prepare"), seed=0).state_dict()
    assert any(not torch.equal(a[k], untrained[k]) for k in a)  # SFT changed the weights


@pytest.mark.slow
def test_before_metrics_match_a_single_process_evaluation(two_rank_run):
    from shards.reader import stream
    from sicsrec.encode import embed_items

    root, dataset = two_rank_run
    held = json.loads((root / "full" / "held_out_pairs.json").read_text())
    model = initial_encoder(tiny_config(), dataset, seed=0)
    cache = embed_items(model, stream(root / "shards", "items", split=False), 7, torch.device("cpu"), progress=False)
    expected = retrieval_recall(cache.aligned(dataset.num_items), [tuple(p) for p in held], normalize=True)
    got = json.loads((root / "full" / "metrics.json").read_text())["before"]
    assert got == pytest.approx(expected)


@pytest.mark.slow
def test_encode_over_two_ranks(two_rank_run):
    root, dataset = two_rank_run
    out = root / "encode"
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    n = dataset.num_items
    assert m["encoder_source"] == "sft" and sum(m["items_per_rank"]) == n and min(m["items_per_rank"]) > 0
    text, image, has = (np.load(out / f) for f in ("text.npy", "image.npy", "has_image.npy"))
    assert text.shape == (n + 1, 8) and image.shape == (n + 1, 8) and has.shape == (n + 1,) and has.dtype == bool
    assert has.tolist() == [False] + [item.image is not None for item in dataset.items[1:]]
    assert not text[0].any() and not image[~has].any() and np.abs(text[1:]).sum(1).min() > 0
    reference = ContentEncoder.load(root / "full" / "encoder").eval()
    with torch.no_grad():
        np.testing.assert_allclose(text[1:], reference.encode_text(dataset.titles()[1:]).numpy(), atol=1e-5)
    assert json.loads((out / "encoders.json").read_text())["features"] == reference.extracted_features()


@pytest.mark.slow
def test_zero3_sft_with_grad_accumulation_on_cpu(two_rank_run):
    root, _ = two_rank_run
    m = json.loads((root / "zero3" / "metrics.json").read_text())
    assert (m["engine"], m["zero_stage"], m["world_size"], m["steps"]) == ("deepspeed", 3, 2, 6)  # micro steps
    assert np.isfinite(m["final_loss"])
    state = ContentEncoder.load(root / "zero3" / "encoder").state_dict()  # gathered: full shapes
    assert state["text.proj.weight"].shape == (8, 32)
    enc = json.loads((root / "encode3" / "manifest.json").read_text())["metrics"]
    assert enc["encoder_source"] == "sft" and enc["text_dim"] == 8 and sum(enc["items_per_rank"]) == 38


if __name__ == "__main__":  # torchrun worker: root
    root = Path(sys.argv[1])
    paths = (root / "prepare", root / "shards", root / "label")
    cfg = tiny_sft(engine="deepspeed", zero_stage=2, batch_size=8)  # micro batch 4 on each of 2 ranks
    sft(cfg, *paths, root / "full", seed=0)
    try:
        sft(cfg, *paths, root / "killed", seed=0, stop_after_epoch=0)
        raise SystemExit("stop_after_epoch did not stop")
    except TrainingInterrupted:
        pass
    torch.manual_seed(12345)  # a fresh process would not continue the old RNG stream
    sft(cfg, *paths, root / "killed", seed=0)
    encode(EncodeConfig(batch_size=5), root / "prepare", root / "shards", root / "full", root / "encode")
    sft(dataclasses.replace(cfg, zero_stage=3, epochs=1, batch_size=16, grad_accum=2), *paths, root / "zero3", seed=0)
    # straight after the stage: every rank must see its manifest (rank 0 writes it last)
    encode(EncodeConfig(), root / "prepare", root / "shards", root / "zero3", root / "encode3")

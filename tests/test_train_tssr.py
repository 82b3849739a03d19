"""TSSR trainer (stage train-tssr): config errors, the streamed batch's item inputs, the loss
weights, cache mode on 1 process, and one 2-rank DeepSpeed ZeRO-2 torchrun with tiny encoders in
the loop (uninterrupted run, run killed after epoch 0 and resumed, a grad-accumulation run),
checked against each other and against a single-process full-ranking evaluation."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher import stages
from launcher.config import Config, load_config
from shards.reader import EqualBatches
from sicsrec.encode import initial_encoder
from sicsrec.evaluate import evaluate
from sicsrec.losses import item_contrastive_loss, user_contrastive_loss
from sicsrec.runtime.rundir import run_stage
from sicsrec.train import TrainingInterrupted
from shards.collate import ItemInputs, ItemStore, SequenceCollate
from sicsrec.train_tssr import TSSRLoss, build_recommender, check_config
from tests.helpers import copy_run
from test_encoders import tiny_config

REPO = Path(__file__).resolve().parents[1]


def tiny_tssr(root: Path, *sets: str) -> Config:
    base = [f"run_dir={root}", "tssr.hidden=16", "tssr.heads=2", "tssr.uni_layers=1", "tssr.multi_layers=1",
            "tssr.dropout=0.1", "tssr.train.batch_size=8", "tssr.train.epochs=2", "tssr.train.patience=5",
            "tssr.train.lr=0.003", "tssr.train.max_len=6", "tssr.encode_batch_size=16"]
    encoders = [f"sft.encoders.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(tiny_config()).items()]
    return load_config(None, base + encoders + list(sets))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(synth_run, tmp_path_factory):
    root, dataset = synth_run
    return copy_run(root, tmp_path_factory.mktemp("tssr")), dataset


def test_bad_configs_give_clear_errors(data, tmp_path):
    root, _ = data
    with pytest.raises(ValueError, match="use_text and tssr.use_image are both false"):
        stages.run(tiny_tssr(root, "tssr.use_text=false", "tssr.use_image=false"), "train-tssr")
    with pytest.raises(ValueError, match="tssr.content must be one of"):
        stages.run(tiny_tssr(root, "tssr.content=frozen"), "train-tssr")
    with pytest.raises(ValueError, match="grad_accum=2 needs tssr.train.engine=deepspeed"):
        stages.run(tiny_tssr(root, "tssr.train.grad_accum=2", "tssr.train.engine=single"), "train-tssr")
    with pytest.raises(ValueError, match="sft.encoders.image_model is empty"):
        stages.run(tiny_tssr(root, "sft.encoders.image_model=none"), "train-tssr")
    with pytest.raises(FileNotFoundError, match="run `launcher encode` first"):
        stages.run(tiny_tssr(root, "tssr.content=cache", "tssr.train.engine=single"), "train-tssr")
    with pytest.raises(FileNotFoundError, match="run `launcher prepare` first"):
        stages.run(tiny_tssr(tmp_path, "tssr.train.engine=single"), "train-tssr")
    check_config(tiny_tssr(root).tssr, tiny_config())  # the defaults are fine


def test_collated_batch_holds_the_items_inputs(data):
    root, dataset = data
    encoder = initial_encoder(tiny_config(), dataset, seed=0)
    store = ItemStore.from_shards(root / "shards", dataset.num_items, progress=False)
    assert store.titles == dataset.titles()
    assert [j is not None for j in store.jpegs[1:]] == [it.image is not None for it in dataset.items[1:]]
    collate = SequenceCollate(4, ItemInputs(store, encoder.text.tokenizer, 16, encoder.image.transform(train=True), 32))
    batches = EqualBatches(root / "shards", "train", 5, 0, 1, decode_images=False, collate=collate)
    batch = next(iter(batches))
    by_user = {u.user: u.train for u in dataset.users}
    for row, user in enumerate(batch["users"].tolist()):
        window = by_user[user][-5:]
        assert batch["inputs"][row].tolist() == [0] * (5 - len(window)) + window[:-1]
        assert batch["targets"][row].tolist() == [0] * (5 - len(window)) + window[1:]
    ids = batch["content_ids"]
    assert ids.tolist() == sorted(set(batch["inputs"][batch["inputs"] != 0].tolist()))
    expected = encoder.text.tokenize([dataset.items[i].title for i in ids.tolist()])
    assert torch.equal(batch["content"]["tokens"]["input_ids"], expected["input_ids"])
    has = batch["content"]["has_image"]
    assert has.tolist() == [dataset.items[i].image is not None for i in ids.tolist()]
    assert batch["content"]["pixels"].shape == (len(ids), 3, 32, 32) and not batch["content"]["pixels"][~has].any()
    again = collate([{"user": u, "items": by_user[u]} for u in batch["users"].tolist()])  # seeded augmentation
    assert torch.equal(again["content"]["pixels"], batch["content"]["pixels"])


def test_loss_folds_the_three_weights(data):
    root, dataset = data
    cfg = tiny_tssr(root, "tssr.content=cache", "tssr.lambda_u=0.5", "tssr.lambda_i=2.0", "tssr.lambda_ce=3.0",
                    "tssr.dropout=0.0").tssr
    g = torch.Generator().manual_seed(0)
    tables = {"text": torch.randn(dataset.num_items + 1, 5, generator=g),
              "image": torch.randn(dataset.num_items + 1, 3, generator=g)}
    torch.manual_seed(0)
    model = build_recommender(cfg, dataset.num_items, tables)
    loss = TSSRLoss(model, cfg)
    batch = SequenceCollate(6, None)([{"user": u.user, "items": u.train} for u in dataset.users[:7]])
    loss.feed(batch)
    ce_sum, count, extra = loss(batch["inputs"], batch["targets"])
    # independent: the model on the items' concatenated cached features, the paper's eq. 4 terms
    out = model.tssr(batch["inputs"], torch.cat([tables["text"], tables["image"]], -1)[batch["inputs"]])
    real = batch["targets"] != 0
    ce = F.cross_entropy(model.tssr.logits(out.fused[real]), batch["targets"][real])
    l_u = user_contrastive_loss(out.id_states, out.content_states, out.real, cfg.temperature_u)
    l_i = item_contrastive_loss(out.id_states, out.content_states, out.id_emb, out.content_emb, batch["inputs"],
                                cfg.temperature_i)
    assert count == real.sum()
    assert (ce_sum / count).item() == pytest.approx(3.0 * ce.item(), rel=1e-5)
    assert extra.item() == pytest.approx(0.5 * l_u.item() + 2.0 * l_i.item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="no batch fed"):
        loss(batch["inputs"], batch["targets"])


def test_cache_mode_single_process(data):
    root, dataset = data
    g = np.random.default_rng(0)
    text = g.normal(size=(dataset.num_items + 1, 6)).astype(np.float32)

    def cache(out: Path) -> dict:
        np.save(out / "text.npy", text)
        return {}

    run_stage(root / "embeddings", "encode", {}, {}, cache)
    cfg = tiny_tssr(root, "tssr.content=cache", "tssr.use_image=false", "tssr.train.engine=single")
    with pytest.raises(FileNotFoundError, match="no image.npy"):
        stages.run(tiny_tssr(root, "tssr.content=cache", "tssr.train.engine=single"), "train-tssr")
    m = stages.run(cfg, "train-tssr")["metrics"]
    assert (m["model"], m["content"], m["engine"], m["world_size"], m["epochs_run"]) == ("tssr", "cache", "single", 1, 2)
    assert m["test"]["users"] == m["valid"]["users"] == len(dataset.users)  # full ranking over every user
    assert m["parameters"]["encoders"] == 0 and m["peak_memory_mb_per_rank"][0] > 0
    log = _log(root / "tssr")
    assert len(log) == 2 * 7 and all(math.isfinite(r["loss"]) for r in log)  # 60 users / batch 8
    best = torch.load(root / "tssr" / "best_model.pt", weights_only=True)
    assert not any(k.startswith("content.") for k in best)  # the frozen cache is not a weight
    model = build_recommender(cfg.tssr, dataset.num_items, {"text": torch.from_numpy(text)})
    model.load_state_dict(best)
    assert torch.equal(model.content.table, torch.from_numpy(text))
    assert stages.run(cfg, "train-tssr")["finished_at"] == json.loads((root / "tssr" / "manifest.json").read_text())["finished_at"]


# ------------------------------------------------------------------ 2 ranks, DeepSpeed ZeRO-2 on CPU

@pytest.fixture(scope="module")
def two_rank_run(data):
    root, dataset = data
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


@pytest.mark.slow
def test_zero2_end_to_end_resumes_to_the_uninterrupted_run(two_rank_run):
    root, dataset = two_rank_run
    full = json.loads((root / "full" / "tssr" / "metrics.json").read_text())
    assert (full["engine"], full["zero_stage"], full["world_size"], full["content"]) == ("deepspeed", 2, 2,
                                                                                       "end_to_end")
    assert full["micro_steps"] == full["optimizer_steps"] == 2 * 7  # 60 users / (2 ranks x 4), 2 epochs
    assert len(full["peak_memory_mb_per_rank"]) == 2 and min(full["peak_memory_mb_per_rank"]) > 0
    killed = json.loads((root / "killed" / "tssr" / "metrics.json").read_text())
    assert [r["epoch"] for r in _log(root / "killed" / "tssr")] == [0] * 7 + [1] * 7
    assert _log(root / "killed" / "tssr") == _log(root / "full" / "tssr")
    for split in ("valid", "test"):
        assert killed[split] == full[split] and full[split]["users"] == len(dataset.users)
    a = torch.load(root / "full" / "tssr" / "best_model.pt", weights_only=True)
    b = torch.load(root / "killed" / "tssr" / "best_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_encoders_train_in_the_loop(two_rank_run):
    root, dataset = two_rank_run
    best = torch.load(root / "full" / "tssr" / "best_model.pt", weights_only=True)
    initial = initial_encoder(tiny_config(), dataset, seed=0).state_dict()
    encoder_keys = [k for k in best if k.startswith("content.")]
    assert {k[len("content."):] for k in encoder_keys} == set(initial)  # text and image encoders, in full
    changed = [k for k in encoder_keys if not torch.equal(best[k], initial[k[len("content."):]])]
    assert any(k.startswith("content.text.backbone") for k in changed)
    assert any(k.startswith("content.image.backbone") for k in changed)


@pytest.mark.slow
def test_full_ranking_matches_a_single_process_evaluation(two_rank_run):
    """The 2-rank evaluation (items encoded once, split over ranks, all-gathered) against one
    process encoding every item itself with the best weights."""
    root, dataset = two_rank_run
    cfg = tiny_tssr(root / "full")
    model = build_recommender(cfg.tssr, dataset.num_items, initial_encoder(tiny_config(), dataset, seed=0))
    model.load_state_dict(torch.load(root / "full" / "tssr" / "best_model.pt", weights_only=True))
    model.eval()
    store = ItemStore.from_shards(root / "shards", dataset.num_items, progress=False)
    text, image = model.content.text, model.content.image
    inputs_of = ItemInputs(store, text.tokenizer, text.max_len, image.transform(train=False), image.image_size)
    with torch.no_grad():
        table = torch.cat([torch.zeros(1, model.content.dim)] +
                          [model.content(inputs_of([i])) for i in range(1, dataset.num_items + 1)])
        expected = evaluate(lambda h: model.tssr.logits(model.tssr(h, table[h]).fused[:, -1]), dataset, "test",
                            cfg.tssr.train.max_len, diagnostics=True)
    got = json.loads((root / "full" / "tssr" / "metrics.json").read_text())["test"]
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_steps_the_optimizer_every_other_micro_batch(two_rank_run):
    root, _ = two_rank_run
    m = json.loads((root / "accum" / "tssr" / "metrics.json").read_text())
    assert (m["zero_stage"], m["grad_accum"], m["micro_steps"], m["optimizer_steps"]) == (2, 2, 6, 3)
    assert m["use_image"] is False and m["parameters"]["encoders"] < 37707  # text only: no image encoder


def _worker_runs(root: Path) -> None:
    for name in ("full", "killed", "accum"):
        for stage in ("prepare", "shards"):
            link = root / name / stage
            link.parent.mkdir(exist_ok=True)
            if not link.exists():
                link.symlink_to(root / stage)
    zero2 = ("tssr.train.engine=deepspeed", "tssr.train.zero_stage=2")
    stages.run(tiny_tssr(root / "full", *zero2), "train-tssr")
    killed = tiny_tssr(root / "killed", *zero2)
    try:
        stages.run(killed, "train-tssr", stop_after_epoch=0)
        raise SystemExit("stop_after_epoch did not stop")
    except TrainingInterrupted:
        pass
    torch.manual_seed(12345)  # a fresh process would not continue the old RNG stream
    stages.run(killed, "train-tssr")
    stages.run(tiny_tssr(root / "accum", *zero2, "tssr.train.grad_accum=2", "tssr.train.batch_size=16",
                         "tssr.steps_per_epoch=7", "tssr.use_image=false",
                         "tssr.train.epochs=1"), "train-tssr")


if __name__ == "__main__":  # torchrun worker: root
    import logging

    logging.basicConfig(level=logging.INFO)
    _worker_runs(Path(sys.argv[1]))


@pytest.mark.slow
def test_memory_benchmark_runs_on_one_cpu_process(tmp_path):
    """benchmarks/tssr_memory.py end to end (1 process, ZeRO 0 and 1, checkpointing on): every row
    holds exactly AdamW's two fp32 moments per parameter (1 rank: ZeRO partitions nothing)."""
    out = tmp_path / "memory.json"
    with socket.socket() as s:  # DeepSpeed sets up a 1-process group: not on the default port other jobs may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", CUDA_VISIBLE_DEVICES="",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, str(REPO / "benchmarks" / "tssr_memory.py"), "--stages", "0,1", "--micro", "2",
           "--checkpointing", "on", "--steps", "1", "--warmup", "0", "--items", "40", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 1 and [r["zero_stage"] for r in report["rows"]] == [0, 1]
    for row in report["rows"]:
        assert row["grad_checkpointing"] and row["micro_batch"] == 2 and row["step_seconds"] > 0
        assert row["optimizer_state_mb_per_rank"][0] == pytest.approx(row["parameters"] * 8 / 2 ** 20, abs=0.01)
        assert row["peak_mb_per_rank"][0] > 0
    assert "| ZeRO | micro batch |" in proc.stdout

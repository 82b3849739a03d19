"""ID-encoder training (SICSRec step 1): data order, early stopping, resume, and 1 rank vs 2 ranks
(DDP and DeepSpeed ZeRO on gloo) following the same loss curve on the same global batch."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shards.prepared import Item, PreparedDataset, UserSequence
from shards.windows import epoch_batches, rank_slice, train_windows
from sicsrec.config import TrainConfig
from sicsrec.evaluate import evaluate
from sicsrec.train import TrainingInterrupted, load_id_encoder, train_id

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, layers=1, heads=2, max_len=8, batch_size=8, eval_batch_size=16, lr=3e-3)


def make_dataset(root: Path, num_users=30, num_items=25, seed=0) -> Path:
    """Users drift through item ids (so a model can learn something), lengths 3..20."""
    g = torch.Generator().manual_seed(seed)
    users = []
    for u in range(1, num_users + 1):
        n = int(torch.randint(3, 21, (1,), generator=g))
        start = int(torch.randint(0, num_items, (1,), generator=g))
        seq = [(start + 2 * k + int(torch.randint(0, 2, (1,), generator=g))) % num_items + 1 for k in range(n)]
        users.append(UserSequence(u, f"u{u}", seq[:-2], seq[-2], seq[-1]))
    PreparedDataset([Item(i, f"i{i}", f"item {i}", None) for i in range(1, num_items + 1)], users).save(root)
    return root


def test_windows_and_batches():
    users = [UserSequence(1, "a", list(range(1, 13)), 13, 14), UserSequence(2, "b", [5], 6, 7)]
    ds = PreparedDataset([Item(i, str(i), "", None) for i in range(1, 15)], users)
    assert train_windows(ds, max_len=4, windows="last") == [[8, 9, 10, 11, 12]]
    windows = train_windows(ds, max_len=4, windows="all")
    assert windows == [[8, 9, 10, 11, 12], [4, 5, 6, 7, 8], [1, 2, 3, 4]]
    assert sorted(t for w in windows for t in w[1:]) == list(range(2, 13))  # every train item but the first, once
    batches = epoch_batches(11, 4, seed=3, epoch=2)
    assert [len(b) for b in batches] == [4, 4, 3]
    assert torch.equal(torch.cat(batches), torch.cat(epoch_batches(11, 4, seed=3, epoch=2)))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(11, 4, seed=3, epoch=3)))
    parts = [rank_slice(batches[2], r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), batches[2]) and [len(p) for p in parts] == [2, 1]


def test_strided_windows_train_on_every_target_once(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    users = PreparedDataset.load(prepared).users
    targets = sum(max(len(u.train) - 1, 0) for u in users)
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=1, patience=1, windows="all", window_stride=3)
    train_id(cfg, prepared, tmp_path / "out", seed=0)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    epoch = [h for h in history if not h.get("start")][0]
    assert epoch["targets"] == targets  # each train target once per epoch, in more windows than stride 0
    assert epoch["sequences"] == len(train_windows(PreparedDataset.load(prepared), 8, "all", 3))
    assert epoch["sequences"] > len(train_windows(PreparedDataset.load(prepared), 8, "all"))
    with pytest.raises(ValueError, match="stride"):
        train_id(dataclasses.replace(cfg, windows="last"), prepared, tmp_path / "bad", seed=0)


def test_early_stopping_and_skip(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**dict(TINY, lr=0.0), dropout=0.0, epochs=10, patience=2)
    m = train_id(cfg, prepared, tmp_path / "out", seed=0)["metrics"]
    # lr 0: validation never improves after epoch 0, so training stops after patience more epochs
    assert m["best_epoch"] == 0 and m["epochs_run"] == 3 and m["early_stopped"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["test"] == m["test"] and set(saved["test"]) >= {"hit@5", "ndcg@10", "hit@20", "ndcg@20"}
    assert saved["sequences_per_s"] > 0 and saved["seconds_per_epoch"] > 0
    assert (tmp_path / "out" / "tensorboard").is_dir()
    again = train_id(cfg, prepared, tmp_path / "out", seed=0)  # manifest matches: skipped
    assert again["metrics"] == m
    encoder = load_id_encoder(tmp_path / "out")  # what SICSRec step 2 starts from
    assert evaluate(encoder.score_all, PreparedDataset.load(prepared), "test", cfg.max_len, batch_size=16,
                    diagnostics=True) == m["test"]


def test_test_and_valid_user_samples_are_seeded_and_stated(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=1, patience=1, eval_users=12, test_users=9)
    m = train_id(cfg, prepared, tmp_path / "out", seed=0)["metrics"]
    assert (m["test"]["users"], m["test"]["user_sample_of"]) == (9, 30)
    assert (m["valid"]["users"], m["valid"]["user_sample_of"]) == (12, 30)
    encoder = load_id_encoder(tmp_path / "out")  # the same sample the stage ranked (user seed 0)
    alone = evaluate(encoder.score_all, PreparedDataset.load(prepared), "test", cfg.max_len, batch_size=16,
                     user_sample=9, diagnostics=True)
    assert alone == m["test"]


def test_gru4rec_and_all_windows_train(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**dict(TINY, lr=1e-2), model="gru4rec", windows="all", dropout=0.0, epochs=4, patience=4)
    train_id(cfg, prepared, tmp_path / "out", seed=0)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [h["loss"] for h in m["history"]]
    assert losses[-1] < losses[0] and m["model"] == "gru4rec"


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.3, epochs=4, patience=4)  # dropout: the RNG state must be restored
    full = train_id(cfg, prepared, tmp_path / "full", seed=1)["metrics"]
    with pytest.raises(TrainingInterrupted):
        train_id(cfg, prepared, tmp_path / "killed", seed=1, stop_after_epoch=1)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    torch.manual_seed(12345)  # a fresh process would not continue the old RNG stream
    resumed = train_id(cfg, prepared, tmp_path / "killed", seed=1)["metrics"]
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["epochs_run"] == 4
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    forced = train_id(cfg, prepared, tmp_path / "killed", seed=1, force=True)["metrics"]
    assert forced["test"] == full["test"]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _torchrun(prepared: Path, out: Path, cfg: TrainConfig) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, str(prepared), str(out), json.dumps(dataclasses.asdict(cfg))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stderr.count("resumed from") == 2  # both ranks continued from the epoch-0 checkpoint


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    prepared = make_dataset(root / "prepare", num_users=37)
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=2, patience=5, engine="single")
    metrics = train_id(cfg, prepared, root / "single", seed=0)["metrics"]
    return root, prepared, cfg, metrics


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_ranks_follow_the_single_process_loss_curve(single_run, engine):
    """The 2-rank run is also interrupted after epoch 0 and resumed from its own checkpoint."""
    root, prepared, cfg, single = single_run
    _torchrun(prepared, root / engine, dataclasses.replace(cfg, engine=engine))
    got = json.loads((root / engine / "metrics.json").read_text())
    assert got["engine"] == engine and got["world_size"] == 2
    assert got["zero_stage"] == (json.loads((REPO / "ds_config.json").read_text())["zero_optimization"]["stage"]
                                 if engine == "deepspeed" else 0)
    expected_losses = _losses(root / "single")
    assert len(expected_losses) == 10  # 37 windows in global batches of 8: 5 steps x 2 epochs
    assert _losses(root / engine) == pytest.approx(expected_losses, rel=1e-5)
    for split in ("valid", "test"):
        assert got[split]["users"] == 37
        for name, value in single[split].items():
            assert got[split][name] == pytest.approx(value, abs=1e-6), (split, name)


if __name__ == "__main__":  # a torchrun worker: prepared_dir out_dir config-json; killed after epoch 0, resumed
    import logging

    logging.basicConfig(level=logging.INFO)
    worker_cfg, worker_in, worker_out = TrainConfig(**json.loads(sys.argv[3])), Path(sys.argv[1]), Path(sys.argv[2])
    try:
        train_id(worker_cfg, worker_in, worker_out, seed=0, stop_after_epoch=0)
        raise SystemExit("stop_after_epoch did not stop")
    except TrainingInterrupted:
        pass
    assert json.loads((worker_out / "train_log.jsonl").read_text().splitlines()[-1])["epoch"] == 0
    train_id(worker_cfg, worker_in, worker_out, seed=0)

"""Full-ranking metrics against hand-computed rankings, and sharded evaluation across ranks."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shards.prepared import Item, PreparedDataset, UserSequence
from sicsrec.evaluate import evaluate, metric_sums, target_ranks
from sicsrec.models.sasrec import SASRec

NEG = float("-inf")


def test_ranks_count_strictly_higher_items_and_ties_both_ways():
    # items 1..5; column 0 is padding and must never count even with a huge score
    scores = torch.tensor([[99.0, 0.1, 0.5, 0.3, 0.5, 0.2],
                           [99.0, 0.1, 0.5, 0.3, 0.5, 0.2],
                           [99.0, 0.1, 0.5, 0.3, 0.5, 0.2],
                           [99.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([3, 2, 1, 4])
    # target 3 (0.3): items 2 and 4 higher -> 2; target 2 (0.5): item 4 ties; target 1 (0.1): 4 higher;
    # constant scores: all 4 others tie
    assert target_ranks(scores, targets, ties="optimistic").tolist() == [2, 0, 4, 0]
    assert target_ranks(scores, targets).tolist() == [2, 1, 4, 4]  # pessimistic is the default


def test_history_masking_on_and_off():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    targets = torch.tensor([4, 2])
    histories = [[1, 3, 5], [2, 1]]  # row 2 saw its own target before: the target is never masked
    assert target_ranks(scores, targets).tolist() == [3, 1]
    assert target_ranks(scores, targets, histories).tolist() == [1, 0]
    assert target_ranks(scores, targets, [[], []]).tolist() == [3, 1]


def test_metric_values_hand_computed_and_k_beyond_item_count():
    ranks = torch.tensor([0, 2, 6, 30])
    sums = metric_sums(ranks, ks=(5, 10, 50))
    assert sums["hit@5"] == 2 and sums["hit@10"] == 3 and sums["hit@50"] == 4
    assert sums["ndcg@5"] == pytest.approx(1 + 1 / math.log2(4))
    assert sums["ndcg@10"] == pytest.approx(1 + 0.5 + 1 / 3)
    assert sums["ndcg@50"] == pytest.approx(1 + 0.5 + 1 / 3 + 1 / math.log2(32))
    # K = 20 with only 5 items: every target is a hit
    scores = torch.tensor([[0.0, 5, 4, 3, 2, 1]])
    sums = metric_sums(target_ranks(scores, torch.tensor([5])), ks=(20,))
    assert sums == {"hit@20": 1.0, "ndcg@20": pytest.approx(1 / math.log2(6))}


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="item ids"):
        target_ranks(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([0]))


def hand_dataset() -> PreparedDataset:
    items = [Item(i, f"i{i}", f"title {i}", None) for i in range(1, 6)]
    users = [UserSequence(1, "a", [1, 2], 3, 4),   # test history [1, 2, 3]
             UserSequence(2, "b", [5], 1, 2),      # test history [5, 1]
             UserSequence(3, "c", [4, 3, 2], 5, 1)]
    return PreparedDataset(items, users)


def test_evaluate_with_a_fixed_score_function_matches_hand_ranking():
    ds = hand_dataset()
    fixed = torch.tensor([0.0, 0.5, 0.4, 0.3, 0.2, 0.1])  # item 1 best ... item 5 worst

    def score_fn(histories):
        assert histories.shape == (len(histories), 4) and (histories[:, -1] != 0).all()
        return fixed.expand(len(histories), -1).clone()

    # test targets 4, 2, 1 -> ranks 3, 1, 0 without masking
    got = evaluate(score_fn, ds, "test", max_len=4, ks=(1, 2, 5))
    assert got["users"] == 3
    assert got["hit@1"] == pytest.approx(1 / 3) and got["hit@2"] == pytest.approx(2 / 3) and got["hit@5"] == 1
    assert got["ndcg@5"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(3) + 1) / 3)
    # masking: user a drops 1, 2, 3 -> rank 0; user b drops 5, 1 -> rank 0; user c (target 1) stays 0
    masked = evaluate(score_fn, ds, "test", max_len=4, ks=(1,), mask_history=True)
    assert masked["hit@1"] == 1.0
    # valid split: targets 3, 1, 5 -> ranks 2, 0, 4
    valid = evaluate(score_fn, ds, "valid", max_len=4, ks=(1, 3))
    assert valid["hit@1"] == pytest.approx(1 / 3) and valid["hit@3"] == pytest.approx(2 / 3)


def random_dataset(num_users=23, num_items=30, seed=0) -> PreparedDataset:
    g = torch.Generator().manual_seed(seed)
    items = [Item(i, str(i), "", None) for i in range(1, num_items + 1)]
    users = []
    for u in range(1, num_users + 1):
        n = int(torch.randint(3, 15, (1,), generator=g))
        seq = (torch.randint(1, num_items + 1, (n,), generator=g)).tolist()
        users.append(UserSequence(u, str(u), seq[:-2], seq[-2], seq[-1]))
    return PreparedDataset(items, users)


def _model():
    torch.manual_seed(0)
    return SASRec(30, hidden=16, layers=1, heads=2, dropout=0.0, max_len=8).eval()


def _eval_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {f"{s}-{m}": evaluate(_model().score_all, random_dataset(), s, max_len=8, batch_size=4, mask_history=m)
                  for s in ("valid", "test") for m in (False, True)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_equals_single_process(tmp_path):
    single = {f"{s}-{m}": evaluate(_model().score_all, random_dataset(), s, max_len=8, batch_size=5, mask_history=m)
              for s in ("valid", "test") for m in (False, True)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eval_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        for key, expected in single.items():
            assert shard[key]["users"] == 23  # 12 + 11 users: no padded duplicates
            for name, value in expected.items():
                assert shard[key][name] == pytest.approx(value, abs=1e-12), (key, name)
    assert single["test-False"] != single["test-True"]  # masking matters on this data

"""Full-ranking metrics against hand-computed rankings, chunked and sharded evaluation across ranks."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shards.prepared import Item, PreparedDataset, UserSequence
from shards.windows import pad_left
from sicsrec.evaluate import RankCounter, evaluate, item_chunks, item_range, metric_sums, sample_users, target_ranks
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


def spawn_two_ranks(worker, tmp_path) -> None:
    """Run worker(rank, 2, port, tmp_path) on 2 gloo ranks (a free loopback port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2)


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(tmp_path):
    single = {f"{s}-{m}": evaluate(_model().score_all, random_dataset(), s, max_len=8, batch_size=5, mask_history=m)
              for s in ("valid", "test") for m in (False, True)}
    spawn_two_ranks(_eval_worker, tmp_path)
    for rank in range(2):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        for key, expected in single.items():
            assert shard[key]["users"] == 23  # 12 + 11 users: no padded duplicates
            for name, value in expected.items():
                assert shard[key][name] == pytest.approx(value, abs=1e-12), (key, name)
    assert single["test-False"] != single["test-True"]  # masking matters on this data


# --- chunked ranking (item_chunk), item tables, item sharding, top-K, user samples, equal batches ---

def reference_ranks(scores, targets, histories=None, ties="pessimistic"):
    """The full-matrix ranking as it was before chunking (one [B, N+1] matrix, masked by -inf)."""
    scores = scores.float().clone()
    scores[:, 0] = NEG
    target_scores = scores.gather(1, targets[:, None])
    if histories is not None:
        for row, history in enumerate(histories):
            scores[row, list(history)] = NEG
        scores.scatter_(1, targets[:, None], target_scores)
    higher = (scores > target_scores).sum(1)
    return higher if ties == "optimistic" else higher + (scores == target_scores).sum(1) - 1


def planted_ties(rows=40, num_items=50, seed=0):
    """Scores from 5 levels (many ties) plus some distinct ones; targets; histories with repeats
    and sometimes the target itself."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (rows, num_items + 1), generator=g).float() / 4
    scores[:, ::7] = torch.rand(rows, len(range(0, num_items + 1, 7)), generator=g)
    targets = torch.randint(1, num_items + 1, (rows,), generator=g)
    histories = [torch.randint(1, num_items + 1, (int(n),), generator=g).tolist() + ([int(t)] if r % 3 == 0 else [])
                 for r, (n, t) in enumerate(zip(torch.randint(0, 12, (rows,), generator=g), targets))]
    return scores, targets, histories


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("mask", [False, True])
def test_chunked_ranks_equal_the_full_matrix_ranking_with_planted_ties(ties, mask):
    scores, targets, histories = planted_ties()
    histories = histories if mask else None
    expected = reference_ranks(scores, targets, histories, ties)
    assert expected.unique().numel() > 10  # a spread of ranks, not all tied
    for chunk in (0, 1, 2, 7, 49, 50, 51, 1000):
        assert target_ranks(scores, targets, histories, ties, item_chunk=chunk).tolist() == expected.tolist(), chunk


def last_item_scorer(scores):
    """A user's scores = row `last history item` of the planted matrix, as a full score_fn and as
    (one-hot user representation, item table): one-hot products are exact in fp32."""
    table = scores.T.contiguous()  # [items, dims]: item j's row holds column j of the planted matrix

    def score_fn(histories):
        return scores[histories[:, -1]]

    def user_fn(histories):
        return torch.nn.functional.one_hot(histories[:, -1], scores.shape[0]).float()

    return score_fn, user_fn, table


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("mask", [False, True])
def test_evaluate_on_an_item_table_in_chunks_equals_the_score_matrix(ties, mask):
    ds = random_dataset()  # 30 items
    scores, _, _ = planted_ties(rows=31, num_items=30, seed=1)
    score_fn, user_fn, table = last_item_scorer(scores)
    kw = dict(max_len=8, batch_size=5, ks=(1, 5, 10, 50), ties=ties, mask_history=mask)  # 50 > 30 items
    for split in ("valid", "test"):
        expected = evaluate(score_fn, ds, split, **kw)
        for chunk in (0, 1, 4, 30, 31, 100):
            assert evaluate(score_fn, ds, split, item_chunk=chunk, **kw) == expected, chunk
            assert evaluate(user_fn, ds, split, item_table=table, item_chunk=chunk, **kw) == expected, chunk
        assert evaluate(user_fn, ds, split, item_table=lambda ids: table[ids], item_chunk=7, **kw) == expected


def test_evaluate_on_a_model_item_table_equals_its_score_matrix():
    model, ds = _model(), random_dataset()
    for mask in (False, True):
        expected = evaluate(model.score_all, ds, "test", 8, batch_size=5, mask_history=mask)
        for chunk in (0, 4, 64):
            got = evaluate(model.sequence_repr, ds, "test", 8, batch_size=5, mask_history=mask,
                           item_table=model.item_emb.weight, item_chunk=chunk)
            assert got == expected


def test_evaluate_with_a_learned_history_bias_equals_the_models_own_scores():
    """SASRec(history_bias=True): evaluate on its item table with history_bias = its score_all
    (which adds the bias to the history items' scores itself), diagnostics included."""
    torch.manual_seed(0)
    model, ds = SASRec(30, hidden=16, layers=1, heads=2, dropout=0.0, max_len=8, history_bias=True).eval(), random_dataset()
    with torch.no_grad():
        model.history_logit.fill_(-0.3)
    bias = float(model.history_bias().detach())
    assert bias == pytest.approx(-3.0)
    with torch.no_grad():
        for split in ("valid", "test"):
            expected = evaluate(model.score_all, ds, split, 8, batch_size=5, diagnostics=True)
            got = evaluate(model.sequence_repr, ds, split, 8, batch_size=5, item_table=model.item_table(),
                           item_chunk=7, history_bias=bias, diagnostics=True)
            assert got == pytest.approx(expected)
            plain = evaluate(model.sequence_repr, ds, split, 8, batch_size=5, item_table=model.item_table(),
                             diagnostics=True)
            assert plain["top1_in_history"] > got["top1_in_history"]


def read_top_k(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_top_k_file_equals_torch_topk_of_the_full_score_matrix(tmp_path):
    ds = random_dataset()
    scores = torch.rand(31, 31, generator=torch.Generator().manual_seed(2))  # distinct: no tie order to guess
    score_fn, user_fn, table = last_item_scorer(scores)
    histories = pad_left([u.history("test") for u in ds.users], 8)
    full = score_fn(histories)[:, 1:]
    for mask in (False, True):
        if mask:
            full = full.clone()
            for row, u in enumerate(ds.users):
                full[row, [i - 1 for i in set(u.history("test")) - {u.test}]] = NEG
        top_scores, top_items = full.topk(5, dim=1)
        path = tmp_path / f"top{mask}.jsonl"
        evaluate(user_fn, ds, "test", 8, batch_size=4, mask_history=mask, item_table=table, item_chunk=3,
                 top_k=5, top_k_path=path)
        got = read_top_k(path)
        assert [r["user"] for r in got] == [u.user for u in ds.users]
        assert [r["items"] for r in got] == (top_items + 1).tolist()
        assert [r["scores"] for r in got] == top_scores.tolist()
    # K beyond the candidates: every item once, placeholders left out
    evaluate(score_fn, ds, "test", 8, top_k=40, top_k_path=tmp_path / "all.jsonl", item_chunk=7)
    assert all(sorted(r["items"]) == list(range(1, 31)) for r in read_top_k(tmp_path / "all.jsonl"))


def test_a_user_sample_is_seeded_stated_and_ranks_every_item():
    ds, model = random_dataset(), _model()
    got = evaluate(model.score_all, ds, "test", 8, batch_size=4, user_sample=10, user_seed=3)
    assert (got["users"], got["user_sample_of"], got["user_sample_seed"]) == (10, 23, 3)
    assert evaluate(model.score_all, ds, "test", 8, batch_size=4, user_sample=10, user_seed=3) == got
    sample, _ = sample_users(ds.users, 10, 3)
    assert sample != sample_users(ds.users, 10, 4)[0] and len({u.user for u in sample}) == 10
    alone = evaluate(model.score_all, PreparedDataset(ds.items[1:], sample), "test", 8, batch_size=4)
    assert {k: v for k, v in got.items() if not k.startswith("user_sample")} == alone
    assert "user_sample_of" not in evaluate(model.score_all, ds, "test", 8, user_sample=23)  # all users: no sample


def test_equal_batches_give_every_rank_the_same_number_of_forward_calls():
    ds, model = random_dataset(), _model()  # 23 users on 2 ranks: 12 and 11; batches of 11 -> 2 and 1
    for batch_size, natural in ((6, [2, 2]), (11, [2, 1]), (30, [1, 1])):
        for equal in (None, False):
            calls = []
            for rank in range(2):
                def counted(histories):
                    calls.append((rank, len(histories)))
                    return model.score_all(histories)
                evaluate(counted, ds, "test", 8, batch_size=batch_size, rank=rank, world_size=2, equal_batches=equal)
            per_rank = [sum(r == rank for r, _ in calls) for rank in range(2)]
            assert per_rank == ([max(natural)] * 2 if equal is None else natural)
            assert sum(n for _, n in calls) == 23 + (per_rank[0] - natural[0]) + (per_rank[1] - natural[1])


def _sharded_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(sharded_results(rank, world, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sharded_results(rank, world, out_dir):
    """Item-sharded (and one user-sharded) evaluations; with world=1 the single-process ones."""
    ds, model = random_dataset(), _model()
    scores, _, _ = planted_ties(rows=31, num_items=30, seed=1)
    _, user_fn, table = last_item_scorer(scores)
    start, end = item_range(30, rank, world)
    out = {}
    for mask in (False, True):
        for ties in ("pessimistic", "optimistic"):
            kw = dict(batch_size=4, mask_history=mask, ties=ties, item_shard=True)
            out[f"planted-{mask}-{ties}"] = evaluate(user_fn, ds, "test", 8, item_table=table, item_chunk=3, **kw)
            out[f"planted-slice-{mask}-{ties}"] = evaluate(user_fn, ds, "test", 8, item_table=table[start:end], **kw)
        out[f"model-{mask}"] = evaluate(model.sequence_repr, ds, "valid", 8, batch_size=5, mask_history=mask,
                                        item_table=model.item_emb.weight, item_chunk=4, item_shard=True)
        out[f"model-users-{mask}"] = evaluate(model.sequence_repr, ds, "valid", 8, batch_size=5, mask_history=mask,
                                              item_table=model.item_emb.weight, item_chunk=4)
    evaluate(model.sequence_repr, ds, "test", 8, batch_size=4, item_table=model.item_emb.weight, item_chunk=4,
             item_shard=True, top_k=6, top_k_path=os.path.join(out_dir, f"top{world}.jsonl"))
    return out


@pytest.mark.slow
def test_item_sharded_evaluation_on_two_ranks_equals_single_process(tmp_path):
    single = sharded_results(0, 1, str(tmp_path))
    assert single["planted-False-pessimistic"] != single["planted-True-pessimistic"]
    assert single["planted-True-pessimistic"] != single["planted-True-optimistic"]
    spawn_two_ranks(_sharded_worker, tmp_path)
    for rank in range(2):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        assert shard.keys() == single.keys()
        for key, expected in single.items():
            assert shard[key]["users"] == 23
            for name, value in expected.items():
                assert shard[key][name] == pytest.approx(value, abs=1e-12), (key, name)
    two, one = read_top_k(tmp_path / "top2.jsonl"), read_top_k(tmp_path / "top1.jsonl")
    assert [r["items"] for r in two] == [r["items"] for r in one] and len(one) == 23
    flat = lambda rows: [s for r in rows for s in r["scores"]]  # noqa: E731
    assert flat(two) == pytest.approx(flat(one), abs=1e-6)


# --- ranking diagnostics (diagnostics=True): hit@1, MRR, median rank, top-1 in history / last, repeats ---

def diagnostics_case():
    """4 users on items 1..5, each scored by a row chosen by its last history item (test split):
    history [1, 2, 3] -> 3, [4, 5] -> 1, [2, 3, 1] -> 4, [4, 5, 2] -> 4 (a repeat, as is the first)."""
    items = [Item(i, f"i{i}", "", None) for i in range(1, 6)]
    users = [UserSequence(1, "a", [1, 2], 3, 3), UserSequence(2, "b", [4], 5, 1),
             UserSequence(3, "c", [2, 3], 1, 4), UserSequence(4, "d", [4, 5], 2, 4)]
    rows = torch.zeros(6, 6)
    rows[3] = torch.tensor([0, 0.1, 0.7, 0.9, 0.2, 0.3])  # user a: top-1 item 3 = its target and last item
    rows[5] = torch.tensor([0, 0.5, 0.5, 0.1, 0.2, 0.4])  # user b: items 1, 2 tie on top -> item 1
    rows[1] = torch.tensor([0, 0.2, 0.9, 0.1, 0.3, 0.4])  # user c: top-1 item 2 (history, not last)
    rows[2] = torch.tensor([0, 0.6, 0.8, 0.3, 0.1, 0.8])  # user d: items 2 (its last), 5 tie on top -> 2
    return PreparedDataset(items, users), rows


DIAGNOSTIC_KEYS = {"hit@1", "mrr", "median_rank", "top1_in_history", "top1_is_last", "target_is_repeat"}


def test_diagnostics_hand_computed():
    ds, rows = diagnostics_case()
    score_fn, user_fn, table = last_item_scorer(rows)
    plain = evaluate(score_fn, ds, "test", 4, ks=(5,))
    assert not DIAGNOSTIC_KEYS & set(plain)  # opt-in
    got = evaluate(score_fn, ds, "test", 4, ks=(5,), diagnostics=True)
    assert set(got) == {"hit@5", "ndcg@5", "users"} | DIAGNOSTIC_KEYS
    assert {k: got[k] for k in plain} == plain
    # pessimistic ranks (0-based): a 0, b 1 (item 2 ties with its target), c 2 (items 2, 5 above), d 4
    assert got["hit@1"] == 0.25 and got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 5) / 4)
    assert got["median_rank"] == 2.5  # 1-based ranks 1, 2, 3, 5
    # top-1s 3, 1, 2, 2: in history for a, c, d; the last item for a, d; targets 3 and 4 repeat for a, d
    assert (got["top1_in_history"], got["top1_is_last"], got["target_is_repeat"]) == (0.75, 0.5, 0.5)
    optimistic = evaluate(score_fn, ds, "test", 4, ks=(5,), ties="optimistic", diagnostics=True)
    assert optimistic["hit@1"] == 0.5 and optimistic["median_rank"] == 2.0  # ranks 1, 1, 3, 5
    assert optimistic["mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 5) / 4)
    # masking: a keeps 3 (its target); b's top-1 is still 1 (rank 1); c ranks 4, 5 only -> top-1 5, rank 1;
    # d ranks 1, 3, 4 (4 is its target) -> top-1 1, rank 2
    masked = evaluate(score_fn, ds, "test", 4, ks=(5,), mask_history=True, diagnostics=True)
    assert masked["hit@1"] == 0.25 and masked["median_rank"] == 2.0  # 1-based ranks 1, 2, 2, 3
    assert masked["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 3) / 4)
    assert (masked["top1_in_history"], masked["top1_is_last"], masked["target_is_repeat"]) == (0.25, 0.25, 0.5)
    # hit@1 in ks as well: the same value, one key
    both = evaluate(score_fn, ds, "test", 4, ks=(1, 5), diagnostics=True)
    assert both["hit@1"] == 0.25 and list(both).count("hit@1") == 1
    # the same through an item table, in chunks of every size, in batches of every size
    for chunk in (0, 1, 2, 3, 5, 9):
        for batch_size in (1, 3, 4):
            for kw in (dict(), dict(mask_history=True)):
                expected = masked if kw else got
                assert evaluate(score_fn, ds, "test", 4, batch_size, ks=(5,), item_chunk=chunk,
                                diagnostics=True, **kw) == expected, (chunk, batch_size, kw)
                assert evaluate(user_fn, ds, "test", 4, batch_size, ks=(5,), item_table=table, item_chunk=chunk,
                                diagnostics=True, **kw) == expected, (chunk, batch_size, kw)


def test_median_rank_of_odd_and_even_counts():
    from sicsrec.evaluate import median_rank
    assert median_rank(torch.tensor([4, 0, 2])) == 3.0
    assert median_rank(torch.tensor([0, 3, 1, 8])) == 3.0  # 1-based 1, 2, 4, 9 -> (2 + 4) / 2
    assert median_rank(torch.tensor([0])) == 1.0


def reference_diagnostics(scores, ds, split, mask, ties):
    """Diagnostics from one full [users, N+1] matrix: ranks as reference_ranks, top-1 the first argmax."""
    histories = [u.history(split) for u in ds.users]
    targets = torch.tensor([u.target(split) for u in ds.users])
    ranks = reference_ranks(scores, targets, histories if mask else None, ties).double()
    masked = scores.float().clone()
    masked[:, 0] = NEG
    if mask:
        for row, (h, t) in enumerate(zip(histories, targets.tolist())):
            masked[row, list(set(h) - {t})] = NEG
    top1 = masked.argmax(1).tolist()
    n, ordered = len(ds.users), (ranks.sort().values + 1).tolist()
    return {"hit@1": float((ranks == 0).double().mean()), "mrr": float((1 / (ranks + 1)).mean()),
            "median_rank": ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2,
            "top1_in_history": sum(t in h for t, h in zip(top1, histories)) / n,
            "top1_is_last": sum(t == h[-1] for t, h in zip(top1, histories)) / n,
            "target_is_repeat": sum(t in h for t, h in zip(targets.tolist(), histories)) / n}


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("mask", [False, True])
def test_diagnostics_chunked_equal_unchunked_and_the_full_matrix_with_planted_ties(ties, mask):
    ds = random_dataset()  # 23 users (odd), 30 items
    planted, _, _ = planted_ties(rows=31, num_items=30, seed=1)
    score_fn, user_fn, table = last_item_scorer(planted)
    kw = dict(max_len=8, batch_size=5, ks=(1, 10), ties=ties, mask_history=mask, diagnostics=True)
    for split in ("valid", "test"):
        expected = evaluate(score_fn, ds, split, **kw)
        full = score_fn(pad_left([u.history(split) for u in ds.users], 8))
        for name, value in reference_diagnostics(full, ds, split, mask, ties).items():
            assert expected[name] == pytest.approx(value, abs=1e-12), (split, name)
        for chunk in (1, 4, 7, 30, 100):
            assert evaluate(score_fn, ds, split, item_chunk=chunk, **kw) == expected, chunk
            assert evaluate(user_fn, ds, split, item_table=table, item_chunk=chunk, **kw) == expected, chunk
        assert evaluate(user_fn, ds, split, item_table=lambda ids: table[ids], item_chunk=3, **kw) == expected
        assert evaluate(score_fn, ds, split, equal_batches=True, **kw) == expected
    # an even number of users, from a user sample
    sample = evaluate(score_fn, ds, "test", user_sample=10, user_seed=2, **kw)
    alone = evaluate(score_fn, PreparedDataset(ds.items[1:], sample_users(ds.users, 10, 2)[0]), "test", **kw)
    assert {k: v for k, v in sample.items() if not k.startswith("user_sample")} == alone


def test_diagnostics_with_top_k_leave_the_top_k_file_and_metrics_unchanged(tmp_path):
    ds = random_dataset()
    scores = torch.rand(31, 31, generator=torch.Generator().manual_seed(2))  # distinct: top-1 = first of top-K
    _, user_fn, table = last_item_scorer(scores)
    kw = dict(batch_size=4, item_table=table, item_chunk=3, top_k=5)
    plain = evaluate(user_fn, ds, "test", 8, top_k_path=tmp_path / "plain.jsonl", **kw)
    got = evaluate(user_fn, ds, "test", 8, top_k_path=tmp_path / "diag.jsonl", diagnostics=True, **kw)
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "diag.jsonl").read_text()
    assert {k: got[k] for k in plain} == plain
    top1 = [r["items"][0] for r in read_top_k(tmp_path / "diag.jsonl")]
    histories = [u.history("test") for u in ds.users]
    assert got["top1_is_last"] == pytest.approx(sum(t == h[-1] for t, h in zip(top1, histories)) / 23)
    assert got["top1_in_history"] == pytest.approx(sum(t in h for t, h in zip(top1, histories)) / 23)


def diagnostic_results(rank, world, out_dir):
    """User-sharded (with and without a user sample) and item-sharded evaluations with diagnostics."""
    ds, model = random_dataset(), _model()
    scores, _, _ = planted_ties(rows=31, num_items=30, seed=1)
    _, user_fn, table = last_item_scorer(scores)
    out = {}
    for mask in (False, True):
        for ties in ("pessimistic", "optimistic"):
            kw = dict(batch_size=4, mask_history=mask, ties=ties, item_table=table, item_chunk=3, diagnostics=True)
            out[f"users-{mask}-{ties}"] = evaluate(user_fn, ds, "test", 8, **kw)
            out[f"sample-{mask}-{ties}"] = evaluate(user_fn, ds, "valid", 8, user_sample=10, user_seed=1, **kw)
            out[f"items-{mask}-{ties}"] = evaluate(user_fn, ds, "test", 8, item_shard=True, **kw)
        out[f"model-{mask}"] = evaluate(model.sequence_repr, ds, "valid", 8, batch_size=5, mask_history=mask,
                                        item_table=model.item_emb.weight, item_chunk=4, diagnostics=True)
        out[f"model-items-{mask}"] = evaluate(model.sequence_repr, ds, "valid", 8, batch_size=5, mask_history=mask,
                                              item_table=model.item_emb.weight, item_chunk=4, item_shard=True,
                                              diagnostics=True)
    return out


def _diagnostic_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(diagnostic_results(rank, world, out_dir), os.path.join(out_dir, f"diag{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_diagnostics_on_two_ranks_equal_single_process(tmp_path):
    single = diagnostic_results(0, 1, str(tmp_path))
    assert all(DIAGNOSTIC_KEYS <= set(r) for r in single.values())
    assert single["users-False-pessimistic"]["median_rank"] != single["users-True-pessimistic"]["median_rank"]
    spawn_two_ranks(_diagnostic_worker, tmp_path)
    for rank in range(2):
        shard = torch.load(tmp_path / f"diag{rank}.pt")
        assert shard.keys() == single.keys()
        for key, expected in single.items():
            assert shard[key].keys() == expected.keys()
            for name, value in expected.items():
                assert shard[key][name] == pytest.approx(value, abs=1e-12), (key, name)


def test_quality_tables_show_the_diagnostics_and_n_a_for_results_saved_before_them():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    base = {"hit@5": 0.1, "hit@10": 0.2, "hit@20": 0.3, "ndcg@5": 0.05, "ndcg@10": 0.1, "ndcg@20": 0.15}
    seed = lambda **diag: {"test": base | diag, "valid": base, "epochs_to_best": 2, "epochs_run": 4}  # noqa: E731
    diag = dict(zip(quality.DIAGNOSTICS, (0.01, 0.04, 30.0, 0.9, 0.85, 0.02)))
    old = {"label": "Old", "seeds": {"0": seed()}}
    new = {"label": "New", "seeds": {"0": seed(**diag), "1": seed(**(diag | {"median_rank": 32.0}))}}
    mixed = {"label": "Mixed", "seeds": {"0": seed(), "1": seed(**diag)}}
    for row in (old, new, mixed):
        row["summary"] = quality.summarize(row["seeds"])
    old["summary"] = {k: v for k, v in old["summary"].items() if not k.startswith("test_") or k[5:] in quality.KEYS}
    assert new["summary"]["test_median_rank"] == {"mean": 31.0, "std": pytest.approx(math.sqrt(2))}
    assert mixed["summary"]["test_mrr"] == {"mean": 0.04, "std": 0.0, "n": 1}
    text = quality.tables({"old": old, "new": new, "mixed": mixed})
    main, diagnostics = text.split("Ranking diagnostics (test):")
    assert main.strip() == quality.markdown({"old": old, "new": new, "mixed": mixed})  # the quality table unchanged
    lines = diagnostics.strip().splitlines()
    assert lines[0] == ("| model | test hit@1 | test mrr | test median_rank | test top1_in_history | test top1_is_last "
                        "| test target_is_repeat | seeds |")
    assert lines[2] == "| Old | n/a | n/a | n/a | n/a | n/a | n/a | 1 |"
    assert lines[3] == ("| New | 0.0100 ± 0.0000 | 0.0400 ± 0.0000 | 31.0 ± 1.4 | 0.9000 ± 0.0000 | 0.8500 ± 0.0000 "
                        "| 0.0200 ± 0.0000 | 2 |")
    assert lines[4].startswith("| Mixed | 0.0100 ± 0.0000 (n=1) |")


@pytest.mark.parametrize("offset", [-2.0, 1.5])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_a_history_offset_ranks_like_adding_it_to_the_history_scores(offset, ties):
    """A finite history_offset (a learned history bias) = adding it to every history item's score,
    a repeated target's too, then ranking without histories; any chunking; top-K and top-1 alike."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 21, generator=g).round(decimals=1)  # rounded: ties happen
    scores[:, 0] = float("-inf")
    histories = [[1, 2, 3], [4, 4, 5], [], [7, 8, 9, 10], [11], [12, 13]]
    targets = torch.tensor([2, 6, 3, 10, 11, 14])  # rows 0, 3, 4: the target is a repeat
    shifted = scores.clone()
    for row, history in enumerate(histories):
        shifted[row, sorted(set(history))] += offset
    want = target_ranks(shifted, targets, ties=ties)
    for chunk in (0, 4):
        got = target_ranks(scores, targets, histories, ties=ties, item_chunk=chunk, history_offset=offset)
        assert torch.equal(got, want)
    counter = RankCounter(scores.gather(1, targets[:, None])[:, 0], targets, histories, ties, top_k=3, top1=True,
                          history_offset=offset)
    for start, end in item_chunks(1, 21, 5):
        counter.add(start, scores[:, start:end])
    assert torch.equal(counter.counts, want)
    assert torch.equal(counter.top_scores, shifted[:, 1:].topk(3, dim=1).values)
    assert torch.equal(counter.top1_scores, shifted[:, 1:].max(1).values)

"""The next-item CE choices (sicsrec.next_item): chunked == full, sampled with every item as a
negative == full, logQ and accidental-hit masking against hand computations, 2 gloo ranks ==
1 process for the pooled sampled softmax, config validation, the trainers' wiring, and a step-1
run whose loss curve is the same with `train_id.loss=chunked` as with `full`."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from shards.prepared import Item, PreparedDataset, UserSequence
from sicsrec.config import TrainConfig, TSSRConfig
from sicsrec.models.content_sasrec import ContentSASRec
from sicsrec.models.gru4rec import GRU4Rec
from sicsrec.models.sasrec import SASRec
from sicsrec.models.sicsrec import SICSRec
from sicsrec.models.tssr import TSSR
from sicsrec.next_item import (NextItemCriterion, NextItemParams, _chunked_checkpointed, draw_negatives, item_counts,
                               next_item_loss, popularity_probs)
from sicsrec.train import NextItemLoss, train_id
from tests.test_losses import _free_port
from tests.test_train_id import TINY, make_dataset

TOL = dict(atol=1e-5, rtol=1e-5)


def _problem(num_items=30, d=8, rows=(5, 7), seed=0):
    """Random hidden [*rows, d], table [N+1, d] and targets with padding and repeated items."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, d, generator=g)
    table = torch.randn(num_items + 1, d, generator=g)
    targets = torch.randint(1, num_items + 1, rows, generator=g)
    targets[0, :2] = 0  # left padding
    targets[1, 3] = targets[2, 4]  # the same item twice
    return hidden, table, targets


def _loss_and_grads(params, hidden, table, targets, **kwargs):
    h, e = hidden.clone().requires_grad_(True), table.clone().requires_grad_(True)
    out = next_item_loss(h, e, targets, params, **kwargs)
    out.loss_sum.backward()
    return out, h.grad, e.grad


def _reference(hidden, table, targets):
    """Before sicsrec.next_item: cross_entropy over hidden @ table.T with the padding column -inf."""
    real = targets != 0
    logits = hidden[real] @ table.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[real], reduction="sum")


def test_full_is_the_previous_loss():
    hidden, table, targets = _problem()
    out, _, _ = _loss_and_grads(NextItemParams(), hidden, table, targets)
    assert torch.equal(out.loss_sum.detach(), _reference(hidden, table, targets))
    assert int(out.count) == int((targets != 0).sum()) and out.stats == {}
    # NextItemLoss(SASRec) with the default criterion: exactly what it returned before
    torch.manual_seed(0)
    model = SASRec(30, 16, 1, 2, 0.0, 7)
    inputs = torch.randint(0, 31, (4, 7))
    targets = torch.randint(0, 31, (4, 7))
    loss_sum, count = NextItemLoss(model)(inputs, targets)
    hidden = model.hidden_states(inputs)
    real = targets != 0
    before = F.cross_entropy(model.logits(hidden[real]), targets[real], reduction="sum")
    assert torch.equal(loss_sum, before) and count == real.sum()


@pytest.mark.parametrize("chunk", [1, 4, 13, 1000])
def test_chunked_equals_full(chunk):
    hidden, table, targets = _problem()
    full, gh, ge = _loss_and_grads(NextItemParams(), hidden, table, targets)
    chunked, ch, ce = _loss_and_grads(NextItemParams(loss="chunked", loss_chunk=chunk), hidden, table, targets)
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, **TOL)
    torch.testing.assert_close(ch, gh, **TOL)
    torch.testing.assert_close(ce, ge, **TOL)
    assert ce[0].abs().max() == 0  # the padding row never gets a gradient
    assert int(chunked.count) == int(full.count)


def test_chunked_fallback_equals_full():
    """The fallback for a torch without F.linear_cross_entropy (per-chunk recomputation)."""
    hidden, table, targets = _problem()
    real = targets != 0
    full, gh, ge = _loss_and_grads(NextItemParams(), hidden, table, targets)
    h, e = hidden.clone().requires_grad_(True), table.clone().requires_grad_(True)
    loss = _chunked_checkpointed(h[real], e[1:], targets[real] - 1, 4)
    loss.backward()
    torch.testing.assert_close(loss, full.loss_sum, **TOL)
    torch.testing.assert_close(h.grad, gh, **TOL)
    torch.testing.assert_close(e.grad, ge, **TOL)


def test_chunked_ignores_autocast_and_keeps_fp32():
    hidden, table, targets = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = next_item_loss(hidden, table, targets, NextItemParams(loss="chunked", loss_chunk=8))
        full = next_item_loss(hidden, table, targets)
    assert chunked.loss_sum.dtype == full.loss_sum.dtype == torch.float32
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, **TOL)


@pytest.mark.parametrize("logq", [False, True])
def test_sampled_with_every_item_as_negative_is_the_full_softmax(logq):
    """Negatives = all of 1..N: after masking the accidental hits and the repeated candidates each
    item is in the denominator once, so the softmax is the full one (uniform logQ is a constant)."""
    hidden, table, targets = _problem()
    full, gh, ge = _loss_and_grads(NextItemParams(), hidden, table, targets)
    params = NextItemParams(loss="sampled", logq=logq)
    sampled, sh, se = _loss_and_grads(params, hidden, table, targets, negatives=torch.arange(1, 31))
    torch.testing.assert_close(sampled.loss_sum, full.loss_sum, **TOL)
    torch.testing.assert_close(sh, gh, **TOL)
    torch.testing.assert_close(se, ge, **TOL)
    rows = int((targets != 0).sum())
    assert sampled.stats["candidates"] == rows + 30
    assert int(sampled.stats["duplicate_columns"]) == rows  # every in-batch item is also a negative


def test_logq_correction_hand_computed():
    # One row, h . e = [1, 2, 0] for items 1, 2, 3; positive item 2; shared negatives [1, 3];
    # popularity q = [0.5, 0.25, 0.25]. Every candidate's logit gets -log q:
    #   item 2 (positive): 2 - log 1/4;  item 1: 1 - log 1/2;  item 3: 0 - log 1/4
    # loss = log(1 + e^{(1 + log 2) - (2 + log 4)} + e^{(0 + log 4) - (2 + log 4)})
    #      = log(1 + e^-1 / 2 + e^-2) = 0.277082
    expected = math.log(1 + math.exp(-1) / 2 + math.exp(-2))
    assert expected == pytest.approx(0.277082, abs=1e-6)
    hidden = torch.tensor([[1.0, 2.0, 0.0]])
    table = torch.cat([torch.zeros(1, 3), torch.eye(3)])  # e_i = unit vector i
    probs = popularity_probs(torch.tensor([0.0, 2.0, 1.0, 1.0]))
    assert probs.tolist() == [0.0, 0.5, 0.25, 0.25]
    params = NextItemParams(loss="sampled", sampler="popularity")
    out = next_item_loss(hidden, table, torch.tensor([2]), params, probs, negatives=torch.tensor([1, 3]))
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-6)
    plain = next_item_loss(hidden, table, torch.tensor([2]), NextItemParams(loss="sampled", logq=False),
                           negatives=torch.tensor([1, 3]))
    assert plain.loss_sum.item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), abs=1e-6)
    uniform = next_item_loss(hidden, table, torch.tensor([2]), NextItemParams(loss="sampled"),
                             negatives=torch.tensor([1, 3]))
    assert uniform.loss_sum.item() == pytest.approx(plain.loss_sum.item(), abs=1e-6)  # a constant shift
    with pytest.raises(ValueError, match="item_probs"):
        next_item_loss(hidden, table, torch.tensor([2]), params, None, negatives=torch.tensor([1, 3]))


def test_accidental_hits_masked_and_counted():
    # Two rows, both with positive item 2; shared negatives [2, 3, 3]; h_0 . e = [_, 1, 0, 3],
    # h_1 . e = [_, 0, 2, 1] (items 1..3). Candidates: [2 (row 0), 2 (row 1), 2, 3, 3].
    # Row 0: own column 0; column 1 and the negative 2 are accidental hits (-inf); the first 3 is a
    # negative, the second 3 repeats it (-inf): loss = log(1 + e^{3 - 0}).
    # Row 1: own column 1; column 0 and the negative 2 are hits: loss = log(1 + e^{1 - 2}).
    # Hits: 2 per row = 4 masked pairs; repeated candidate columns: 1 (column 1), 2 (item 2), 4 (item 3).
    hidden = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 1.0]])
    table = torch.cat([torch.zeros(1, 3), torch.eye(3)])
    out = next_item_loss(hidden, table, torch.tensor([2, 2]), NextItemParams(loss="sampled", logq=False),
                         negatives=torch.tensor([2, 3, 3]))
    expected = math.log(1 + math.exp(3.0)) + math.log(1 + math.exp(-1.0))
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-5)
    assert int(out.stats["accidental_hits"]) == 4 and int(out.stats["duplicate_columns"]) == 3
    assert out.stats["candidates"] == 5 and int(out.count) == 2


def test_popularity_counts_and_drawing():
    users = [UserSequence(1, "a", [1, 2, 2, 3], 4, 5), UserSequence(2, "b", [2, 3], 1, 1)]
    dataset = PreparedDataset([Item(i, str(i), "", None) for i in range(1, 6)], users)
    counts = item_counts(dataset)
    assert counts.tolist() == [0, 1, 3, 2, 0, 0]  # training items only, not valid/test
    probs = popularity_probs(counts)  # unseen items count once
    assert probs.tolist() == pytest.approx([0, 1 / 8, 3 / 8, 2 / 8, 1 / 8, 1 / 8])
    drawn = draw_negatives(20000, 5, probs, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert drawn.min() >= 1 and drawn.max() <= 5
    freq = torch.bincount(drawn, minlength=6).double() / drawn.numel()
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)
    uniform = draw_negatives(20000, 5, None, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert uniform.min() >= 1 and uniform.max() <= 5 and torch.bincount(uniform)[0] == 0
    criterion = NextItemCriterion.from_config(TrainConfig(loss="sampled", sampler="popularity"), dataset)
    assert torch.equal(criterion.item_probs, probs)
    assert NextItemCriterion.from_config(TrainConfig(sampler="popularity"), dataset).item_probs is None  # full


@pytest.mark.parametrize("key, value, message", [
    ("loss", "softmax", r"train_id\.loss must be one of full, chunked, sampled"),
    ("sampler", "zipf", r"train_id\.sampler must be one of uniform, popularity"),
    ("num_negatives", 0, r"train_id\.num_negatives must be an integer >= 1"),
    ("loss_chunk", 0, r"train_id\.loss_chunk must be an integer >= 1"),
])
def test_validation_names_the_key(key, value, message):
    cfg = TrainConfig(**{key: value})
    with pytest.raises(ValueError, match=message):
        NextItemParams.from_config(cfg)
    with pytest.raises(ValueError, match=message.replace("train_id", "tssr.train")):
        NextItemCriterion.from_config(cfg, None, "tssr.train")


def test_validation_in_the_step1_trainer(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    with pytest.raises(ValueError, match=r"train_id\.loss must be one of"):
        train_id(TrainConfig(**TINY, loss="bogus", epochs=1), prepared, tmp_path / "out", seed=0)
    with pytest.raises(ValueError, match=r"train_id\.num_negatives must be"):
        train_id(TrainConfig(**TINY, loss="sampled", num_negatives=0, epochs=1), prepared, tmp_path / "out2", seed=0)


# ---------------------------------------------------------------- models and trainers' loss modules

def _tables(num_items, g):
    return torch.randn(num_items + 1, 6, generator=g), torch.randn(num_items + 1, 5, generator=g)


def test_every_model_scores_against_its_item_table():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    text, image = _tables(20, g)
    sasrec = SASRec(20, 8, 1, 2, 0.0, 6)
    models = [sasrec, GRU4Rec(20, 8, 1, 0.0, 6), ContentSASRec("content", text, image, None, 8, 1, 2, 0.0, 6),
              ContentSASRec("hybrid", text, None, None, 8, 1, 2, 0.0, 6), SICSRec(sasrec, text, image),
              TSSR(20, 11, 8, 2, 1, 1, 0.0, 6)]
    hidden = torch.randn(3, 8, generator=g)
    for model in models:
        table = model.item_table()
        assert table.shape == (21, 8), type(model).__name__
        scores = model.logits(hidden)
        assert torch.isinf(scores[:, 0]).all()
        torch.testing.assert_close(scores[:, 1:], hidden @ table[1:].T, msg=type(model).__name__)
    assert models[4].item_table() is sasrec.item_emb.weight  # one table: SICSRec scores with E_id


def test_sicsrec_and_tssr_losses_use_the_criterion():
    from sicsrec.train_sicsrec import SICSRecLoss
    from shards.collate import SequenceCollate
    from sicsrec.train_tssr import TSSRLoss, build_recommender

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    text, image = _tables(20, g)
    chunked = NextItemCriterion(NextItemParams(loss="chunked", loss_chunk=3))
    model = SICSRec(SASRec(20, 8, 1, 2, 0.0, 6), text, image, None, 1, 1, 2, 0.0).eval()
    loss = SICSRecLoss(model, 0.0, 0.05, 0.0)
    inputs = torch.randint(0, 21, (4, 6), generator=g)
    targets = torch.randint(1, 21, (4, 6), generator=g)
    full_sum, full_count, _ = loss(inputs, targets)
    loss.criterion = chunked  # what the Trainer sets from sicsrec.train.loss
    chunk_sum, chunk_count, _ = loss(inputs, targets)
    torch.testing.assert_close(chunk_sum, full_sum, **TOL)
    assert full_count == chunk_count == 24

    cfg = TSSRConfig(content="cache", hidden=8, heads=2, uni_layers=1, multi_layers=1, dropout=0.0,
                     lambda_u=0.0, lambda_i=0.0, train=TrainConfig(max_len=6))
    recommender = build_recommender(cfg, 20, {"text": text, "image": image}).eval()
    tssr_loss = TSSRLoss(recommender, cfg)
    batch = SequenceCollate(6, None)([{"user": u, "items": torch.randint(1, 21, (5,), generator=g).tolist()}
                                  for u in range(1, 5)])
    tssr_loss.feed(batch)
    full_sum, full_count, _ = tssr_loss(batch["inputs"], batch["targets"])
    tssr_loss.criterion = chunked
    tssr_loss.feed(batch)
    chunk_sum, chunk_count, _ = tssr_loss(batch["inputs"], batch["targets"])
    torch.testing.assert_close(chunk_sum, full_sum, **TOL)
    assert full_count == chunk_count == int((batch["targets"] != 0).sum())


# ---------------------------------------------------------------- 2 gloo ranks == 1 process
# Each case: hidden = x @ proj (proj a shared parameter), the item table a replicated parameter;
# local batches of different sizes, padding targets, the same items on both ranks. The rank's
# loss is scaled as Trainer.train_epoch does (CE sum * world / global count); parameter
# gradients are averaged over ranks as DDP does; input gradients / world = the full-batch ones.

def _cases() -> dict:
    g = torch.Generator().manual_seed(0)
    n_items, d = 12, 5
    targets = torch.tensor([3, 0, 5, 3, 7, 0, 9, 5, 12, 1])
    counts = torch.randint(0, 6, (n_items + 1,), generator=g).double()
    base = dict(sizes=[4, 6], x=torch.randn(10, d, generator=g), proj=torch.randn(d, d, generator=g),
                table=torch.randn(n_items + 1, d, generator=g), targets=targets)
    return {
        "uniform_logq": dict(base, params=NextItemParams(loss="sampled"), negatives=torch.tensor([5, 2, 11, 2, 8]),
                             probs=None),
        "popularity_logq": dict(base, params=NextItemParams(loss="sampled", sampler="popularity"),
                                negatives=torch.tensor([1, 4, 4, 6, 3, 10]), probs=popularity_probs(counts)),
        "all_items": dict(base, params=NextItemParams(loss="sampled", logq=False),
                          negatives=torch.arange(1, n_items + 1), probs=None),
        "chunked": dict(base, params=NextItemParams(loss="chunked", loss_chunk=2), negatives=None, probs=None),
    }


def _run_case(case: dict, rank: int, world: int) -> dict:
    sizes = case["sizes"] if world > 1 else [sum(case["sizes"])]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    proj = case["proj"].clone().requires_grad_(True)
    table = case["table"].clone().requires_grad_(True)
    x = case["x"][rows].clone().requires_grad_(True)
    targets = case["targets"][rows]
    kwargs = {} if case["negatives"] is None else {"negatives": case["negatives"]}
    out = next_item_loss(x @ proj, table, targets, case["params"], case["probs"], **kwargs)
    total = out.count.clone().float()
    if world > 1:
        dist.all_reduce(total)
    loss = out.loss_sum * world / total
    loss.backward()
    grads = {"proj": proj.grad.clone(), "table": table.grad.clone()}
    loss = loss.detach().clone()
    x_grad = x.grad / world
    if world > 1:
        for value in grads.values():
            dist.all_reduce(value)
            value /= world
        dist.all_reduce(loss)
        loss /= world
        parts = [None] * world
        dist.all_gather_object(parts, x_grad)
        x_grad = torch.cat(parts)
    return {"loss": loss, "x": x_grad, **grads}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _run_case(case, rank, world) for name, case in _cases().items()}
        # negatives drawn without a generator: rank 0 draws (its own RNG) and broadcasts
        torch.manual_seed(100 + rank)
        drawn = draw_negatives(64, 1000, None, torch.device("cpu"))
        pop = draw_negatives(64, 12, popularity_probs(torch.arange(13).double()), torch.device("cpu"))
        parts = [None] * world
        dist.all_gather_object(parts, (drawn, pop))
        results["drawn_equal"] = all(torch.equal(p[0], drawn) and torch.equal(p[1], pop) for p in parts)
        # the drawn path end to end (no explicit negatives), on unequal local batches
        case = _cases()["uniform_logq"]
        rows = slice(0, 4) if rank == 0 else slice(4, 10)
        out = next_item_loss(case["x"][rows], case["table"], case["targets"][rows], NextItemParams(loss="sampled",
                                                                                                   num_negatives=8))
        results["drawn_candidates"] = out.stats["candidates"]
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "results.pt")
    assert distributed["drawn_equal"]
    assert distributed["drawn_candidates"] == 8 + 8  # 8 real targets in the global batch + 8 negatives
    for name, case in _cases().items():
        single = _run_case(case, rank=0, world=1)
        got = distributed[name]
        for key in ("loss", "proj", "table", "x"):
            torch.testing.assert_close(got[key], single[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        assert single["table"].abs().sum() > 0, name
    # and the all-items case is the full softmax there as well
    full = _run_case(dict(_cases()["all_items"], params=NextItemParams(), negatives=None), rank=0, world=1)
    for key in ("loss", "proj", "table", "x"):
        torch.testing.assert_close(distributed["all_items"][key], full[key], **TOL)


# ---------------------------------------------------------------- step 1 runs

def _curve(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def test_step1_chunked_follows_the_full_loss_curve(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    base = dict(TINY, dropout=0.2, epochs=2, patience=2)
    full = train_id(TrainConfig(**base), prepared, tmp_path / "full", seed=0)["metrics"]
    chunked = train_id(TrainConfig(**base, loss="chunked", loss_chunk=5), prepared, tmp_path / "chunked",
                       seed=0)["metrics"]
    curve_full, curve_chunked = _curve(tmp_path / "full"), _curve(tmp_path / "chunked")
    assert len(curve_full) == len(curve_chunked) > 4
    assert curve_chunked == pytest.approx(curve_full, rel=1e-5, abs=1e-6)
    assert chunked["valid"]["ndcg@10"] == pytest.approx(full["valid"]["ndcg@10"], abs=1e-6)
    # sampled with popularity negatives trains through the same Trainer
    sampled = train_id(TrainConfig(**base, loss="sampled", num_negatives=8, sampler="popularity"), prepared,
                       tmp_path / "sampled", seed=0)["metrics"]
    assert sampled["epochs_run"] == 2 and all(math.isfinite(x) for x in _curve(tmp_path / "sampled"))

"""Pooled InfoNCE: hand-computed masking, and 2 gloo ranks == 1 process on the concatenated batch."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sicsrec.losses import info_nce, item_contrastive_loss, sft_loss, user_contrastive_loss

# --- hand-computed case ------------------------------------------------------------------------
# query = I (3x3) and key = S^T, so the logit matrix query @ key.T is S itself (temperature 1):
#       S = [[2, 0, 1],     key item ids = [5, 7, 5]
#            [0, 3, 1],
#            [1, 1, 1]]
# Row 0: positive column 0 (item 5); column 2 is item 5 again -> masked.
#   masked:   -log(e^2 / (e^2 + e^0))        = log(1 + e^-2)          = 0.126928
#   unmasked: -log(e^2 / (e^2 + e^0 + e^1))  = log(1 + e^-2 + e^-1)   = 0.407606
# Row 1: positive column 1 (item 7); nothing masked:
#   both:     -log(e^3 / (e^0 + e^3 + e^1))  = log(1 + e^-3 + e^-2)   = 0.169846
# Row 2: positive column 2 (item 5); column 0 is item 5 -> masked.
#   masked:   -log(e^1 / (e^1 + e^1))        = log 2                  = 0.693147
#   unmasked: -log(e^1 / (e^1 + e^1 + e^1))  = log 3                  = 1.098612
S = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
IDS = torch.tensor([5, 7, 5])
MASKED_ROWS = [0.126928, 0.169846, 0.693147]
UNMASKED_ROWS = [0.407606, 0.169846, 1.098612]


def test_hand_computed_constants():
    e = math.exp
    assert MASKED_ROWS == pytest.approx([math.log(1 + e(-2)), math.log(1 + e(-3) + e(-2)), math.log(2)], abs=1e-6)
    assert UNMASKED_ROWS == pytest.approx([math.log(1 + e(-2) + e(-1)), math.log(1 + e(-3) + e(-2)), math.log(3)],
                                          abs=1e-6)


def test_duplicate_item_masking_matches_hand_computation():
    query, key = torch.eye(3), S.T.contiguous()
    masked = info_nce(query, key, 1.0, key_ids=IDS)
    assert masked.loss.item() == pytest.approx(sum(MASKED_ROWS) / 3, abs=1e-5)
    assert int(masked.masked_pairs) == 2 and masked.rows == 3
    plain = info_nce(query, key, 1.0, key_ids=IDS, mask_duplicates=False)
    assert plain.loss.item() == pytest.approx(sum(UNMASKED_ROWS) / 3, abs=1e-5)
    assert int(plain.masked_pairs) == 0
    no_ids = info_nce(query, key, 1.0)
    assert no_ids.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)


def test_invalid_rows_are_dropped_as_rows_and_columns():
    # Dropping pair 2 leaves rows 0, 1 over columns 0, 1: row 0 = log(1+e^-2), row 1 = log(1+e^-3).
    out = info_nce(torch.eye(3), S.T.contiguous(), 1.0, key_ids=IDS, valid=torch.tensor([True, True, False]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6) and out.rows == 2
    assert int(out.masked_pairs) == 0


def test_anchor_item_among_columns_is_masked():
    # Pair 0 = (item 1 -> item 2), pair 1 = (item 2 -> item 3): row 1's anchor (item 2) is column 0.
    query, key = torch.eye(2), torch.tensor([[1.0, 0.0], [0.5, 2.0]]).T.contiguous()  # logits [[1, 0], [.5, 2]]
    out = info_nce(query, key, 1.0, query_ids=torch.tensor([1, 2]), key_ids=torch.tensor([2, 3]))
    # Row 0: logits [1, 0] (column 1 = item 3, kept) -> log(1 + e^-1); row 1: column 0 masked -> 0.
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)) / 2, abs=1e-6)
    assert int(out.masked_pairs) == 1


def test_symmetric_averages_both_directions_and_temperature_scales():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    sym = info_nce(a, b, 0.5, symmetric=True)
    forward, backward = info_nce(a, b, 0.5).loss, info_nce(b, a, 0.5).loss
    assert sym.loss.item() == pytest.approx(((forward + backward) / 2).item(), abs=1e-6)
    assert info_nce(a, b, 0.5).loss.item() == pytest.approx(info_nce(a * 2, b, 1.0).loss.item(), abs=1e-6)
    cos = info_nce(a, b, 0.5, normalize=True).loss
    ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T / 0.5, torch.arange(4))
    assert cos.item() == pytest.approx(ref.item(), abs=1e-6)


def test_sft_loss_terms_and_missing_images():
    torch.manual_seed(1)
    ta, tb, ia, ib = (torch.randn(3, 4) for _ in range(4))
    ids_a, ids_b = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    has_b = torch.tensor([True, False, True])
    out = sft_loss(ta, tb, ids_a, ids_b, 0.1, image_a=ia, image_b=ib, has_image_b=has_b, normalize=False)

    def ce(x, y):
        return torch.nn.functional.cross_entropy(x @ y.T / 0.1, torch.arange(len(x))).item()

    assert out.t2t.item() == pytest.approx(ce(ta, tb), abs=1e-5)
    keep = [0, 2]  # pair 1's b item has no image: out of i2i, and its b side out of t2i
    assert out.i2i.item() == pytest.approx(ce(ia[keep], ib[keep]), abs=1e-5)
    texts, images = torch.cat([ta, tb[keep]]), torch.cat([ia, ib[keep]])
    assert out.t2i.item() == pytest.approx(ce(texts, images), abs=1e-5)
    assert out.total.item() == pytest.approx((out.t2t + out.i2i + out.t2i).item(), abs=1e-6)
    text_only = sft_loss(ta, tb, ids_a, ids_b, 0.1)
    assert text_only.i2i is None and text_only.total.item() == pytest.approx(text_only.t2t.item())


def test_tssr_losses_match_direct_formulas():
    torch.manual_seed(2)
    fid, fcon, eid, econ = (torch.randn(2, 4, 3) for _ in range(4))
    items = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])  # left padding in row 0, all items distinct
    mask = items > 0
    lu = user_contrastive_loss(fid, fcon, mask, 0.2)
    mid = torch.stack([fid[0, 1:].mean(0), fid[1].mean(0)])
    mcon = torch.stack([fcon[0, 1:].mean(0), fcon[1].mean(0)])
    f = torch.nn.functional
    sim = f.normalize(mid, dim=1) @ f.normalize(mcon, dim=1).T / 0.2
    expected_u = f.cross_entropy(sim, torch.arange(2)) + f.cross_entropy(sim.T, torch.arange(2))
    assert lu.item() == pytest.approx(expected_u.item(), abs=1e-5)

    li = item_contrastive_loss(fid, fcon, eid, econ, items, 1.0)
    rows = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # (user, l) with items at l and l+1

    def term(out, emb):
        q = torch.stack([out[u, t] for u, t in rows])
        k = torch.stack([emb[u, t + 1] for u, t in rows])
        return f.cross_entropy(q @ k.T, torch.arange(len(rows)))

    assert li.item() == pytest.approx((term(fid, econ) + term(fcon, eid)).item(), abs=1e-5)


# --- 2 gloo ranks vs 1 process -----------------------------------------------------------------
# Every case embeds its inputs with a shared parameter P (as a model would), so the check covers
# what DDP / ZeRO do: all-reduce-average P's gradient over ranks and compare it with one process.
# Input gradients are compared too (a rank's input grad / world_size = the full-batch grad).

def _loss(kind: str, emb: dict, others: dict, kwargs: dict) -> torch.Tensor:
    if kind == "info_nce":
        return info_nce(emb["query"], emb["key"], **others, **kwargs).loss
    if kind == "sft":
        return sft_loss(**emb, **others, **kwargs).total
    if kind == "user":
        return user_contrastive_loss(emb["seq_id"], emb["seq_con"], others["mask"], **kwargs)
    if kind == "item":
        return item_contrastive_loss(**emb, items=others["items"], **kwargs)
    raise ValueError(kind)


def _run_case(case: dict, rank: int, world: int) -> dict:
    sizes = case["sizes"] if world > 1 else [sum(case["sizes"])]
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    proj = case["proj"].clone().requires_grad_(True)
    leaves = {k: v[start:stop].clone().requires_grad_(True) for k, v in case["floats"].items()}
    others = {k: v[start:stop] for k, v in case["others"].items()}
    loss = _loss(case["kind"], {k: v @ proj for k, v in leaves.items()}, others, case["kwargs"])
    loss.backward()
    grad_proj, loss = proj.grad.clone(), loss.detach().clone()
    inputs = {k: v.grad / world for k, v in leaves.items()}
    if world > 1:  # what DDP does with parameter grads, and a global mean for the logged loss
        dist.all_reduce(grad_proj)
        dist.all_reduce(loss)
        grad_proj, loss = grad_proj / world, loss / world
        parts = [None] * world
        dist.all_gather_object(parts, inputs)
        inputs = {k: torch.cat([p[k] for p in parts]) for k in inputs}
    return {"loss": loss, "grad_proj": grad_proj, "grad_inputs": inputs}


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    d = 6
    cases = {
        # equal local batches, ids duplicated across ranks, cosine, both directions
        "equal_symmetric": dict(kind="info_nce", sizes=[4, 4], proj=rand(d, d),
                                floats=dict(query=rand(8, d), key=rand(8, d)),
                                others=dict(query_ids=torch.tensor([1, 2, 3, 4, 5, 6, 2, 8]),
                                            key_ids=torch.tensor([9, 3, 10, 11, 9, 12, 13, 3])),
                                kwargs=dict(temperature=0.1, normalize=True, symmetric=True)),
        # unequal local batches (3 and 5) with invalid rows, inner product
        "unequal_valid": dict(kind="info_nce", sizes=[3, 5], proj=rand(d, d),
                              floats=dict(query=rand(8, d), key=rand(8, d)),
                              others=dict(key_ids=torch.tensor([1, 2, 1, 3, 2, 4, 5, 6]),
                                          valid=torch.tensor([True, True, False, True, True, True, False, True])),
                              kwargs=dict(temperature=0.5)),
        "sft": dict(kind="sft", sizes=[3, 3], proj=rand(d, d),
                    floats=dict(text_a=rand(6, d), text_b=rand(6, d), image_a=rand(6, d), image_b=rand(6, d)),
                    others=dict(ids_a=torch.tensor([1, 2, 3, 4, 5, 2]), ids_b=torch.tensor([4, 6, 7, 1, 8, 6]),
                                has_image_a=torch.tensor([True, True, False, True, True, True]),
                                has_image_b=torch.tensor([True, False, True, True, True, True])),
                    kwargs=dict(temperature=0.2, normalize=True)),
        "tssr_user": dict(kind="user", sizes=[2, 3], proj=rand(d, d),
                          floats=dict(seq_id=rand(5, 4, d), seq_con=rand(5, 4, d)),
                          others=dict(mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1],
                                                         [1, 1, 1, 1]]).bool()),
                          kwargs=dict(temperature=0.2)),
        "tssr_item": dict(kind="item", sizes=[2, 2], proj=rand(d, d),
                          floats=dict(out_id=rand(4, 4, d), out_con=rand(4, 4, d), emb_id=rand(4, 4, d),
                                      emb_con=rand(4, 4, d)),
                          others=dict(items=torch.tensor([[0, 3, 4, 5], [1, 3, 4, 2], [0, 0, 7, 3], [5, 4, 3, 9]])),
                          kwargs=dict(temperature=1.0)),
    }
    return cases


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _run_case(case, rank, world) for name, case in _cases().items()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "results.pt")
    for name, case in _cases().items():
        single = _run_case(case, rank=0, world=1)
        got = distributed[name]
        torch.testing.assert_close(got["loss"], single["loss"], atol=1e-6, rtol=1e-5, msg=f"{name}: loss")
        torch.testing.assert_close(got["grad_proj"], single["grad_proj"], atol=1e-6, rtol=1e-5,
                                   msg=f"{name}: parameter gradient")
        for key in single["grad_inputs"]:
            torch.testing.assert_close(got["grad_inputs"][key], single["grad_inputs"][key], atol=1e-6, rtol=1e-5,
                                       msg=f"{name}: gradient of {key}")
        assert single["grad_proj"].abs().sum() > 0, name


def _local_negatives_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        case = _cases()["unequal_valid"]
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])

        def no_collective(*args, **kwargs):
            raise AssertionError("local_negatives=True ran a collective")

        import sicsrec.losses as losses  # any all_gather in the flagged path now fails loudly
        losses.dist.all_gather = losses.dist_nn.all_gather = no_collective
        out = info_nce(case["floats"]["query"][rows], case["floats"]["key"][rows], local_negatives=True,
                       **{k: v[rows] for k, v in case["others"].items()}, **case["kwargs"])
        torch.save(out.loss, os.path.join(out_dir, f"local-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_local_negatives_use_only_this_ranks_rows(tmp_path):
    """`local_negatives=True` (the benchmark's no-all-gather baseline) on each of 2 ranks equals
    a process without any group computing InfoNCE over that rank's rows alone."""
    mp.spawn(_local_negatives_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    case = _cases()["unequal_valid"]
    for rank in range(2):
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        alone = info_nce(case["floats"]["query"][rows], case["floats"]["key"][rows],
                         **{k: v[rows] for k, v in case["others"].items()}, **case["kwargs"]).loss
        torch.testing.assert_close(torch.load(tmp_path / f"local-{rank}.pt"), alone)

"""Row-sparse item-table gradients (`sparse_item_grad`, issue #15; sicsrec.optim, sicsrec.next_item):
the sparse gradient, densified, is the dense one of the same sampled loss; SparseAdam + AdamW
against a hand-computed lazy Adam and an independent AdamW (with gradient clipping through the
engine); the combined optimizer's checkpoint round trip; exact resume of train_id; the refused
combinations; 2 gloo ranks under DDP == 1 process on the concatenated batch (slow)."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sicsrec import optim as optim_module
from sicsrec.config import SICSRecConfig, TrainConfig, TSSRConfig
from sicsrec.engine import build_engine
from sicsrec.models.content_sasrec import ContentSASRec
from sicsrec.models.gru4rec import GRU4Rec
from sicsrec.models.sasrec import SASRec
from sicsrec.models.sicsrec import SICSRec
from sicsrec.next_item import NextItemCriterion, NextItemParams, next_item_loss, popularity_probs
from sicsrec.optim import SparseDenseOptimizer, build_optimizer
from sicsrec.runtime.dist import DistEnv
from sicsrec.train import NextItemLoss, TrainingInterrupted, train_id
from tests.test_losses import _free_port
from tests.test_train_id import TINY, _losses, _torchrun, make_dataset

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, source="none")
SAMPLED = dict(loss="sampled", num_negatives=6, loss_chunk=4)  # sparse: the logits 4 target rows at a time
NUM_ITEMS, LENGTH = 40, 6


def _model(kind: str = "sasrec", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "sasrec":
        return SASRec(NUM_ITEMS, 8, 1, 2, 0.0, LENGTH)
    return GRU4Rec(NUM_ITEMS, 8, 1, 0.0, LENGTH)


def _loss_module(kind: str = "sasrec", sparse: bool = True, seed: int = 0, **params) -> NextItemLoss:
    cfg = TrainConfig(**{**SAMPLED, **params}, sparse_item_grad=sparse)
    module = NextItemLoss(_model(kind, seed), NextItemCriterion.from_config(cfg))
    return module


def _batch(seed: int, rows: int = 5):
    """Left-padded [rows, LENGTH] inputs and targets (padding 0), items from a part of the catalog."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS // 2 + 1, (rows, LENGTH + 1), generator=g) + (seed % 2) * (NUM_ITEMS // 2)
    items[0, :3] = 0
    items[1, :1] = 0
    return items[:, :-1], items[:, 1:]


def _mean_loss(module, inputs, targets, draw_seed: int):
    torch.manual_seed(draw_seed)  # the criterion draws its negatives from torch's global RNG
    loss_sum, count = module(inputs, targets)
    return loss_sum / count


def _grads(module) -> dict:
    return {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for name, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_sparse_gradient_densified_equals_the_dense_gradient(kind):
    dense = _loss_module(kind, sparse=False)
    sparse = copy.deepcopy(dense)
    sparse.criterion = NextItemCriterion(dataclasses.replace(dense.criterion.params, sparse_item_grad=True))
    table = sparse.recommender.use_sparse_item_grad()
    assert table is sparse.recommender.item_emb.weight and sparse.recommender.item_emb.sparse
    inputs, targets = _batch(1)
    _mean_loss(dense, inputs, targets, 7).backward()
    _mean_loss(sparse, inputs, targets, 7).backward()
    assert table.grad.is_sparse and not dense.recommender.item_emb.weight.grad.is_sparse
    got, want = _grads(sparse), _grads(dense)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    # only the rows the step touched (inputs and candidates) are in the sparse gradient; never padding
    rows = set(table.grad.coalesce().indices()[0].tolist())
    assert 0 not in rows and len(rows) < NUM_ITEMS
    assert rows >= set(inputs[inputs != 0].tolist()) | set(targets[targets != 0].tolist())
    touched = want["recommender.item_emb.weight"].abs().sum(1) > 0
    assert set(touched.nonzero()[:, 0].tolist()) <= rows


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampled_loss_sparse_candidates_equal_dense(sampler):
    """The criterion alone: the candidates' rows gathered sparse give the same loss and table gradient."""
    g = torch.Generator().manual_seed(3)
    hidden, table = torch.randn(4, 5, 8, generator=g), torch.randn(NUM_ITEMS + 1, 8, generator=g)
    targets = torch.randint(1, NUM_ITEMS + 1, (4, 5), generator=g)
    targets[0, :2] = 0
    probs = popularity_probs(torch.randint(0, 9, (NUM_ITEMS + 1,), generator=g).double())
    negatives = torch.randint(1, NUM_ITEMS + 1, (9,), generator=g)
    results = []
    for sparse in (False, True):
        h, e = hidden.clone().requires_grad_(True), table.clone().requires_grad_(True)
        params = NextItemParams(loss="sampled", sampler=sampler, sparse_item_grad=sparse, loss_chunk=3)
        out = next_item_loss(h, e, targets, params, probs if sampler == "popularity" else None, negatives=negatives)
        out.loss_sum.backward()
        assert e.grad.is_sparse == sparse
        results.append((out.loss_sum.detach(), h.grad, e.grad.to_dense(), out.stats))
    (loss_d, h_d, e_d, stats_d), (loss_s, h_s, e_s, stats_s) = results
    torch.testing.assert_close(loss_s, loss_d, atol=1e-6, rtol=1e-6)  # a sum of 18 CEs: fp32 rounding
    torch.testing.assert_close(h_s, h_d, atol=1e-6, rtol=0)
    torch.testing.assert_close(e_s, e_d, atol=1e-6, rtol=0)
    assert stats_s == stats_d


def test_chunked_candidate_ce_fallback_equals_linear_cross_entropy(monkeypatch):
    """A torch without F.linear_cross_entropy: the checkpointed chunk loop, logQ bias included."""
    from sicsrec import next_item

    g = torch.Generator().manual_seed(5)
    hidden, rows = torch.randn(11, 8, generator=g), torch.randn(9, 8, generator=g)
    bias, targets = torch.randn(9, generator=g), torch.randint(0, 9, (11,), generator=g)
    results = []
    for fallback in (False, True):
        if fallback:
            monkeypatch.delattr(next_item.F, "linear_cross_entropy")
        h, w = hidden.clone().requires_grad_(True), rows.clone().requires_grad_(True)
        loss = next_item._linear_ce(h, w, targets, 4, bias)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    reference = torch.nn.functional.cross_entropy(hidden @ rows.T + bias, targets, reduction="sum")
    for got in results:
        torch.testing.assert_close(got[0], reference, atol=1e-5, rtol=1e-6)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the optimizer

def _lazy_adam(param, grad, state, lr, betas=(0.9, 0.999), eps=1e-8):
    """Hand-computed lazy Adam (torch.optim.SparseAdam's update): only the rows in `grad` move;
    step t counts every step; step size lr * sqrt(1 - b2^t) / (1 - b1^t), eps added to sqrt(v)."""
    b1, b2 = betas
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("m", torch.zeros_like(param))
    v = state.setdefault("v", torch.zeros_like(param))
    rows = grad.abs().sum(1) > 0
    m[rows] = b1 * m[rows] + (1 - b1) * grad[rows]
    v[rows] = b2 * v[rows] + (1 - b2) * grad[rows] ** 2
    t = state["step"]
    step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    param[rows] -= step_size * m[rows] / (v[rows].sqrt() + eps)
    return rows


@pytest.mark.parametrize("kind, weight_decay, grad_clip", [("sasrec", 0.0, 0.0), ("sasrec", 0.1, 0.05),
                                                            ("gru4rec", 0.0, 0.05)])
def test_one_step_sparse_adam_and_adamw_against_a_reference(kind, weight_decay, grad_clip, caplog):
    """Two engine steps (touching different rows) of the combined optimizer, clipping included, vs
    an independent AdamW on the dense parameters and a hand-computed lazy Adam on the table."""
    cfg = TrainConfig(**SAMPLED, lr=0.01, weight_decay=weight_decay, grad_clip=grad_clip, sparse_item_grad=True)
    module = _loss_module(kind)
    with caplog.at_level(logging.WARNING, logger="sicsrec.optim"):
        optimizer = build_optimizer(module, cfg)
    assert ("item table (SparseAdam) gets none" in caplog.text) == (weight_decay > 0)
    assert isinstance(optimizer, SparseDenseOptimizer)
    assert isinstance(optimizer.sparse, torch.optim.SparseAdam) and isinstance(optimizer.dense, torch.optim.AdamW)
    assert [p for g in optimizer.sparse.param_groups for p in g["params"]] == [module.recommender.item_emb.weight]
    assert len(optimizer.param_groups) == 2 and "weight_decay" not in optimizer.sparse.param_groups[0]
    engine = build_engine(module, optimizer, SINGLE, dataclasses.replace(cfg, engine="single"))

    reference = {name: p.detach().clone() for name, p in module.named_parameters()}
    table_name = "recommender.item_emb.weight"
    ref_dense = {name: torch.nn.Parameter(p) for name, p in reference.items() if name != table_name}
    ref_adamw = torch.optim.AdamW(list(ref_dense.values()), lr=cfg.lr, weight_decay=weight_decay)
    ref_table, table_state = reference[table_name], {}
    moved = []
    for step, seed in enumerate((1, 2)):
        inputs, targets = _batch(seed)
        engine.backward(_mean_loss(engine, inputs, targets, 10 + step))
        grads = _grads(module)
        assert module.recommender.item_emb.weight.grad.is_sparse
        engine.step()
        assert all(p.grad is None for p in module.parameters())  # zero_grad(set_to_none=True)
        # the reference: clip by the total norm of the (dense) gradients, then the two updates
        coef = 1.0
        if grad_clip > 0:
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
            coef = min(1.0, grad_clip / (float(norm) + 1e-6))
            assert coef < 1.0  # the clip is active
        for name, p in ref_dense.items():
            p.grad = grads[name] * coef
        ref_adamw.step()
        moved.append(_lazy_adam(ref_table, grads[table_name] * coef, table_state, cfg.lr))
        for name, p in module.named_parameters():
            want = ref_table if name == table_name else ref_dense[name].detach()
            torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5, msg=f"step {step}: {name}")
    # lazy: the rows of step 1's gradient only moved in step 2 if step 2 touched them
    assert (moved[0] & ~moved[1]).any()
    state = optimizer.sparse.state[module.recommender.item_emb.weight]
    assert int(state["step"]) == 2
    untouched = ~(moved[0] | moved[1])
    assert untouched.any()
    assert (state["exp_avg"][untouched] == 0).all() and (state["exp_avg_sq"][untouched] == 0).all()


def test_gradient_clipping_of_sparse_gradients_is_that_of_dense_ones():
    dense = _loss_module(sparse=False)
    sparse = copy.deepcopy(dense)
    sparse.criterion = NextItemCriterion(dataclasses.replace(dense.criterion.params, sparse_item_grad=True))
    sparse.recommender.use_sparse_item_grad()
    inputs, targets = _batch(4)
    _mean_loss(dense, inputs, targets, 3).backward()
    _mean_loss(sparse, inputs, targets, 3).backward()
    norm_dense = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.01)
    norm_sparse = torch.nn.utils.clip_grad_norm_(sparse.parameters(), 0.01)
    torch.testing.assert_close(norm_sparse, norm_dense, atol=1e-6, rtol=1e-6)
    assert norm_dense > 0.01
    got, want = _grads(sparse), _grads(dense)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-7, rtol=1e-5, msg=name)


def test_checkpoint_round_trip_of_the_combined_optimizer(tmp_path):
    cfg = TrainConfig(**SAMPLED, lr=0.01, sparse_item_grad=True)

    def make():
        module = _loss_module()
        return module, build_engine(module, build_optimizer(module, cfg), SINGLE, dataclasses.replace(cfg, engine="single"))

    def step(engine, seed):
        inputs, targets = _batch(seed)
        engine.backward(_mean_loss(engine, inputs, targets, seed))
        engine.step()

    module, engine = make()
    for seed in (1, 2):
        step(engine, seed)
    engine.save(tmp_path / "ckpt", {"epoch": 0})
    saved = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)["optimizer"]
    assert set(saved["sparse_dense"]) == {"dense", "sparse"}
    resumed_module, resumed = make()
    assert resumed.load(tmp_path / "ckpt") == {"epoch": 0}
    for name, opt in resumed.optimizer.optimizers.items():  # the state is back, moment for moment
        original = engine.optimizer.optimizers[name].state_dict()
        restored = opt.state_dict()
        assert restored["param_groups"] == original["param_groups"]
        for key, values in original["state"].items():
            for field, value in values.items():
                restored_value = torch.as_tensor(restored["state"][key][field])
                assert torch.equal(restored_value, torch.as_tensor(value)), (name, field)
    for seed in (3, 4):  # and both continue alike
        step(engine, seed)
        step(resumed, seed)
    for (name, a), b in zip(module.named_parameters(), resumed_module.parameters()):
        assert torch.equal(a, b), name
    # a plain AdamW state (a checkpoint without sparse_item_grad) is refused clearly
    with pytest.raises(ValueError, match="not a SparseDenseOptimizer's"):
        resumed.optimizer.load_state_dict(torch.optim.AdamW(module.parameters()).state_dict())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.3, epochs=3, patience=3, grad_clip=1.0, **SAMPLED, sparse_item_grad=True)
    full = train_id(cfg, prepared, tmp_path / "full", seed=1)["metrics"]
    with pytest.raises(TrainingInterrupted):
        train_id(cfg, prepared, tmp_path / "killed", seed=1, stop_after_epoch=0)
    torch.manual_seed(12345)  # a fresh process would not continue the old RNG stream
    resumed = train_id(cfg, prepared, tmp_path / "killed", seed=1)["metrics"]
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["epochs_run"] == 3
    # the same first step as the dense optimizer (same weights, same negatives); then lazy Adam differs
    dense = train_id(dataclasses.replace(cfg, sparse_item_grad=False, epochs=1), prepared, tmp_path / "dense",
                     seed=1)["metrics"]
    assert dense["epochs_run"] == 1
    assert _losses(tmp_path / "dense")[0] == pytest.approx(_losses(tmp_path / "full")[0], rel=1e-6)


# ---------------------------------------------------------------- refused combinations

def test_refused_losses_and_values():
    for loss in ("full", "chunked"):
        with pytest.raises(ValueError, match=rf"train_id\.sparse_item_grad=true needs train_id\.loss=sampled, "
                                             rf"got loss={loss}"):
            NextItemParams.from_config(TrainConfig(loss=loss, sparse_item_grad=True))
        with pytest.raises(ValueError, match=r"tssr\.train\.sparse_item_grad=true needs tssr\.train\.loss=sampled"):
            NextItemCriterion.from_config(TrainConfig(loss=loss, sparse_item_grad=True), None, "tssr.train")
    with pytest.raises(ValueError, match=r"train_id\.sparse_item_grad must be true or false"):
        NextItemParams.from_config(TrainConfig(**SAMPLED, sparse_item_grad="yes"))


def test_refused_in_the_step1_trainer(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    with pytest.raises(ValueError, match=r"train_id\.sparse_item_grad=true needs train_id\.loss=sampled"):
        train_id(TrainConfig(**TINY, sparse_item_grad=True, epochs=1), prepared, tmp_path / "a", seed=0)
    with pytest.raises(ValueError, match=r"train_id\.sparse_item_grad=true needs train_id\.engine single or ddp"):
        train_id(TrainConfig(**TINY, **SAMPLED, sparse_item_grad=True, engine="deepspeed", epochs=1), prepared,
                 tmp_path / "b", seed=0)


def test_refused_models_name_the_section():
    from sicsrec.train_sicsrec import SICSRecLoss
    from sicsrec.train_tssr import TSSRLoss, build_recommender

    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(NUM_ITEMS + 1, 6, generator=g), torch.randn(NUM_ITEMS + 1, 5, generator=g)
    sasrec = SASRec(NUM_ITEMS, 8, 1, 2, 0.0, LENGTH)
    tssr_cfg = TSSRConfig(content="cache", hidden=8, heads=2, uni_layers=1, multi_layers=1, dropout=0.0,
                          train=TrainConfig(max_len=LENGTH, **SAMPLED, sparse_item_grad=True))
    cases = {  # section: the loss module its trainer builds
        "train_id": NextItemLoss(ContentSASRec("content", text, image, None, 8, 1, 2, 0.0, LENGTH)),  # train-content
        "sicsrec.train": SICSRecLoss(SICSRec(sasrec, text, image), 0.1, 0.05, 0.01),
        "tssr.train": TSSRLoss(build_recommender(tssr_cfg, NUM_ITEMS, {"text": text, "image": image}), tssr_cfg),
    }
    cfg = TrainConfig(**SAMPLED, sparse_item_grad=True)
    for section, loss_module in cases.items():
        loss_module.criterion = NextItemCriterion.from_config(cfg, None, section)  # as Trainer.__init__ does
        name = type(loss_module.recommender).__name__
        with pytest.raises(ValueError, match=rf"^{section}\.sparse_item_grad=true is not supported for the {name}"):
            build_optimizer(loss_module, cfg)
    assert not SICSRecConfig().train.sparse_item_grad and not TSSRConfig().train.sparse_item_grad


def test_refused_with_more_than_one_nccl_rank(monkeypatch):
    monkeypatch.setattr(optim_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(optim_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(optim_module.dist, "get_backend", lambda: "nccl")
    with pytest.raises(ValueError, match=r"train_id\.sparse_item_grad=true with 2 NCCL ranks"):
        build_optimizer(_loss_module(), TrainConfig(**SAMPLED, sparse_item_grad=True))


def test_default_is_the_dense_adamw():
    cfg = TrainConfig(**SAMPLED)
    module = _loss_module(sparse=False)
    optimizer = build_optimizer(module, cfg)
    assert type(optimizer) is torch.optim.AdamW and not module.recommender.item_emb.sparse


def test_launcher_config_takes_the_key(tmp_path):
    from launcher.config import ConfigError, load_config as load

    path = tmp_path / "c.yaml"
    path.write_text("train_id:\n  loss: sampled\n  sparse_item_grad: true\n")
    assert load(path).train_id.sparse_item_grad is True
    path.write_text("train_id:\n  sparse_item_grad: 3\n")
    with pytest.raises(ConfigError, match="sparse_item_grad"):
        load(path)


# ---------------------------------------------------------------- 2 gloo ranks (DDP) == 1 process

ROWS = (3, 5)  # the two ranks' local batches (unequal)


def _ddp_case(rank: int, world: int, kind: str) -> dict:
    """One engine step (DDP over `world` ranks, or one process on the concatenated batch) with grad
    clipping: the averaged gradients (densified) and the parameters after the step."""
    cfg = TrainConfig(**SAMPLED, lr=0.01, grad_clip=0.05, sparse_item_grad=True)
    module = _loss_module(kind)
    optimizer = build_optimizer(module, cfg)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, source="none")
    engine = build_engine(module, optimizer, env, dataclasses.replace(cfg, engine="ddp" if world > 1 else "single"))
    inputs, targets = _batch(5, rows=sum(ROWS))
    if world > 1:
        rows = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
        inputs, targets = inputs[rows], targets[rows]
    torch.manual_seed(11)  # rank 0 draws the negatives (as the single process does) and broadcasts
    loss_sum, count = engine(inputs, targets)
    total = count.clone().float()
    if world > 1:
        dist.all_reduce(total)
    engine.backward(loss_sum * world / total)
    grads = _grads(module)
    table_sparse = module.recommender.item_emb.weight.grad.is_sparse
    engine.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "table_sparse": table_sparse}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {kind: _ddp_case(rank, world, kind) for kind in ("sasrec", "gru4rec")}
        parts = [None] * world
        dist.all_gather_object(parts, results)
        if rank == 0:
            torch.save(parts, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_under_ddp_equal_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "results.pt", weights_only=False)
    for kind in ("sasrec", "gru4rec"):
        single = _ddp_case(0, 1, kind)
        for rank, parts in enumerate(ranks):
            got = parts[kind]
            assert got["table_sparse"], (kind, rank)  # DDP's all-reduce kept the gradient sparse
            for name, want in single["grads"].items():
                torch.testing.assert_close(got["grads"][name], want, atol=1e-6, rtol=1e-5,
                                           msg=f"{kind} rank {rank}: grad {name}")
            for name, want in single["params"].items():
                torch.testing.assert_close(got["params"][name], want, atol=1e-6, rtol=1e-5,
                                           msg=f"{kind} rank {rank}: {name}")


@pytest.mark.slow
def test_two_ddp_ranks_follow_the_single_process_loss_curve(tmp_path):
    """train_id with sparse_item_grad under torchrun (2 gloo ranks, killed after epoch 0 and resumed)
    follows the single process's loss curve on the same global batches."""
    prepared = make_dataset(tmp_path / "prepare", num_users=37)
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=2, patience=5, engine="single", **SAMPLED, sparse_item_grad=True)
    single = train_id(cfg, prepared, tmp_path / "single", seed=0)["metrics"]
    _torchrun(prepared, tmp_path / "ddp", dataclasses.replace(cfg, engine="ddp"))
    got = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert got["engine"] == "ddp" and got["world_size"] == 2
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    for split in ("valid", "test"):
        for name, value in single[split].items():
            assert got[split][name] == pytest.approx(value, abs=1e-6), (split, name)

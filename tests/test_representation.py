"""Alignment / uniformity (Wang & Isola 2020) against hand computation, and measured on finished
step-1 and step-2 stages against a direct per-user computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from launcher import stages
from shards.prepared import PreparedDataset
from shards.windows import pad_left
from sicsrec.representation import alignment, load_sicsrec_model, stage_representation, uniformity
from sicsrec.train import load_id_encoder
from tests.helpers import copy_run
from tests.test_train_sicsrec import overrides


def test_alignment_hand_computed():
    # pairs: identical directions (distance 0) and orthogonal ones (squared distance 2): mean 1
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert alignment(x, y) == pytest.approx(1.0)
    assert alignment(x, x * 7) == pytest.approx(0.0)  # scale-free: rows are L2-normalised
    # opposite directions: ||a - b||^2 = 4
    assert alignment(torch.tensor([[1.0, 1.0]]), torch.tensor([[-2.0, -2.0]])) == pytest.approx(4.0)


def test_uniformity_hand_computed():
    # e1, e2, -e1: squared distances 2 (e1,e2), 4 (e1,-e1), 2 (e2,-e1); each pair counted both ways
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert uniformity(x) == pytest.approx(expected)
    assert uniformity(x, chunk=1) == pytest.approx(expected)  # chunking does not change the sum
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0)  # all equal: exp(0) everywhere
    with pytest.raises(ValueError):
        uniformity(torch.ones(1, 3))
    with pytest.raises(ValueError):
        alignment(torch.ones(2, 3), torch.ones(3, 3))


def test_uniformity_matches_brute_force_on_random_points():
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    z = F.normalize(x.double(), dim=-1)
    terms = [math.exp(-2 * float((z[i] - z[j]).pow(2).sum())) for i in range(37) for j in range(37) if i != j]
    assert uniformity(x, chunk=8) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-9)


@pytest.fixture(scope="module")
def run(step1_run, tmp_path_factory):
    root = copy_run(step1_run, tmp_path_factory.mktemp("repr"))
    stages.run(overrides(root), "train-sicsrec")
    return root


def _direct(model, dataset, pair_table, item_table):
    """User by user, no batching: alignment and uniformity by their definitions."""
    reprs = torch.stack([model.sequence_repr(pad_left([u.history("test")], model.max_len))[0]
                         for u in dataset.users]).detach()
    targets = torch.tensor([u.target("test") for u in dataset.users])
    a = F.normalize(reprs.double(), dim=-1)
    b = F.normalize(pair_table[targets].double(), dim=-1)
    items = F.normalize(item_table[1:].double(), dim=-1)
    distances = torch.cdist(items, items).pow(2)
    off_diagonal = ~torch.eye(len(items), dtype=torch.bool)
    return (a - b).pow(2).sum(1).mean().item(), torch.exp(-2 * distances[off_diagonal]).mean().log().item()


def test_step1_stage_representation(run):
    model = load_id_encoder(run / "train_id")
    dataset = PreparedDataset.load(run / "prepare")
    table = model.item_emb.weight.detach()
    align, uniform = _direct(model, dataset, table, table)
    got = stage_representation("train-id", run, overrides(run))
    assert got["alignment"] == pytest.approx(align, rel=1e-5) and got["uniformity"] == pytest.approx(uniform, rel=1e-5)
    assert got["pairs"] == len(dataset.users) and got["items"] == dataset.num_items


@torch.no_grad()
def test_step2_stage_representation_uses_the_concl_space(run):
    cfg = overrides(run)
    model = load_sicsrec_model(run, cfg)
    dataset = PreparedDataset.load(run / "prepare")
    content = model.unified_content(torch.arange(dataset.num_items + 1))
    align, uniform = _direct(model, dataset, content, content)
    got = stage_representation("train-sicsrec", run, cfg)
    assert got["alignment"] == pytest.approx(align, rel=1e-5) and got["uniformity"] == pytest.approx(uniform, rel=1e-5)
    # the scoring space: step 2's own ID table (it keeps training under the default fixed_id_enc)
    id_table = model.id_encoder.item_emb.weight.detach()
    id_align, id_uniform = _direct(model, dataset, id_table, id_table)
    assert got["id_alignment"] == pytest.approx(id_align, rel=1e-5)
    assert got["id_uniformity"] == pytest.approx(id_uniform, rel=1e-5)
    step1 = load_id_encoder(run / "train_id").item_emb.weight.detach()
    assert not torch.equal(id_table, step1)  # E_id trained in step 2

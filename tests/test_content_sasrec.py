"""SASRec-Content / SASRec-Hybrid: shapes, no future leakage, ID-agnostic content scoring, and a
tiny run through the stage (prepare + embedding cache -> <run_dir>/sasrec_<variant>)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher import stages
from launcher.config import load_config
from shards.prepared import PreparedDataset
from sicsrec.models.content_sasrec import ContentSASRec
from sicsrec.runtime.rundir import run_stage
from sicsrec.train_content import train_content
from tests.test_train_id import TINY, make_dataset

N = 20


def build(variant, seed=0):
    torch.manual_seed(seed)
    has_image = torch.ones(N + 1, dtype=torch.bool)
    has_image[4] = False
    return ContentSASRec(variant, torch.randn(N + 1, 12), torch.randn(N + 1, 10), has_image, hidden=16, layers=2,
                         heads=2, dropout=0.0, max_len=8).eval()


@pytest.mark.parametrize("variant", ["content", "hybrid"])
def test_shapes_and_no_position_sees_the_future(variant):
    model = build(variant)
    seq = torch.tensor([[0, 0, 3, 7, 5, 9, 11, 2]])
    h = model.hidden_states(seq)
    assert h.shape == (1, 8, 16)
    scores = model.score_all(seq)
    assert scores.shape == (1, N + 1) and torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([1, 4, 6])  # a different future for position 4
    assert torch.allclose(model.hidden_states(changed)[:, :5], h[:, :5], atol=1e-6)
    assert not torch.allclose(model.hidden_states(changed)[:, 5:], h[:, 5:], atol=1e-4)
    shifted = torch.tensor([[0, 0, 0, 0, 3, 7, 5, 9]])  # more left padding: real positions unchanged
    assert torch.allclose(model.hidden_states(shifted)[:, -4:], h[:, 2:6], atol=1e-5)


def test_content_items_are_their_adapted_embeddings_and_hybrid_adds_ids():
    model = build("content")
    items = torch.tensor([3, 4])
    expected = model.text_adapter(model.text_table[items])
    expected[0] += model.image_adapter(model.image_table[3])  # item 4 has no image: text alone
    assert torch.allclose(model.item_representations(items), expected, atol=1e-6)
    # ID-agnostic: two items with identical content get identical scores
    model.text_table[7] = model.text_table[8]
    model.image_table[7] = model.image_table[8]
    scores = model.score_all(torch.tensor([[1, 2, 3]]))
    assert scores[0, 7] == scores[0, 8]
    hybrid = build("hybrid")
    assert not any(n.startswith("item_emb") for n, _ in model.named_parameters())
    assert hybrid.item_emb.weight.requires_grad and not hybrid.text_table.requires_grad
    content = hybrid.text_adapter(hybrid.text_table[items[:1]]) + hybrid.image_adapter(hybrid.image_table[items[:1]])
    got = hybrid.item_representations(items[:1])
    assert torch.allclose(got, hybrid.fuse(torch.cat([hybrid.item_emb(items[:1]), content], -1)), atol=1e-6)


def test_tiny_run_learns_and_writes_its_stage(tmp_path):
    make_dataset(tmp_path / "prepare", num_users=40)
    run_stage(tmp_path / "prepare", "prepare", {}, {}, lambda out: {})
    ds = PreparedDataset.load(tmp_path / "prepare")
    # content = a one-hot-ish code of the item id, so a content model can learn the id drift
    text = np.zeros((ds.num_items + 1, ds.num_items + 1), dtype=np.float32)
    text[np.arange(1, ds.num_items + 1), np.arange(1, ds.num_items + 1)] = 1.0

    def cache(out):
        np.save(out / "text.npy", text)
        return {}

    run_stage(tmp_path / "embeddings", "encode", {}, {}, cache)
    sets = [f"run_dir={tmp_path}"] + [f"train_id.{k}={v}" for k, v in TINY.items()]
    sets += ["train_id.dropout=0.0", "train_id.epochs=8", "train_id.patience=8", "train_id.engine=single", "train_id.lr=0.01"]
    cfg = load_config(None, sets)
    for variant in ("content", "hybrid"):
        m = stages.run(cfg, f"train-{variant}")["metrics"]
        assert m["model"] == f"sasrec_{variant}" and m["epochs_run"] == 8
        saved = json.loads((tmp_path / f"sasrec_{variant}" / "metrics.json").read_text())
        losses = [h["loss"] for h in saved["history"]]
        assert losses[-1] < losses[0] - 0.1  # it learns
        assert saved["test"]["hit@10"] > 10 / ds.num_items  # better than chance on the drifting data
    done = json.loads((tmp_path / "sasrec_content" / "manifest.json").read_text())
    assert stages.run(cfg, "train-content")["finished_at"] == done["finished_at"]  # skipped: manifest matches
    with pytest.raises(ValueError, match="variant"):
        train_content(cfg.train_id, tmp_path / "prepare", tmp_path / "embeddings", tmp_path / "both", 0, "both")

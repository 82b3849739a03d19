"""train_id.item_init=pca: E_id starts from a PCA of the cached content embeddings
(sicsrec.embedding_cache.content_pca), checked against a numpy eigen-decomposition."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sicsrec.config import TrainConfig
from sicsrec.embedding_cache import content_pca
from sicsrec.runtime.rundir import fingerprinted, read_manifest, run_stage
from sicsrec.train import load_id_encoder, train_id
from tests.test_train_id import TINY, make_dataset


def cache(num_items: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    has_image = torch.rand(num_items + 1, generator=g) > 0.3
    return {"text": torch.randn(num_items + 1, 12, generator=g), "image": torch.randn(num_items + 1, 6, generator=g),
            "has_image": has_image}


def reference(tables: dict, k: int) -> np.ndarray:
    """The items' [text | image] rows, unit-norm each, no image = zeros, centred, on the top-k
    eigenvectors of their covariance."""
    def unit(x):
        x = x.numpy().astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    content = np.concatenate([unit(tables["text"]), unit(tables["image"]) * tables["has_image"].numpy()[:, None]], 1)[1:]
    content -= content.mean(0)
    values, vectors = np.linalg.eigh(content.T @ content)
    return content @ vectors[:, np.argsort(values)[::-1][:k]]


def test_content_pca_is_the_principal_components_at_the_requested_scale():
    tables = cache(40)
    torch.manual_seed(0)
    out = content_pca(tables, dim=8, std=0.02)
    assert out.shape == (41, 8) and not out[0].any()  # padding row zero
    ref = reference(tables, 8)
    ref *= 0.02 / ref.std(ddof=1)  # torch.std: the sample std
    for j in range(8):  # each component up to its sign
        sign = np.sign(np.dot(out[1:, j].double().numpy(), ref[:, j]))
        np.testing.assert_allclose(out[1:, j].numpy() * sign, ref[:, j], atol=1e-5)
    assert float(out[1:].std()) == pytest.approx(0.02, rel=1e-3)
    wide = content_pca(tables, dim=25, std=0.02)  # beyond the 18 dims of content: random columns
    assert wide.shape == (41, 25) and wide[1:, 18:].std() == pytest.approx(0.02, rel=0.2) and not wide[0].any()


def test_train_id_starts_its_item_table_at_the_pca(tmp_path: Path):
    prepared = make_dataset(tmp_path / "prepare")
    num_items = 25
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    tables = cache(num_items)
    for name, value in tables.items():
        np.save(embeddings / f"{name}.npy", value.numpy())
    run_stage(embeddings, "encode", {"test": 1}, {}, lambda out: {})  # a finished encode stage
    cfg = TrainConfig(**dict(TINY, lr=0.0), dropout=0.0, epochs=1, patience=1, item_init="pca")
    manifest = train_id(cfg, prepared, tmp_path / "out", seed=0, embeddings_dir=embeddings)
    assert manifest["inputs"]["embeddings"] == read_manifest(embeddings)["fingerprint"]
    table = load_id_encoder(tmp_path / "out").item_emb.weight.detach()  # lr 0: still the initial table
    ref = reference(tables, TINY["hidden"])
    for j in range(TINY["hidden"]):
        corr = np.corrcoef(table[1:, j].numpy(), ref[:, j])[0, 1]
        assert abs(corr) > 0.9999, j
    assert float(table[1:].std()) == pytest.approx(0.02, rel=0.1)  # SASRec's own init scale
    with pytest.raises(ValueError, match="item_init=pca needs"):
        train_id(cfg, prepared, tmp_path / "out2", seed=0)
    with pytest.raises(ValueError, match="item_init must be"):
        train_id(dataclasses.replace(cfg, item_init="kmeans"), prepared, tmp_path / "out3", seed=0)
    assert "item_init" not in fingerprinted(TrainConfig())  # earlier step-1 runs keep their fingerprint

"""The item embedding cache the `encode` stage writes (<run_dir>/embeddings): reading it, and a
PCA of it that can initialise the step-1 item table E_id (`train_id.item_init: pca`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_embedding_cache(folder: Path) -> dict:
    """text.npy / image.npy [N+1, d] and has_image.npy [N+1] written by the `encode` stage."""
    tables = {}
    for name in ("text", "image", "has_image"):
        path = Path(folder) / f"{name}.npy"
        if path.exists():
            tables[name] = torch.from_numpy(np.load(path))
    if "text" not in tables and "image" not in tables:
        raise FileNotFoundError(f"{folder} holds no text.npy or image.npy: run `launcher encode` first")
    return tables


def content_pca(tables: dict, dim: int, std: float) -> torch.Tensor:
    """[N+1, dim] item rows from the principal components of the items' content: the L2-normalised
    text and image embeddings side by side (an item without an image has zeros there), centred over
    the items, projected on the top components and scaled to `std` overall (the random init's
    scale, so training starts at the usual magnitudes). Components beyond the content's rank are
    filled normal(0, std); row 0 (padding) is zero."""
    parts = [F.normalize(tables["text"].float(), dim=-1)] if "text" in tables else []
    if "image" in tables:
        has_image = tables.get("has_image", torch.ones(tables["image"].shape[0], dtype=torch.bool))
        parts.append(F.normalize(tables["image"].float(), dim=-1) * has_image[:, None].float())
    content = torch.cat(parts, dim=-1)[1:].double()
    content = content - content.mean(0)
    _, _, v = torch.linalg.svd(content, full_matrices=False)
    k = min(dim, v.shape[0])
    projected = content @ v[:k].T
    projected = projected * (std / projected.std())
    out = torch.empty(content.shape[0] + 1, dim).normal_(0, std)  # the torch seed the model was built under
    out[1:, :k] = projected.float()
    out[0] = 0
    return out

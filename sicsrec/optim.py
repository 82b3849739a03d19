"""The optimizer of the recommender trainers (one place, so that every trainer builds it alike)."""
from __future__ import annotations

import torch
from torch import nn


def build_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over `module`'s trainable parameters with the section's lr and weight decay."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

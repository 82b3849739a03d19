"""TSSR (two-stream sequential recommendation, §3 of the TSSR paper).

  E_id = M_id[x] + P_id,  E_con = W_c c + P_con      (c: content features of the sequence's items)
  F_id, F_con = two independent causal transformer encoders (L_uni layers each)
  F̄_id = CrossAttn(query F_id, key/value F_con), F̄_con = CrossAttn(query F_con, key/value F_id)  (L_multi layers)
  S = sigmoid(W [F̄_id, F̄_con] + b),  F = S * F̄_id + (1 - S) * F̄_con       (eq. 3)
  scores = F . M_id (inner product with the ID table, tied), padding -inf.

The content features come from outside: the text/image encoders run in the loop in end-to-end
training, or the item embedding cache is looked up in the cheaper mode (sicsrec/train_tssr.py).
Every attention (self and cross) uses the causal padding mask: no position ever attends to a
later one, and a padding row attends only to itself (the official code let padding rows with
no valid key attend evenly to every position, the future included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sicsrec.models.sasrec import (TransformerBlock, _init_weights, causal_padding_mask, item_positions,
                                   tied_logits)
from sicsrec.models.sasrec import masked_mean as mean_pool  # the mean over real positions (L_u's F̃)
from sicsrec.models.sicsrec import CrossAttentionBlock


@dataclass
class TSSROutput:
    fused: torch.Tensor  # F [B, L, d]: next-item prediction
    id_states: torch.Tensor  # F_id [B, L, d]: unimodal ID encoder output (L_u, L_i)
    content_states: torch.Tensor  # F_con [B, L, d]
    id_emb: torch.Tensor  # E_id items' ID embeddings [B, L, d] (no positions): L_i targets
    content_emb: torch.Tensor  # E_con items' content embeddings [B, L, d] (no positions)
    real: torch.Tensor  # [B, L] bool, True at non-padding positions


class TSSR(nn.Module):
    def __init__(self, num_items: int, content_dim: int, hidden: int = 128, heads: int = 4, uni_layers: int = 2,
                 multi_layers: int = 1, dropout: float = 0.2, max_len: int = 10):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.content_proj = nn.Linear(content_dim, hidden)
        self.id_pos = nn.Embedding(max_len, hidden)
        self.content_pos = nn.Embedding(max_len, hidden)
        self.id_norm, self.content_norm = nn.LayerNorm(hidden, eps=1e-12), nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

        def blocks(n, cls=TransformerBlock):
            return nn.ModuleList(cls(hidden, heads, hidden, dropout, "gelu") for _ in range(n))

        self.id_encoder, self.content_encoder = blocks(uni_layers), blocks(uni_layers)
        self.id_cross, self.content_cross = blocks(multi_layers, CrossAttentionBlock), blocks(multi_layers, CrossAttentionBlock)
        self.gate = nn.Linear(2 * hidden, hidden)
        self.apply(_init_weights)

    def embed_content(self, features: torch.Tensor) -> torch.Tensor:
        """Content features [..., content_dim] -> E_con [..., d]."""
        return self.content_proj(features)

    def forward(self, items: torch.Tensor, content: torch.Tensor) -> TSSROutput:
        """items [B, L] left-padded ids; content [B, L, content_dim] features of those items."""
        batch, length = items.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        if content.shape[:2] != items.shape:
            raise ValueError(f"content features {tuple(content.shape)} do not match items {tuple(items.shape)}")
        mask = causal_padding_mask(items)
        real = items != 0
        positions = item_positions(items)
        id_emb = self.item_emb(items)
        content_emb = self.embed_content(content) * real[..., None]
        f_id = self.drop(self.id_norm(id_emb + self.id_pos(positions)))
        f_con = self.drop(self.content_norm(content_emb + self.content_pos(positions)))
        for block in self.id_encoder:
            f_id = block(f_id, mask)
        for block in self.content_encoder:
            f_con = block(f_con, mask)
        cross_id, cross_con = f_id, f_con
        for id_block, con_block in zip(self.id_cross, self.content_cross):
            cross_id, cross_con = id_block(cross_id, cross_con, mask), con_block(cross_con, cross_id, mask)
        gate = torch.sigmoid(self.gate(torch.cat([cross_id, cross_con], dim=-1)))
        fused = gate * cross_id + (1 - gate) * cross_con
        return TSSROutput(fused, f_id, f_con, id_emb, content_emb, real)

    def item_table(self) -> torch.Tensor:
        """[N+1, d] the ID table M_id that `logits` (and the training CE) score against."""
        return self.item_emb.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., N+1] fp32 scores F . M_id; padding item 0 is never a candidate (-inf)."""
        return tied_logits(hidden, self.item_table())

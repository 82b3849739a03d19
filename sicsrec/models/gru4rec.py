"""GRU4Rec (Hidasi et al. 2016) with full-softmax CE: the second ID baseline.

RecBole's layout: item embedding -> dropout -> GRU -> linear to the embedding size; scores
against the tied item embedding. Inputs are left-padded like SASRec's; the GRU runs on the real
items only (packed sequences), so a history's representation does not depend on its padding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sicsrec.models.sasrec import SequentialRecommender


def _shift_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of [B, L, ...] left by shift[b] positions."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None] + shift[:, None]) % length
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class GRU4Rec(SequentialRecommender):
    def __init__(self, num_items: int, hidden: int = 64, layers: int = 1, dropout: float = 0.3, max_len: int = 50):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.emb_drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bias=False)
        self.dense = nn.Linear(hidden, hidden)
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_config(cls, cfg, num_items: int) -> "GRU4Rec":
        """From the step-1 config (`train_id`: hidden, layers, dropout, max_len)."""
        return cls(num_items, cfg.hidden, cfg.layers, cfg.dropout, cfg.max_len)

    def use_sparse_item_grad(self) -> nn.Parameter:
        return self._sparse_item_emb()

    def hidden_states(self, items: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        lengths = (items != 0).sum(1).clamp(min=1)  # an empty history runs the GRU on one padding step
        pad = length - lengths
        right_padded = _shift_rows(items, pad)  # real items first, as pack_padded_sequence wants
        x = self.emb_drop(self.item_emb(right_padded))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)
        return self.dense(_shift_rows(out, (length - pad) % length))  # back to left padding

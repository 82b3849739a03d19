"""SASRec-Content and SASRec-Hybrid, the content baselines of the TSSR paper (Table 1, §4.1).

Both are SASRec (same blocks, positions, masking as sicsrec.models.sasrec) whose item
representation is built from the cached content embeddings (`<run_dir>/embeddings`, frozen
buffers) through a trainable MLP adapter to d:
  content  e_i = adapter(text_i) + adapter(image_i)         ID-agnostic: no item-id embedding
  hybrid   e_i = Linear(concat(E_id[i], adapter(content_i))) the ID embedding concatenated at input
Items without an image use their text alone. Scores are h . e_i against the same item
representations that form the input (tied, as in SASRec), computed for all items, padding -inf,
identically at train and test time.
"""
from __future__ import annotations

import torch
from torch import nn

from sicsrec.models.sasrec import PositionalTransformer, _init_weights
from sicsrec.models.sicsrec import ContentTables

VARIANTS = ("content", "hybrid")


class ContentSASRec(ContentTables, PositionalTransformer):
    def __init__(self, variant: str, text_table: torch.Tensor | None, image_table: torch.Tensor | None,
                 has_image: torch.Tensor | None = None, hidden: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.5, max_len: int = 50, ffn_dim: int = 0, activation: str = "relu"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if text_table is None and image_table is None:
            raise ValueError("SASRec-Content/Hybrid need a text or an image embedding table")
        num_rows = (text_table if text_table is not None else image_table).shape[0]
        self.variant, self.num_items = variant, num_rows - 1
        # No dropout inside the adapters: the scoring table must be the same at train and test time
        # (dropout acts on the sequence input, after the positions, as in SASRec).
        self.add_content_tables(text_table, image_table, has_image, num_rows, hidden, 0.0)
        self.item_emb = nn.Embedding(num_rows, hidden, padding_idx=0) if variant == "hybrid" else None
        self.fuse = nn.Linear(2 * hidden, hidden) if variant == "hybrid" else None
        self.build_encoder(hidden, layers, heads, dropout, max_len, ffn_dim, activation)
        self.apply(_init_weights)

    def item_representations(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """e_i for `items` (any shape), or for every row 0..N when items is None."""
        if items is None:
            items = torch.arange(self.num_items + 1, device=self.pos_emb.weight.device)
        content = 0
        for part in self.adapted_content(items):
            if part is not None:
                content = content + part
        if self.variant == "content":
            return content
        return self.fuse(torch.cat([self.item_emb(items), content], dim=-1))

    def input_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_representations(items)

    def item_table(self) -> torch.Tensor:
        """[N+1, d] every item's representation (the tied scoring table; `logits` uses it)."""
        return self.item_representations()

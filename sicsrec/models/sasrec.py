"""SASRec (Kang & McAuley 2018), the ID-modality sequence encoder of SICSRec (§3.4.2).

Layout (RecBole's SASRec, which the official SICSRec code builds on): item embedding + learnable
position embedding -> LayerNorm -> dropout -> N blocks of [causal self-attention, residual,
LayerNorm; point-wise FFN, residual, LayerNorm]. The FFN is ReLU(x W1 + b1) W2 + b2 with W1, W2
d x d by default (paper eq. 9); `ffn_dim`/`activation` give RecBole's variant (4d, GELU).

Inputs are left-padded with item 0: the last column is always the most recent item, so
`sequence_repr` is `hidden[:, -1]`. Positions count from the oldest real item (RecBole's
convention), so the hidden state at position t of a training window equals the representation
of the prefix up to t: training at every position matches evaluating prefixes.
Attention uses plain `nn.Linear` layers named q_proj/k_proj/v_proj/out_proj and ffn.fc1/fc2, so
SICSRec step 2 can wrap them with peft LoRA.

Scores are h . e_item with the input item embedding (tied; `tied_output=False` scores against a
separate output table `out_emb`); the padding column is -inf. `history_bias=True` adds a learned
offset b to the score of every item already in the history (in training: up to each position),
so the model can learn from the data how often users repeat an item instead of ranking the
last item first (h . e_last dominates with tied tables).
`use_sparse_item_grad` (`train_id.sparse_item_grad`) gives that table row-sparse gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
# parameter-name prefixes of what scores items in a SASRec besides its encoder (input table,
# untied output table, history bias): E_id in SICSRec step 2
ITEM_TABLE_PREFIXES = ("item_emb.", "out_emb.", "history_logit")
# the history bias is HISTORY_BIAS_SCALE * history_logit: Adam moves a parameter ~lr per step, and
# the bias's useful range is several logits (lr 1e-3 alone would need hundreds of epochs)
HISTORY_BIAS_SCALE = 10.0


def item_positions(items: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded [B, L] items: 0 = the oldest real item (RecBole's convention),
    so left padding never shifts a real item's position; padding positions get 0."""
    return ((items != 0).cumsum(1) - 1).clamp(min=0)


def causal_padding_mask(items: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask, True where query i may attend to key j: j <= i and key j is a
    real item. Each position may always attend to itself, so a padding row never has an empty
    softmax (no NaN) and never sees a future position."""
    length = items.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    real_key = (items != 0)[:, None, :]  # [B, 1, L]
    self_only = torch.eye(length, dtype=torch.bool, device=items.device)
    return ((causal & real_key) | self_only)[:, None]


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, d] states, [B, T] mask (bool or 0/1) -> [B, d] mean over the positions where mask
    is set (padding ignored; an all-padding row gives 0). The one copy behind
    sicsrec.encoders.mean_pool, sicsrec.models.tssr.mean_pool and sicsrec.losses.masked_mean."""
    weights = mask.unsqueeze(-1).to(seq.dtype)
    return (seq * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def history_columns(items: torch.Tensor, columns: int, per_position: bool = True) -> torch.Tensor:
    """[B, L] left-padded item ids -> bool [B, L, columns]: item j is in the history up to and
    including position t (per_position), or [B, columns] for the whole row. Padding (0) is never set."""
    batch, length = items.shape
    if per_position:
        index = items[:, None, :].expand(batch, length, length).tril()  # row t: items at positions <= t
        seen = torch.zeros(batch, length, columns, dtype=torch.bool, device=items.device)
        seen.scatter_(2, index, True)
    else:
        seen = torch.zeros(batch, columns, dtype=torch.bool, device=items.device).scatter_(1, items, True)
    seen[..., 0] = False
    return seen


def history_offsets(model, items: torch.Tensor, per_position: bool = True) -> torch.Tensor | None:
    """What `model`'s history bias adds to its scores: bias x history_columns(items) over its item
    table's columns ([B, L, N+1], or [B, N+1] for the whole row), or None without one. The one
    place the training losses and `score_all` take it from."""
    bias = model.history_bias()
    if bias is None:
        return None
    return bias * history_columns(items, model.item_table().shape[0], per_position)


def tied_logits(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., d] states, [N+1, d] item table (row 0 = padding) -> [..., N+1] fp32 scores
    h . e_item; padding item 0 is never a candidate (-inf). Every model's `logits`."""
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits: bf16 would tie many items
        scores = hidden.float() @ table.float().T
    scores[..., 0] = float("-inf")
    return scores


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from x [B, L, d]; keys/values from x, or from `context` [B, L, d] (another
        sequence of the same length: cross-attention, SICSRec's MMSD and TSSR's cross blocks)."""
        batch, length, hidden = x.shape
        source = x if context is None else context

        def split(t):
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(source)), split(self.v_proj(source))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(hidden, inner)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, activation: str):
        super().__init__()
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = FeedForward(hidden, inner, activation)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, context=None):
        x = self.attn_norm(x + self.drop(self.attn(x, mask, context)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class SequentialRecommender(nn.Module):
    """What every ID recommender offers: hidden states, the last-position representation and
    full-softmax scores against the (tied) item embedding table."""

    item_emb: nn.Embedding

    def hidden_states(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded item ids -> [B, L, d] hidden state at every position."""
        raise NotImplementedError

    def sequence_repr(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded item ids -> [B, d] user representation (last position)."""
        return self.hidden_states(items)[:, -1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(items)

    def item_table(self) -> torch.Tensor:
        """[N+1, d] the output item table that `logits` (and the training CE) score against; row 0
        is padding. Here the tied input embedding table."""
        return self.item_emb.weight

    def use_sparse_item_grad(self) -> nn.Parameter | None:
        """Switch the item table to row-sparse gradients (`train_id.sparse_item_grad`) and return
        it, or None where the model does not support that (the default). Supported by models
        whose item table is `item_emb.weight`, used in training only by the input lookup
        `item_emb(...)` and by the loss's candidate rows (sicsrec.next_item gathers them with a
        sparse F.embedding): SASRec and GRU4Rec. Call before DDP wraps the model (DDP reads
        `nn.Embedding.sparse` when it is built). Evaluation (`logits`) is unchanged."""
        return None

    def _sparse_item_emb(self) -> nn.Parameter:
        if self.item_table() is not self.item_emb.weight:
            raise TypeError(f"{type(self).__name__}: the item table is not item_emb.weight")
        self.item_emb.sparse = True
        return self.item_emb.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., N+1] fp32 scores h . e_item; padding item 0 is never a candidate (-inf)."""
        return tied_logits(hidden, self.item_table())

    def history_bias(self) -> torch.Tensor | None:
        """The learned offset added to the score of every item in the user's history
        (`train_id.history_bias`, SASRec), or None: most models have none."""
        logit = getattr(self, "history_logit", None)
        return None if logit is None else HISTORY_BIAS_SCALE * logit

    def score_all(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] histories -> [B, N+1] scores over all items (the evaluation `score_fn`)."""
        scores = self.logits(self.sequence_repr(items))
        offsets = history_offsets(self, items, per_position=False)
        return scores if offsets is None else scores + offsets


class PositionalTransformer(SequentialRecommender):
    """SASRec's sequence encoder over per-item input embeddings: learnable positions, LayerNorm,
    dropout, causal transformer blocks. Subclasses give `input_embeddings` and call `build_encoder`."""

    def build_encoder(self, hidden: int, layers: int, heads: int, dropout: float, max_len: int, ffn_dim: int,
                      activation: str) -> None:
        self.max_len = max_len
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, ffn_dim or hidden, dropout, activation)
                                    for _ in range(layers))

    def input_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(self, items: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}; truncate the history")
        x = self.emb_drop(self.emb_norm(self.input_embeddings(items) + self.pos_emb(item_positions(items))))
        mask = causal_padding_mask(items)
        for block in self.blocks:
            x = block(x, mask)
        return x


class SASRec(PositionalTransformer):
    def __init__(self, num_items: int, hidden: int = 64, layers: int = 2, heads: int = 2, dropout: float = 0.5,
                 max_len: int = 50, ffn_dim: int = 0, activation: str = "relu", tied_output: bool = True,
                 history_bias: bool = False):
        super().__init__()
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.out_emb = None if tied_output else nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.build_encoder(hidden, layers, heads, dropout, max_len, ffn_dim, activation)
        self.apply(_init_weights)
        # starts at 0: the plain SASRec function
        self.history_logit = nn.Parameter(torch.zeros(())) if history_bias else None

    @classmethod
    def from_config(cls, cfg, num_items: int) -> "SASRec":
        """From the step-1 config (`train_id`: hidden, layers, heads, dropout, max_len, ffn_dim, activation,
        tied_output, history_bias)."""
        return cls(num_items, cfg.hidden, cfg.layers, cfg.heads, cfg.dropout, cfg.max_len, cfg.ffn_dim, cfg.activation,
                   cfg.tied_output, cfg.history_bias)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight if self.out_emb is None else self.out_emb.weight

    def input_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_emb(items)

    def use_sparse_item_grad(self) -> nn.Parameter:
        return self._sparse_item_emb()


def _init_weights(module: nn.Module) -> None:
    """RecBole's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""SICSRec's sequence preference model (§3.4) and its step-2 set-up (§3.5).

  IMSE  the step-1 SASRec; in the default step-2 strategy (Table 9 "Fixed IDEnc") its layers are
        frozen and wrapped with peft LoRA (eq. 20) while its item table E_id keeps training
  content  cached text / image embeddings (frozen buffers) -> MLP adapters to d ->
           e_cont = (e_text + e_ima) / ||e_text + e_ima|| (eq. 10) + positions
  CMSE  causal transformer over the content sequence (eq. 11-12)
  MMSD  cross-attention decoder, query = IMSE states, key/value = CMSE states, then FFN (eq. 13-14);
        its layers are chained (the official code let only the last act)
  aggregation  h_a = Linear(concat(h_e, h_c, h_m)) (eq. 15); scores h_a . e_id (eq. 16) with the
        ID encoder's item table E_id, the padding column -inf, at train and test time alike.

`SICSRec.parameter_groups()` names the parts the Table 9 strategies freeze or train (id_emb,
id_enc, lora, content_emb, content_enc, mix); sicsrec.train_sicsrec applies them.

Deviations, chosen on purpose: the content positions are a learnable table shared by text and
image (eq. 6-7) initialised from the ID encoder's, because the ID copy is frozen in step 2 (and
unused without IMSE);
positions are added after the eq. 10 normalisation so they are not rescaled with the content.
Items without an image use their text alone (their image row is masked, not a zero vector
passed through the adapter's bias). `aggregate_init="identity"` starts the aggregation at
h_a = h_e (the h_c / h_m blocks zero), so with LoRA's B = 0 step 2 starts exactly at the step-1
model, as eq. 20's initialisation intends for the encoder; "random" is the paper's plain Linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sicsrec.models.sasrec import (ITEM_TABLE_PREFIXES, SASRec, SequentialRecommender, TransformerBlock,
                                   causal_padding_mask, item_positions)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ID_TABLE_NAMES = tuple("id_encoder." + prefix for prefix in ITEM_TABLE_PREFIXES)


@dataclass
class SICSRecVariant:
    """Ablations of Table 6/7 as switches (all True = the full model)."""
    use_imse: bool = True  # ID-modality sequence encoder
    use_cmse: bool = True  # content-modality sequence encoder
    use_mmsd: bool = True  # mix-modality sequence decoder
    l2norm: bool = True  # eq. 10 fusion; False = two content encoders (text, image) summed
    use_text: bool = True
    use_image: bool = True


class Adapter(nn.Sequential):
    def __init__(self, dim_in: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))


class ContentTables(nn.Module):
    """Cached text / image item embeddings [N+1, dim] (`text_table`, `image_table`; `has_image`)
    and their trainable MLP adapters to d (`text_adapter`, `image_adapter`); a missing table has
    neither. The tables are frozen buffers, or with `trainable_tables` parameters initialised
    from the cache (the official SICSRec code's choice); saved with the model either way, under
    the same names. Shared by SICSRec and the SASRec-Content/Hybrid baselines
    (sicsrec.models.content_sasrec)."""

    text_table: torch.Tensor | None
    image_table: torch.Tensor | None
    has_image: torch.Tensor

    def add_content_tables(self, text_table: torch.Tensor | None, image_table: torch.Tensor | None,
                           has_image: torch.Tensor | None, rows: int, hidden: int, dropout: float,
                           trainable_tables: bool = False) -> None:
        """Register the tables (each must have `rows` = N+1 rows) and build their adapters."""
        for name, table in (("text_table", text_table), ("image_table", image_table)):
            if table is not None and table.shape[0] != rows:
                raise ValueError(f"{name} has {table.shape[0]} rows, expected {rows} (padding + items)")
            copy = None if table is None else table.float().clone()
            if trainable_tables and copy is not None:
                self.register_parameter(name, nn.Parameter(copy))
            else:
                self.register_buffer(name, copy)
        mask = has_image if has_image is not None else torch.ones(rows, dtype=torch.bool)
        self.register_buffer("has_image", mask.bool().clone())
        self.text_adapter = Adapter(text_table.shape[1], hidden, dropout) if text_table is not None else None
        self.image_adapter = Adapter(image_table.shape[1], hidden, dropout) if image_table is not None else None

    def adapted_content(self, items: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text, image) adapter outputs [..., d] of items, None for a missing table; the image
        row is masked (zero) for items without an image, not a zero vector through the bias."""
        text = self.text_adapter(self.text_table[items]) if self.text_adapter is not None else None
        image = None
        if self.image_adapter is not None:
            image = self.image_adapter(self.image_table[items]) * self.has_image[items, None]
        return text, image


class CrossAttentionBlock(TransformerBlock):
    """A TransformerBlock whose keys/values come from another sequence (eq. 13-14)."""

    def forward(self, x, context, mask):
        return super().forward(x, mask, context)


class SICSRec(ContentTables):
    def __init__(self, id_encoder: SASRec, text_table: torch.Tensor | None, image_table: torch.Tensor | None,
                 has_image: torch.Tensor | None = None, content_layers: int = 2, decoder_layers: int = 1,
                 heads: int = 2, dropout: float = 0.5, variant: SICSRecVariant | None = None,
                 aggregate_init: str = "random", trainable_tables: bool = False):
        super().__init__()
        self.variant = v = variant or SICSRecVariant()
        if not (v.use_imse or v.use_cmse):
            raise ValueError("the model needs the ID encoder, the content encoder, or both")
        if v.use_mmsd and not (v.use_imse and v.use_cmse):
            raise ValueError("the mix decoder needs both the ID and the content encoder")
        text_table = text_table if v.use_text else None
        image_table = image_table if v.use_image else None
        if v.use_cmse and text_table is None and image_table is None:
            raise ValueError("the content encoder needs a text or an image embedding table")
        self.id_encoder = id_encoder
        hidden, num_items = id_encoder.item_emb.embedding_dim, id_encoder.num_items
        self.max_len = id_encoder.max_len
        self.add_content_tables(text_table, image_table, has_image, num_items + 1, hidden, dropout,
                                trainable_tables)
        self.content_pos = nn.Embedding(self.max_len, hidden)
        self.content_pos.weight.data.copy_(id_encoder.pos_emb.weight.data)
        self.content_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

        def blocks(n, cls=TransformerBlock):
            return nn.ModuleList(cls(hidden, heads, hidden, dropout, "relu") for _ in range(n))

        streams = 1 if v.l2norm or self.image_adapter is None or self.text_adapter is None else 2
        self.cmse = nn.ModuleList(blocks(content_layers) for _ in range(streams)) if v.use_cmse else None
        self.mmsd = blocks(decoder_layers, CrossAttentionBlock) if v.use_mmsd else None
        parts = int(v.use_imse) + int(v.use_cmse) + int(v.use_mmsd)
        self.aggregate = nn.Linear(parts * hidden, hidden)
        if aggregate_init == "identity" and v.use_imse:
            with torch.no_grad():  # h_e comes first in the concatenation
                self.aggregate.weight.zero_()
                self.aggregate.weight[:, :hidden].copy_(torch.eye(hidden))
                self.aggregate.bias.zero_()
        elif aggregate_init not in ("random", "identity"):
            raise ValueError(f"aggregate_init must be random or identity, got {aggregate_init!r}")

    def content_modules(self) -> list[nn.Module]:
        """The content-modality parts (adapters, positions, norm, CMSE): what the "Fixed Con*"
        strategies of Table 9 pre-train first."""
        parts = [self.text_adapter, self.image_adapter, self.content_pos, self.content_norm, self.cmse]
        return [m for m in parts if m is not None]

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter, named, in the group the step-2 strategies (Table 9) freeze or train:
          id_emb       E_id, the ID encoder's item table (input embeddings and eq. 16 scores; with
                       `train_id.tied_output=false` also its separate output table, with
                       `train_id.history_bias` its learned history offset)
          id_enc       the rest of the ID encoder: positions, norm, blocks (GRU4Rec: GRU, dense),
                       their LoRA excluded
          lora         the LoRA A/B matrices injected into the ID encoder's linears (eq. 20)
          content_emb  E_text, E_image (eq. 6-7): the text/image adapters, and the tables themselves
                       when they train (`trainable_tables`; else they are frozen buffers)
          content_enc  the content sequence encoder: shared content positions, norm and CMSE
          mix          MMSD and the aggregation
        "Emb" is what eq. 19's Theta = {E_id, E_text, E_image} regularises; "Enc" the sequence
        encoder on top of it (positions count as encoder on both sides, as in SASRec)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            k: [] for k in ("id_emb", "id_enc", "lora", "content_emb", "content_enc", "mix")}
        for name, p in self.named_parameters():
            if name.startswith("id_encoder."):
                group = "lora" if "lora_" in name else "id_emb" if name.startswith(ID_TABLE_NAMES) else "id_enc"
            elif name.startswith(("text_adapter.", "image_adapter.")) or name in ("text_table", "image_table"):
                group = "content_emb"
            elif name.startswith(("content_pos.", "content_norm.", "cmse.")):
                group = "content_enc"
            elif name.startswith(("mmsd.", "aggregate.")):
                group = "mix"
            else:
                raise AssertionError(f"parameter {name} is in no strategy group")
            groups[group].append((name, p))
        return groups

    def used_groups(self, concl: bool) -> set[str]:
        """The groups with a gradient path in this variant (`concl`: the loss has ConCL, which
        reads the adapters even without CMSE). A group outside it must stay frozen: DDP without
        find_unused_parameters fails on a trainable parameter that never gets a gradient."""
        v = self.variant
        used = {"id_emb", "mix"}  # E_id scores every variant; the aggregation is always there
        if v.use_imse:
            used |= {"id_enc", "lora"}
        if v.use_cmse:
            used |= {"content_emb", "content_enc"}
        elif concl:
            used.add("content_emb")
        return used

    # -- content ------------------------------------------------------------------------------
    def content_embedding(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Item content embeddings [..., d]: one unified (eq. 10), or [text, image] without L2-norm."""
        text, image = self.adapted_content(items)
        if text is None or image is None:
            return [F.normalize(text if image is None else image, dim=-1)]
        if self.variant.l2norm:
            return [F.normalize(text + image, dim=-1)]
        return [F.normalize(text, dim=-1), F.normalize(image, dim=-1)]

    def unified_content(self, items: torch.Tensor) -> torch.Tensor:
        """The content representation of items for ConCL (eq. 18): unit-norm [..., d]."""
        return F.normalize(torch.stack(self.content_embedding(items)).sum(0), dim=-1)

    def content_states(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = self.content_pos(item_positions(items))
        states = []
        for stream, emb in zip(self.cmse, self.content_embedding(items)):
            x = self.drop(self.content_norm(emb + positions))
            for block in stream:
                x = block(x, mask)
            states.append(x)
        return torch.stack(states).sum(0)

    # -- the model ---------------------------------------------------------------------------
    def hidden_states(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded histories -> h_a at every position [B, L, d]."""
        if items.shape[1] > self.max_len:
            raise ValueError(f"sequence length {items.shape[1]} exceeds max_len {self.max_len}")
        mask = causal_padding_mask(items)
        parts = []
        h_e = self.id_encoder.hidden_states(items) if self.variant.use_imse else None
        h_c = self.content_states(items, mask) if self.variant.use_cmse else None
        parts += [h for h in (h_e, h_c) if h is not None]
        if self.mmsd is not None:
            h_m = h_e
            for block in self.mmsd:
                h_m = block(h_m, h_c, mask)
            parts.append(h_m)
        return self.aggregate(torch.cat(parts, dim=-1))

    def sequence_repr(self, items: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(items)[:, -1]

    def item_table(self) -> torch.Tensor:
        """[N+1, d] the ID encoder's item table: h_a . e_id (eq. 16) at train and test time."""
        return self.id_encoder.item_table()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.id_encoder.logits(hidden)

    def history_bias(self) -> torch.Tensor | None:
        """The ID encoder's learned history bias (`train_id.history_bias`), or None."""
        return self.id_encoder.history_bias()

    score_all = SequentialRecommender.score_all  # logits of the last position + the history bias


def freeze_with_lora(id_encoder: SASRec, rank: int = 4, alpha: int | None = None, dropout: float = 0.0,
                     use_lora: bool = True, train_embedding: bool = False) -> SASRec:
    """Freeze the weights of the step-1 encoder and (optionally) inject peft LoRA into its
    attention and FFN linears: W0 + B A with A ~ normal, B = 0 (eq. 20), so the step-2 model
    starts exactly at the step-1 function. Trainable afterwards: the `lora_` parameters, and the
    item table E_id (`item_emb`; `out_emb` where the output is untied, `history_logit` with a history
    bias) with `train_embedding` (Table 9 "Fixed IDEnc"); everything else is frozen ("Fixed IDEmb&Enc" without `train_embedding`)."""
    for p in id_encoder.parameters():
        p.requires_grad_(False)
    model = id_encoder
    if use_lora:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=LORA_TARGETS,
                            init_lora_weights="gaussian")
        model = inject_adapter_in_model(config, id_encoder)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (train_embedding and name.startswith(ITEM_TABLE_PREFIXES)))
    return model

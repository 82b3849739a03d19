"""Alignment and uniformity of learned representations (Wang & Isola 2020), as TSSR Fig. 3/5 use them.

On L2-normalised vectors:
- alignment  = mean ||f(x) - f(y)||^2 over positive pairs (x, y)            (lower = closer pairs)
- uniformity = log mean_{i != j} exp(-2 ||f(i) - f(j)||^2) over items      (lower = more spread)

`stage_representation(stage, run_dir, cfg)` measures a finished stage's best model:
- train-id: pairs = (test-split sequence representation, the test target's item embedding);
  items = the item embedding table the model scores with.
- train-sicsrec: the space ConCL shapes (eq. 18), where in-batch negatives act: pairs = (h_a of
  the test history, the target's unified content embedding); items = every item's unified content
  embedding. The scoring space (h_a vs the ID table E_id, which step 2 trains under the default
  fixed_id_enc strategy and keeps frozen under fixed_id_emb*) is reported too, as
  id_alignment / id_uniformity.
- sft: pairs = the held-out labelled (target, similar) pairs' text embeddings (the t2t InfoNCE
  positives); items = every item's text embedding, from the tuned encoder.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_UNIFORMITY_ITEMS = 20000  # pairs grow quadratically: a seeded sample of this many items beyond it


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared distance between the L2-normalised rows x[i] and y[i]."""
    if x.dim() != 2 or x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(f"alignment needs two non-empty (n, d) tensors of one shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    x, y = F.normalize(x.double(), dim=-1), F.normalize(y.double(), dim=-1)
    return float((x - y).pow(2).sum(-1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, max_items: int = MAX_UNIFORMITY_ITEMS, seed: int = 0,
               chunk: int = 2048) -> float:
    """log of the mean of exp(-t ||x_i - x_j||^2) over ordered pairs i != j of L2-normalised rows."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least two rows (n, d), got {tuple(x.shape)}")
    if x.shape[0] > max_items:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_items]]
    x = F.normalize(x.double(), dim=-1)
    n = x.shape[0]
    parts = []
    for start in range(0, n, chunk):
        rows = x[start:start + chunk]
        # ||a - b||^2 = 2 - 2 a.b on the unit sphere
        exponent = -t * (2.0 - 2.0 * rows @ x.T).clamp(min=0.0)
        own = torch.arange(rows.shape[0])
        exponent[own, own + start] = float("-inf")  # i == j is not a pair
        parts.append(torch.logsumexp(exponent.flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1)))


def measure(pairs_a: torch.Tensor, pairs_b: torch.Tensor, items: torch.Tensor, prefix: str = "") -> dict:
    return {f"{prefix}alignment": alignment(pairs_a, pairs_b), f"{prefix}uniformity": uniformity(items),
            f"{prefix}pairs": int(pairs_a.shape[0]), f"{prefix}items": int(items.shape[0])}


@torch.no_grad()
def _test_representations(model, dataset, max_len: int, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence representations of every user's test history, the test targets)."""
    from shards.windows import pad_left

    reprs, targets = [], []
    for start in range(0, len(dataset.users), batch_size):
        users = dataset.users[start:start + batch_size]
        reprs.append(model.sequence_repr(pad_left([u.history("test") for u in users], max_len)).float())
        targets.append(torch.tensor([u.target("test") for u in users]))
    return torch.cat(reprs), torch.cat(targets)


def _id_stage(run_dir: Path) -> dict:
    from shards.prepared import PreparedDataset
    from sicsrec.train import load_id_encoder

    model = load_id_encoder(run_dir / "train_id")
    dataset = PreparedDataset.load(run_dir / "prepare")
    reprs, targets = _test_representations(model, dataset, model.max_len)
    table = model.item_emb.weight.detach().float()
    return measure(reprs, table[targets], table[1:])


def load_sicsrec_model(run_dir: Path, cfg):
    """The best SICSRec model of a finished train-sicsrec stage in run_dir (eval mode), built the
    way the trainer builds it (train_sicsrec.build_step2_model) so LoRA and the strategy match
    (a content strategy's final model is its phase 2's)."""
    from sicsrec.train import load_id_encoder
    from sicsrec.embedding_cache import load_embedding_cache
    from sicsrec.train_sicsrec import STRATEGIES, build_step2_model, resolve_strategy

    best = run_dir / "sicsrec" / "best_model.pt"
    if not best.exists():
        raise FileNotFoundError(f"{best} does not exist: train-sicsrec has not finished in {run_dir}")
    torch.manual_seed(cfg.seed)
    phase = "id" if STRATEGIES[resolve_strategy(cfg.sicsrec.strategy)].content_pretrain else ""
    model = build_step2_model(cfg.sicsrec, load_id_encoder(run_dir / "train_id"),
                              load_embedding_cache(run_dir / "embeddings"), phase)
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def _sicsrec_stage(run_dir: Path, cfg) -> dict:
    from shards.prepared import PreparedDataset

    model = load_sicsrec_model(run_dir, cfg)
    dataset = PreparedDataset.load(run_dir / "prepare")
    reprs, targets = _test_representations(model, dataset, model.max_len)
    content = model.unified_content(torch.arange(dataset.num_items + 1)).float()
    id_table = model.id_encoder.item_emb.weight.detach().float()
    return measure(reprs, content[targets], content[1:]) | measure(reprs, id_table[targets], id_table[1:], "id_")


@torch.no_grad()
def _sft_stage(run_dir: Path, cfg) -> dict:
    import json

    from shards.prepared import PreparedDataset
    from shards.reader import stream
    from sicsrec.encode import embed_items
    from sicsrec.encoders import ContentEncoder

    sft_dir = run_dir / "sft"
    model = ContentEncoder.load(sft_dir / "encoder")
    num_items = PreparedDataset.load(run_dir / "prepare").num_items
    cache = embed_items(model, stream(run_dir / "shards", "items", split=False), cfg.sft.eval_batch_size,
                        torch.device("cpu"), desc="representation").aligned(num_items)
    text = torch.from_numpy(cache.text)
    held_out = [p for p in json.loads((sft_dir / "held_out_pairs.json").read_text()) if p[0] != p[1]]
    if not held_out:
        raise ValueError(f"{sft_dir} holds no held-out pairs to measure alignment on (sft.holdout_fraction=0?)")
    pairs = torch.tensor(held_out, dtype=torch.long)
    return measure(text[pairs[:, 0]], text[pairs[:, 1]], text[1:])


def stage_representation(stage: str, run_dir: str | Path, cfg) -> dict:
    """Alignment / uniformity of a finished stage in run_dir (see the module docstring).
    cfg: the run's launcher Config (train-sicsrec and sft need its sections)."""
    run_dir = Path(run_dir)
    if stage == "train-id":
        return _id_stage(run_dir)
    if stage == "train-sicsrec":
        return _sicsrec_stage(run_dir, cfg)
    if stage == "sft":
        return _sft_stage(run_dir, cfg)
    raise ValueError(f"no representation measure for stage {stage!r}; expected train-id, train-sicsrec or sft")


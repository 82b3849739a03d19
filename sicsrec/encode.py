"""Stage `encode`: item embedding caches from the (SFT-tuned) content encoders.

`encode(cfg, prepared_dir, shard_dir, sft_dir, out_dir)` streams every item once from the item
shards, split over ranks, runs the encoders in eval mode with the eval image transform, gathers
the rows on rank 0 and writes, aligned to the dense item ids (row 0 = padding):
  text.npy [N+1, d] float32, image.npy [N+1, d] float32 (zero rows where an item has no image
  or a corrupt one; absent for text-only encoders), has_image.npy [N+1] bool, encoders.json.
Without a finished `sft` stage (or with encode.use_sft=false) the untuned encoders are built
from the config and the seed, exactly as SFT's starting point, and the manifest says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from shards.prepared import PreparedDataset, prepared_input
from shards.reader import shards_input, stream
from sicsrec.config import EncodeConfig, EncoderConfig
from sicsrec.encoders import ContentEncoder, build_content_encoder
from sicsrec.engine import resolve_precision
from sicsrec.runtime import dist as distenv
from sicsrec.runtime.rundir import StageRun, Upstream, fingerprinted, read_manifest, run_declared

log = logging.getLogger(__name__)


def initial_encoder(cfg: EncoderConfig, dataset: PreparedDataset, seed: int) -> ContentEncoder:
    """The untuned encoders: SFT's starting point, and encode's fallback without SFT."""
    torch.manual_seed(seed)
    return build_content_encoder(cfg, titles=dataset.titles())


@dataclasses.dataclass
class ItemEmbeddings:
    items: np.ndarray  # (n,) dense item ids, in the order they were read
    text: np.ndarray  # (n, d) float32
    image: np.ndarray | None  # (n, d) float32, zero rows where has_image is False; None when text-only
    has_image: np.ndarray  # (n,) bool

    @staticmethod
    def concat(parts: list["ItemEmbeddings"]) -> "ItemEmbeddings":
        return ItemEmbeddings(np.concatenate([p.items for p in parts]), np.concatenate([p.text for p in parts]),
                              None if parts[0].image is None else np.concatenate([p.image for p in parts]),
                              np.concatenate([p.has_image for p in parts]))

    def aligned(self, num_items: int) -> "ItemEmbeddings":
        """Rows reordered to the dense ids 0..num_items (row 0 = padding zeros); every item must occur once."""
        counts = np.bincount(self.items, minlength=num_items + 1)
        missing = np.flatnonzero(counts[1:] == 0) + 1
        repeated = np.flatnonzero(counts > 1)
        if self.items.size and (self.items.min() < 1 or self.items.max() > num_items):
            raise ValueError(f"item shards hold ids outside 1..{num_items}: are they from another prepare run?")
        if len(missing) or len(repeated):
            raise ValueError(f"item embeddings incomplete: {len(missing)} item(s) missing (e.g. {missing[:5].tolist()}), "
                             f"{len(repeated)} repeated (e.g. {repeated[:5].tolist()}); re-run `launcher shard`")

        def place(rows: np.ndarray) -> np.ndarray:
            out = np.zeros((num_items + 1, *rows.shape[1:]), dtype=rows.dtype)
            out[self.items] = rows
            return out

        return ItemEmbeddings(np.arange(num_items + 1), place(self.text),
                              None if self.image is None else place(self.image), place(self.has_image))


@torch.no_grad()
def embed_items(model: ContentEncoder, samples: Iterable[dict], batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32, desc: str = "encode", progress: bool = True) -> ItemEmbeddings:
    """Text and image embeddings of item samples (`shards.reader.stream(..., "items")`), eval mode."""
    model.eval()
    transform = model.image_transform(train=False) if model.has_image_encoder else None
    size = model.cfg.image_size
    parts: list[ItemEmbeddings] = []
    batch: list[dict] = []

    def flush() -> None:
        texts = [s["title"] for s in batch]
        has = np.array([s["image"] is not None for s in batch], dtype=bool)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            text = model(texts=texts)["text"].float().cpu().numpy()
            image = None
            if transform is not None:
                pixels = torch.stack([transform(s["image"]) if s["image"] is not None else torch.zeros(3, size, size)
                                      for s in batch])
                image = model(images=pixels.to(device))["image"].float().cpu().numpy()
                image[~has] = 0.0
        parts.append(ItemEmbeddings(np.array([s["item"] for s in batch], dtype=np.int64), text, image,
                                    has if transform is not None else np.zeros(len(batch), dtype=bool)))
        batch.clear()

    for sample in tqdm(samples, desc=desc, unit="item", disable=not progress, leave=False):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not parts:
        d = model.cfg.proj_dim
        return ItemEmbeddings(np.zeros(0, dtype=np.int64), np.zeros((0, d), np.float32),
                              np.zeros((0, d), np.float32) if transform is not None else None, np.zeros(0, dtype=bool))
    return ItemEmbeddings.concat(parts)


def from_main(value):
    """Rank 0's value on every rank (decisions that read files must agree across ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _tuned_encoder_dir(cfg: EncodeConfig, sft_dir: Path | None) -> Path | None:
    if not cfg.use_sft:
        return None
    if sft_dir is None or read_manifest(sft_dir) is None or not (sft_dir / "encoder" / "encoders.pt").exists():
        log.warning("encode: no finished sft stage in %s; encoding with the UNTUNED encoders from the config", sft_dir)
        return None
    return sft_dir / "encoder"


def encode(cfg: EncodeConfig, prepared_dir: str | Path, shard_dir: str | Path, sft_dir: str | Path | None,
           out_dir: str | Path, force: bool = False, encoders: EncoderConfig | None = None, seed: int = 0) -> dict:
    """Stage `encode` (see module docstring). `encoders` and `seed` build the untuned encoders when
    SFT is skipped (pass the `sft.encoders` section and the run seed). Returns the manifest."""
    sft_dir = Path(sft_dir) if sft_dir else None
    # rank 0 decides (it wrote the sft manifest); init first so that from_main can broadcast
    tuned_dir = from_main(_tuned_encoder_dir(cfg, sft_dir) if distenv.init(distenv.detect()).is_main else None)
    if tuned_dir is None and encoders is None:
        raise ValueError("encode without a tuned encoder needs `encoders` (pass the sft.encoders section)")
    section = dict(fingerprinted(cfg), encoder_source="sft" if tuned_dir else "untuned")
    if tuned_dir is None:
        section.update(encoders=fingerprinted(encoders))
    inputs = {"prepare": prepared_input(prepared_dir), "shards": shards_input(shard_dir),
              "encoder": Upstream("sft", sft_dir) if tuned_dir else "untuned"}

    def body(run: StageRun) -> dict:
        env, out = run.env, run.out
        dataset = PreparedDataset.load(prepared_dir)
        model = ContentEncoder.load(tuned_dir) if tuned_dir else initial_encoder(encoders, dataset, seed)
        device = distenv.device(env)
        model.to(device)
        mine = embed_items(model, stream(shard_dir, "items"), cfg.batch_size, device,
                           resolve_precision(cfg.precision, device), progress=env.is_main)
        parts = [mine]
        if env.distributed:
            parts = [None] * env.world_size if env.is_main else None
            dist.gather_object(mine, parts, dst=0)
        problem = [None]
        if env.is_main:
            try:
                cache = ItemEmbeddings.concat(parts).aligned(dataset.num_items)
                _write_cache(out, cache, model, tuned_dir)
            except ValueError as err:
                problem = [str(err)]
        if env.distributed:
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise ValueError(problem[0])
        counts = [len(p.items) for p in parts] if env.is_main else []
        return {"encoder_source": "sft" if tuned_dir else "untuned", "items": dataset.num_items,
                "items_per_rank": counts, "text_dim": int(mine.text.shape[1]),
                "image_dim": None if mine.image is None else int(mine.image.shape[1]),
                "items_with_image": int(cache.has_image.sum()) if env.is_main else None}

    return run_declared("encode", out_dir, section, inputs, body, force, None if tuned_dir else seed)


def _write_cache(out: Path, cache: ItemEmbeddings, model: ContentEncoder, tuned_dir: Path | None) -> None:
    for stale in ("text.npy", "image.npy", "has_image.npy"):
        (out / stale).unlink(missing_ok=True)
    np.save(out / "text.npy", cache.text.astype(np.float32))
    if cache.image is not None:
        np.save(out / "image.npy", cache.image.astype(np.float32))
    np.save(out / "has_image.npy", cache.has_image)
    info = {"source": "sft" if tuned_dir else "untuned", "encoder_dir": str(tuned_dir) if tuned_dir else None,
            "features": model.extracted_features(), "files": ["text.npy", "has_image.npy"] +
            (["image.npy"] if cache.image is not None else []),
            "rows": int(cache.text.shape[0]), "row_0": "padding (zeros)",
            "image_zero_rows": "items without a decodable image (has_image false)"}
    (out / "encoders.json").write_text(json.dumps(info, indent=2) + "\n")

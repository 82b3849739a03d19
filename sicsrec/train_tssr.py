"""Stage `train-tssr`: TSSR (TSSR paper §3) trained end to end, the content encoders in the loop.

Data. Training sequences are streamed from the train shards (`shards.reader.EqualBatches`: the
same number of micro batches on every rank); one window per user, the last max_len+1 train
items (inputs = all but the last, targets = all but the first). The item shards' titles and raw
JPEG bytes are kept in memory (`shards.collate.ItemStore`); each step's unique input items are
decoded, transformed (the image encoder's train transform) and tokenised in the collate
(`shards.collate.SequenceCollate`, in data-loader workers when `tssr.num_workers` > 0), then
encoded in the forward.

Content modes (`tssr.content`):
- end_to_end: the text and/or image encoders (`sicsrec.encoders`, built from `sft.encoders` or
  loaded from <run_dir>/sft/encoder when `tssr.init_from_sft` and that stage has finished) run in
  the loop and train with the rest; evaluation encodes every item once (no grad, eval transform,
  split over ranks and all-gathered) and scores all users against that table.
- cache: frozen lookups of <run_dir>/embeddings/{text,image}.npy (the `encode` stage).
The content feature of an item is the concatenation of its text and image features (zeros for
items without a decodable image); `tssr.use_text` / `tssr.use_image` pick the parts.

Loss (eq. 4): L = lambda_u L_u + lambda_i L_i + lambda_ce L_ce, where L_ce is the mean next-item
cross-entropy over every real target position of the global micro batch (DeepSpeed averages
the tssr.train.grad_accum micro batches of an optimizer step), and L_u (eq. 1,
cosine, both directions) and L_i (eq. 2, inner product, both directions) use negatives pooled
across ranks (`sicsrec.losses`). The step-1 Trainer's loss module contract is (CE sum, #targets,
extra): here CE sum = lambda_ce x the CE sum and extra = lambda_u L_u + lambda_i L_i, so the
per-step `loss` in train_log.jsonl is exactly L; in the epoch history `loss` is
lambda_ce x L_ce and `extra_loss` is lambda_u L_u + lambda_i L_i (epoch means).

Everything else is the step-1 Trainer's (sicsrec/train.py, on the one loop sicsrec/loop.py): the engine (DeepSpeed ZeRO by
default; `tssr.train.batch_size` sequences per optimizer step over all ranks and
`tssr.train.grad_accum` micro batches), early stopping on validation
NDCG@10, per-epoch checkpoints and exact resume, the progress bar. metrics.json adds the peak
memory of every rank (CUDA max allocated on GPU, peak RSS of the process on CPU).
"""
from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from shards.collate import ItemInputs, ItemStore, SequenceCollate
from shards.prepared import PreparedDataset, prepared_input
from shards.reader import EqualBatches, StreamedEpoch, shards_input
from sicsrec.config import EncoderConfig, TSSRConfig
from sicsrec.embedding_cache import load_embedding_cache
from sicsrec.encode import from_main, initial_encoder
from sicsrec.encoders import NO_IMAGE, ContentEncoder, ImageEncoder, TextEncoder, _set_grad_checkpointing
from sicsrec.evaluate import evaluate
from sicsrec.losses import gather_rows, gather_sizes, item_contrastive_loss, user_contrastive_loss
from sicsrec.models.tssr import TSSR
from sicsrec.next_item import criterion_of
from sicsrec.preemption import ignore_preemption_signals
from sicsrec.runtime import dist as distenv
from sicsrec.runtime.rundir import StageRun, Upstream, fingerprinted, read_manifest, run_declared, write_json
from sicsrec.train import Trainer

log = logging.getLogger(__name__)
CONTENT_MODES = ("end_to_end", "cache")


def check_config(cfg: TSSRConfig, encoders: EncoderConfig | None = None) -> None:
    """Clear errors for settings that cannot work, before anything heavy starts."""
    if cfg.content not in CONTENT_MODES:
        raise ValueError(f"tssr.content must be one of {CONTENT_MODES}, got {cfg.content!r}")
    if not (cfg.use_text or cfg.use_image):
        raise ValueError("tssr.use_text and tssr.use_image are both false: TSSR's content stream needs the "
                         "text, the image, or both")
    if cfg.content == "end_to_end" and cfg.use_image and encoders is not None \
            and encoders.image_model.lower() in NO_IMAGE:
        raise ValueError("tssr.use_image=true needs an image encoder but sft.encoders.image_model is empty; "
                         "set tssr.use_image=false for a text-only run")
    if cfg.steps_per_epoch < 0 or cfg.num_workers < 0 or cfg.encode_batch_size < 1:
        raise ValueError("tssr.encode_batch_size must be >= 1; tssr.steps_per_epoch and tssr.num_workers >= 0")
    if min(cfg.lambda_u, cfg.lambda_i, cfg.lambda_ce) < 0 or cfg.lambda_u + cfg.lambda_i + cfg.lambda_ce == 0:
        raise ValueError("tssr.lambda_u, lambda_i, lambda_ce must be >= 0 and not all 0")
    if min(cfg.temperature_u, cfg.temperature_i) <= 0:
        raise ValueError("tssr.temperature_u and tssr.temperature_i must be > 0")
    if cfg.train.windows != "last" or cfg.train.window_stride or cfg.train.trim_padding:
        raise ValueError("TSSR streams one window per user (the last max_len+1 train items), padded to max_len: "
                         "tssr.train.windows must be 'last', window_stride 0 and trim_padding false")


# ---------------------------------------------------------------- item inputs

# ---------------------------------------------------------------- model

class EncodedContent(nn.Module):
    """The text and/or image encoders in the loop: encoder inputs -> features [U, dim] (text and
    image features concatenated; image features zeroed where an item has no image)."""

    def __init__(self, text: TextEncoder | None, image: ImageEncoder | None):
        super().__init__()
        if text is None and image is None:
            raise ValueError("EncodedContent needs a text encoder, an image encoder, or both")
        self.text, self.image = text, image
        self.dim = sum(e.proj.out_features for e in (text, image) if e is not None)

    def forward(self, inputs: dict) -> torch.Tensor:
        parts = []
        if self.text is not None:
            device = self.text.proj.weight.device
            tokens = inputs["tokens"]
            parts.append(self.text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))
        if self.image is not None:
            weight = self.image.proj.weight  # DeepSpeed casts the model (bf16), not the inputs
            features = self.image(inputs["pixels"].to(weight.device, weight.dtype))
            parts.append(features * inputs["has_image"].to(weight.device, features.dtype)[:, None])
        return torch.cat(parts, dim=-1)


class CachedContent(nn.Module):
    """Frozen content features [N+1, dim] from the embedding cache (a buffer: never trained, not saved)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)
        self.dim = table.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class TSSRRecommender(nn.Module):
    """TSSR plus its content source (encoders in the loop, or the cache)."""

    def __init__(self, tssr: TSSR, content: EncodedContent | CachedContent):
        super().__init__()
        self.tssr, self.content = tssr, content
        self.end_to_end = isinstance(content, EncodedContent)

    def content_features(self, batch: dict) -> torch.Tensor:
        """Features [U, dim] of the batch's sorted unique items `content_ids`."""
        if self.end_to_end:
            return self.content(batch["content"])
        return self.content(batch["content_ids"].to(self.content.table.device))

    def forward(self, items: torch.Tensor, item_ids: torch.Tensor, features: torch.Tensor):
        """items [B, L]; features [U, dim] of the sorted unique ids `item_ids` [U] covering items."""
        item_ids = item_ids.to(items.device)
        position = torch.searchsorted(item_ids, items).clamp(max=len(item_ids) - 1)  # padding: any row, masked
        return self.tssr(items, features[position])


class TSSRLoss(nn.Module):
    """(inputs, targets) -> (lambda_ce CE sum, #targets, lambda_u L_u + lambda_i L_i) for the Trainer.

    The Trainer's loop passes only (inputs, targets); the rest of the step's batch (user ids,
    unique items and their encoder inputs) is handed over with `feed` just before the forward."""

    def __init__(self, recommender: TSSRRecommender, cfg: TSSRConfig):
        super().__init__()
        self.recommender, self.cfg = recommender, cfg
        self._fed: dict | None = None

    def feed(self, batch: dict) -> None:
        self._fed = batch

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        batch, self._fed = self._fed, None
        if batch is None:
            raise RuntimeError("TSSRLoss: no batch fed before the forward (call feed(batch) first)")
        c, model = self.cfg, self.recommender
        out = model(inputs, batch["content_ids"], model.content_features(batch))
        # `criterion` (set by the Trainer from tssr.train.loss): full | chunked | sampled
        ce_sum, count, _ = criterion_of(self)(out.fused, model.tssr.item_table(), targets)
        extra = ce_sum.new_zeros(())
        if c.lambda_u > 0:
            extra = extra + c.lambda_u * user_contrastive_loss(
                out.id_states, out.content_states, out.real, c.temperature_u, user_ids=batch["users"].to(inputs.device))
        if c.lambda_i > 0:
            extra = extra + c.lambda_i * item_contrastive_loss(
                out.id_states, out.content_states, out.id_emb, out.content_emb, inputs, c.temperature_i)
        return c.lambda_ce * ce_sum, count, extra


def build_recommender(cfg: TSSRConfig, num_items: int, source: ContentEncoder | dict) -> TSSRRecommender:
    """`source`: the content encoder (end_to_end) or the embedding cache tables (cache)."""
    if cfg.content == "end_to_end":
        if not isinstance(source, ContentEncoder):
            raise TypeError("content=end_to_end needs a ContentEncoder")
        if cfg.use_image and not source.has_image_encoder:
            raise ValueError("tssr.use_image=true but the content encoder has no image encoder; "
                             "set tssr.use_image=false for a text-only run")
        content = EncodedContent(source.text if cfg.use_text else None, source.image if cfg.use_image else None)
    else:
        parts = []
        for name, wanted in (("text", cfg.use_text), ("image", cfg.use_image)):
            if wanted and name not in source:
                raise FileNotFoundError(f"tssr.use_{name}=true but the embedding cache holds no {name}.npy")
            if wanted:
                parts.append(source[name])
        content = CachedContent(torch.cat(parts, dim=-1))
    tssr = TSSR(num_items, content.dim, cfg.hidden, cfg.heads, cfg.uni_layers, cfg.multi_layers, cfg.dropout,
                cfg.train.max_len)
    return TSSRRecommender(tssr, content)


# ---------------------------------------------------------------- memory

def peak_rss_mb() -> float:
    """The process's peak resident set size (VmHWM; resettable with `reset_peak_memory`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def reset_peak_memory(device: torch.device) -> None:
    """Restart peak tracking: CUDA's allocator statistics, or Linux's VmHWM (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.init()  # the allocator statistics fail ("Invalid device argument") before CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.warning("cannot reset the peak RSS (/proc/self/clear_refs); it counts from process start")


def all_ranks(value) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def optimizer_state_mb(engine) -> float:
    """Bytes of optimizer state this rank holds (ZeRO-1/2/3 partition it; DeepSpeed's wrappers
    keep the torch optimizer as `.optimizer`)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return sum(t.numel() * t.element_size() for state in base.state.values() for t in state.values()
               if torch.is_tensor(t)) / 2 ** 20


# ---------------------------------------------------------------- trainer

class TSSRTrainer(Trainer):
    config_section = "tssr.train"

    def __init__(self, cfg: TSSRConfig, source: ContentEncoder | dict, store: ItemStore | None,
                 shard_dir: str | Path, *args):
        check_config(cfg)
        self.tssr_cfg, self.source, self.store = cfg, source, store
        super().__init__(cfg.train, *args)
        env, accum = self.env, cfg.train.grad_accum
        item_inputs = None
        if cfg.content == "end_to_end":
            content = self.model.content
            text, image = content.text, content.image
            item_inputs = ItemInputs(store, text.tokenizer if text else None, text.max_len if text else 0,
                                     image.transform(train=True) if image else None,
                                     image.image_size if image else 0)
        self.batches = EqualBatches(shard_dir, "train", self.micro_batch, env.rank, env.world_size, cfg.num_workers,
                                    seed=self.seed, decode_images=False, skip_bad_images=False,
                                    collate=SequenceCollate(cfg.train.max_len, item_inputs, self.seed))
        steps = len(self.batches) if cfg.steps_per_epoch == 0 else min(len(self.batches), cfg.steps_per_epoch)
        self.steps_per_epoch = steps // accum * accum  # no accumulation spans two epochs
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.batches)} micro batch(es) per rank cannot fill tssr.train.grad_accum="
                             f"{accum}; lower tssr.train.batch_size")

    model_name = "tssr"

    def build(self):
        model = build_recommender(self.tssr_cfg, self.dataset.num_items, self.source)
        return model, TSSRLoss(model, self.tssr_cfg)

    def epoch_batches(self, epoch: int) -> StreamedEpoch:
        return StreamedEpoch(self.batches, epoch, self.steps_per_epoch, self.tssr_cfg.num_workers, self.seed,
                             ignore_preemption_signals)

    def loss_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.module.feed(batch)  # the content side of the batch (encoder inputs or item ids)
        return batch["inputs"], batch["targets"]

    @torch.no_grad()
    def item_features(self) -> torch.Tensor:
        """Content features of every item [N+1, dim] (row 0: padding). End to end: every item
        encoded once with the eval transform, items split over ranks and all-gathered."""
        content, device = self.model.content, self.engine.device
        if not self.model.end_to_end:
            return content.table
        text, image = content.text, content.image
        inputs_of = ItemInputs(self.store, text.tokenizer if text else None, text.max_len if text else 0,
                               image.transform(train=False) if image else None, image.image_size if image else 0)
        env, chunk = self.env, self.tssr_cfg.encode_batch_size
        mine = torch.arange(1, self.dataset.num_items + 1)[env.rank::env.world_size]
        parts = []
        for start in tqdm(range(0, len(mine), chunk), desc="encode items", disable=not env.is_main, leave=False):
            ids = mine[start:start + chunk]
            with self.engine.autocast():
                parts.append(content(inputs_of(ids.tolist())).float())
        local = torch.cat(parts) if parts else torch.zeros(0, content.dim, device=device)
        sizes = gather_sizes(len(mine), device)
        features = gather_rows(local, sizes, with_grad=False)
        ids = gather_rows(mine.to(device), sizes, with_grad=False)
        table = torch.zeros(self.dataset.num_items + 1, content.dim, device=device)
        table[ids] = features
        return table

    def evaluate(self, split: str, diagnostics: bool = False) -> dict:
        """Full ranking over all items (shared `evaluate`: the ID table M_id scored in blocks of
        `eval_item_chunk`, validation / test on `eval_users` / `test_users` sampled users if set), the items' content
        encoded once."""
        engine, model, cfg = self.engine, self.model, self.cfg
        engine.eval()
        with engine.gathered(), torch.no_grad():
            table = self.item_features()

            def user_fn(histories: torch.Tensor) -> torch.Tensor:
                with engine.autocast():
                    fused = model.tssr(histories, table[histories].to(model.tssr.content_proj.weight.dtype)).fused
                return fused[:, -1]

            return evaluate(user_fn, self.dataset, split, cfg.max_len, cfg.eval_batch_size,
                            mask_history=cfg.mask_history, device=engine.device, progress=self.env.is_main,
                            item_table=model.tssr.item_table(), item_chunk=cfg.eval_item_chunk,
                            user_sample=cfg.eval_users if split == "valid" else cfg.test_users,
                            equal_batches=True if engine.zero_stage == 3 else None, diagnostics=diagnostics)

    def summary(self) -> dict:
        """Run facts for metrics.json: content mode, batch sizes, steps, memory of every rank."""
        c, engine = self.tssr_cfg, self.engine
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        device = engine.device
        return {"content": c.content, "use_text": c.use_text, "use_image": c.use_image,
                "micro_batch_per_rank": self.batches.batch_size, "grad_accum": c.train.grad_accum,
                "micro_steps": self.state["step"],
                "optimizer_steps": engine.ds.global_steps if engine.ds is not None else self.state["step"],
                "parameters": {"tssr": count(self.model.tssr), "encoders": count(self.model.content)},
                "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
                "peak_memory_mb_per_rank": [round(m, 1) for m in all_ranks(peak_memory_mb(device))]}


def _tuned_encoder_dir(sft_dir: Path) -> Path | None:
    done = read_manifest(sft_dir) is not None and (sft_dir / "encoder" / "encoders.pt").exists()
    return sft_dir / "encoder" if done else None


def train_tssr(cfg: TSSRConfig, encoders: EncoderConfig, seed: int, *, prepared_dir: Path, shard_dir: Path,
               sft_dir: Path, embeddings_dir: Path, out_dir: Path, force: bool = False,
               stop_after_epoch: int | None = None) -> dict:
    """Stage `train-tssr`: reads the prepared dataset and the shards (and sft_dir in end_to_end
    mode when tssr.init_from_sft, embeddings_dir in cache mode), writes out_dir (<run_dir>/tssr).
    `encoders` (the sft section's) builds untuned encoders when no sft stage has finished. A
    finished matching run is skipped unless force; a run with a checkpoint but no manifest
    resumes. `stop_after_epoch` simulates a kill (tests). Returns the manifest."""
    check_config(cfg, encoders)
    inputs = {"prepare": prepared_input(prepared_dir), "shards": shards_input(shard_dir)}
    section = fingerprinted(cfg)
    tuned_dir = None
    if cfg.content == "end_to_end":
        # rank 0 decides (it wrote the sft manifest); init first so that from_main can broadcast
        is_main = distenv.init(distenv.detect()).is_main
        tuned_dir = from_main(_tuned_encoder_dir(sft_dir) if cfg.init_from_sft and is_main else None)
        if tuned_dir is not None:
            inputs["sft"] = Upstream("sft", sft_dir)
        else:
            if cfg.init_from_sft:
                log.warning("train-tssr: no finished sft stage in %s; starting from UNTUNED encoders", sft_dir)
            section["encoders"] = fingerprinted(encoders)
        section["encoder_source"] = "sft" if tuned_dir else "untuned"
    else:
        inputs["embeddings"] = Upstream("encode", embeddings_dir)

    def body(stage: StageRun) -> dict:
        env, out = stage.env, stage.out
        dataset = PreparedDataset.load(prepared_dir)
        store = None
        if cfg.content == "end_to_end":
            source = ContentEncoder.load(tuned_dir) if tuned_dir else initial_encoder(encoders, dataset, seed)
            _set_grad_checkpointing(source, cfg.grad_checkpointing)
            store = ItemStore.from_shards(shard_dir, dataset.num_items, progress=env.is_main)
        else:
            source = load_embedding_cache(embeddings_dir)
        trainer = TSSRTrainer(cfg, source, store, shard_dir, dataset, out, seed, env, stage.run_id)
        trainer.resume(restart=force)
        metrics = trainer.fit(stop_after_epoch)
        metrics.update(trainer.summary(), encoder_source=section.get("encoder_source", "cache"))
        if env.is_main:
            write_json(out / "metrics.json", metrics)
        return {k: v for k, v in metrics.items() if k != "history"}

    return run_declared("train-tssr", out_dir, section, inputs, body, force, seed, per_world_size=True)

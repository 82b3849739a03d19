"""Peak memory and step time of TSSR trained end to end (text + image encoders in the loop), per
DeepSpeed ZeRO stage x micro batch x activation checkpointing of the encoders.

    # CPU, 2 gloo ranks (tiny encoders, the demo's; ~2 min):
    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 benchmarks/tssr_memory.py
    # one GPU, a paper-sized setting (BERT-base-like text tower from a config, Swin-B at 224 px):
    .venv/bin/python benchmarks/tssr_memory.py --image-model swin_base_patch4_window7_224 --image-size 224 \
        --image-kwargs '{}' --text-hidden 768 --text-layers 12 --text-heads 12 --proj-dim 768 \
        --hidden 768 --heads 12 --micro 8,16,32 --items 4000 --steps 5

Every setting builds a fresh TSSRTrainer (the trainer of `launcher train-tssr`, seed 0: its
engine, optimizer, streamed batches) on synthetic items (random titles, random JPEGs decoded and
transformed per step) and users (written to train shards in a temporary folder), and runs
`--warmup` + `--steps` optimizer steps of its `train_step` (L_u + L_i + CE, negatives pooled
across ranks). It measures,
per rank, the peak memory above what the process held before the setting was built (CUDA:
max allocated; CPU: peak RSS, VmHWM, reset per setting) and the bytes of optimizer state the
rank holds, plus the mean step time (slowest rank). Ratios are against ZeRO-0 with the same
micro batch and checkpointing. The table is printed and written to
benchmarks/results/tssr_memory_<cpu|cuda>.json.

Notes: the model is built whole on every rank before DeepSpeed partitions it (no zero.Init), so
ZeRO-3's peak still includes one full copy of the weights at start-up; ZeRO-3 engines are not
fully released after a setting, so the ZeRO-3 rows run last and the "above start" column is the
one to compare (the absolute column of later ZeRO-3 rows carries the earlier ones' leftovers).
On CPU the RSS includes allocator slack, so the optimizer-state column is the exact per-rank
saving of ZeRO-1/2/3. With one rank ZeRO partitions nothing: there the levers are the micro
batch and activation checkpointing.
No Ray import: this runs wherever torch + DeepSpeed run.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported anywhere
os.environ.setdefault("DS_BUILD_OPS", "0")

from shards.collate import ItemStore  # noqa: E402
from shards.config import ShardConfig  # noqa: E402
from shards.prepared import Item, PreparedDataset, UserSequence  # noqa: E402
from shards.writer import write_shards  # noqa: E402
from sicsrec.config import EncoderConfig, TSSRConfig  # noqa: E402
from sicsrec.encoders import _set_grad_checkpointing, build_content_encoder  # noqa: E402
from sicsrec.runtime import dist as distenv  # noqa: E402
from sicsrec.train_tssr import (TSSRTrainer, all_ranks, current_rss_mb, optimizer_state_mb,  # noqa: E402
                                peak_memory_mb, reset_peak_memory)

WORDS = [f"{a}{b}" for a in ("red", "blue", "soft", "big", "mini", "warm", "cool", "dark") for b in
         ("shirt", "dress", "shoe", "cake", "soup", "lamp", "mug", "hat", "bag", "sock")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--stages", type=ints, default=[0, 1, 2, 3], help="ZeRO stages (0 = plain data parallel)")
    p.add_argument("--micro", type=ints, default=[4, 16], help="micro batches (sequences per rank per step)")
    p.add_argument("--checkpointing", default="off,on", help="encoder activation checkpointing: off,on")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (memory is still counted)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32")
    p.add_argument("--ds-config", default="ds_config.json")
    p.add_argument("--items", type=int, default=400, help="synthetic items")
    p.add_argument("--max-len", type=int, default=10)
    # TSSR
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--uni-layers", type=int, default=2)
    p.add_argument("--multi-layers", type=int, default=1)
    # encoders (defaults: configs/demo.yaml's tiny ones)
    p.add_argument("--text-model", default="tiny-bert", help="tiny-bert (built from a config) or a local folder")
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=2)
    p.add_argument("--text-max-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--image-model", default="swin_tiny_patch4_window7_224", help="timm name, random init")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--image-kwargs", default='{"window_size": 4, "embed_dim": 32, "depths": [2, 2], '
                                             '"num_heads": [2, 4]}', help="timm.create_model kwargs (JSON)")
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (CPU runs)")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/tssr_memory_<device>.json)")
    args = p.parse_args(argv)
    args.checkpointing = [{"off": False, "on": True}[x] for x in args.checkpointing.split(",")]
    if args.steps < 1 or args.warmup < 0 or min(args.micro) < 1 or not set(args.stages) <= {0, 1, 2, 3}:
        p.error("--steps >= 1, --warmup >= 0, --micro >= 1, --stages within 0,1,2,3")
    return args


def synthetic_items(num_items: int, image_size: int, seed: int = 0) -> ItemStore:
    """Random titles and random JPEGs (a quarter of the items without an image, like real data)."""
    rng = np.random.default_rng(seed)
    titles, jpegs = [""], [None]
    for _ in range(num_items):
        titles.append(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))))
        if rng.random() < 0.25:
            jpegs.append(None)
            continue
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    return ItemStore(titles, jpegs)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap back to the OS so the next setting's RSS starts low
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def held_mb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else current_rss_mb()


def synthetic_users(store: ItemStore, users: int, max_len: int, shard_dir: Path, world_size: int) -> PreparedDataset:
    """`users` random users of max_len + 1 train items (one TSSR window each), their train
    shards written to shard_dir (one shard per rank) for the trainer's streamed batches."""
    rng = np.random.default_rng(1)
    num_items = len(store.titles) - 1
    items = [Item(i, f"item{i}", store.titles[i], None) for i in range(1, num_items + 1)]  # images: the store's
    sequences = [UserSequence(u, f"user{u}", rng.integers(1, num_items + 1, max_len + 1).tolist(),
                              valid=int(rng.integers(1, num_items + 1)), test=int(rng.integers(1, num_items + 1)))
                 for u in range(1, users + 1)]
    dataset = PreparedDataset(items, sequences)
    write_shards(dataset, shard_dir, ShardConfig(items_per_shard=num_items, users_per_shard=-(-users // world_size)))
    return dataset


def run_setting(args, env, encoders: EncoderConfig, store: ItemStore, dataset: PreparedDataset, work: Path,
                stage: int, micro: int, checkpointing: bool, steps: int | None = None) -> dict:
    """`--warmup` + `steps` optimizer steps of a TSSRTrainer (train-tssr's trainer: its engine,
    optimizer, streamed batches and `train_step`) built for this setting."""
    device = distenv.device(env)
    release_memory(device)
    distenv.barrier()
    before = held_mb(device)
    reset_peak_memory(device)

    torch.manual_seed(0)
    encoder = build_content_encoder(encoders, titles=store.titles[1:])
    _set_grad_checkpointing(encoder, checkpointing)
    cfg = TSSRConfig(hidden=args.hidden, heads=args.heads, uni_layers=args.uni_layers,
                     multi_layers=args.multi_layers)
    cfg.train = dataclasses.replace(cfg.train, max_len=args.max_len, grad_accum=args.grad_accum,
                                    batch_size=micro * env.world_size * args.grad_accum,
                                    grad_clip=1.0, precision=args.precision, ds_config=args.ds_config,
                                    engine="deepspeed", zero_stage=stage)
    # work/run: the trainer's run folder (nothing is written there: no checkpoint, no step log)
    trainer = TSSRTrainer(cfg, encoder, store, work / "shards", dataset, work / "run", 0, env, "tssr-memory")
    engine = trainer.engine
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())  # ZeRO-3: partitioned
    batches = trainer.epoch_batches(0)
    times = []
    micro_steps = (args.warmup + (steps or args.steps)) * args.grad_accum
    if micro_steps > len(batches):
        raise ValueError(f"{micro_steps} micro steps need more synthetic users than {len(batches)} batches hold")
    engine.train()
    for step in range(micro_steps):
        start = time.perf_counter()
        trainer.train_step(batches[step])  # batches[step] decodes, transforms and tokenises, as in train-tssr
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup * args.grad_accum:
            times.append(time.perf_counter() - start)
    batches.close()

    peak = peak_memory_mb(device)
    result = {"zero_stage": stage, "micro_batch": micro, "grad_checkpointing": checkpointing,
              "parameters": params,
              "peak_mb_per_rank": [round(x, 1) for x in all_ranks(peak)],
              "peak_above_start_mb_per_rank": [round(x, 1) for x in all_ranks(peak - before)],
              "optimizer_state_mb_per_rank": [round(x, 2) for x in all_ranks(optimizer_state_mb(engine))],
              "step_seconds": round(max(all_ranks(float(np.mean(times)) * args.grad_accum)), 4)}
    if engine.ds is not None and hasattr(engine.ds, "destroy"):
        engine.ds.destroy()
    del engine, trainer, batches, encoder
    release_memory(device)
    return result


def table(rows: list[dict]) -> str:
    def key(r):
        return r["micro_batch"], r["grad_checkpointing"]

    base = {key(r): max(r["peak_above_start_mb_per_rank"]) for r in rows if r["zero_stage"] == 0}
    base_opt = {key(r): max(r["optimizer_state_mb_per_rank"]) for r in rows if r["zero_stage"] == 0}
    lines = ["| ZeRO | micro batch | act. ckpt | peak MB/rank (above start) | x ZeRO-0 | peak MB/rank (abs.) "
             "| optimizer state MB/rank | x ZeRO-0 | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["micro_batch"], r["grad_checkpointing"], r["zero_stage"])):
        peak, opt = max(r["peak_above_start_mb_per_rank"]), max(r["optimizer_state_mb_per_rank"])
        ratio = f"{peak / base[key(r)]:.2f}" if base.get(key(r)) else "-"
        opt_ratio = f"{opt / base_opt[key(r)]:.2f}" if base_opt.get(key(r)) else "-"
        lines.append(f"| {r['zero_stage']} | {r['micro_batch']} | {'on' if r['grad_checkpointing'] else 'off'} "
                     f"| {' / '.join(f'{x:.0f}' for x in r['peak_above_start_mb_per_rank'])} | {ratio} "
                     f"| {' / '.join(f'{x:.0f}' for x in r['peak_mb_per_rank'])} "
                     f"| {' / '.join(f'{x:.2f}' for x in r['optimizer_state_mb_per_rank'])} | {opt_ratio} "
                     f"| {r['step_seconds']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    env = distenv.init(distenv.detect())
    device = distenv.device(env)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.cuda.set_device(device)
    encoders = EncoderConfig(text_model=args.text_model, tiny_hidden=args.text_hidden, tiny_layers=args.text_layers,
                             tiny_heads=args.text_heads, tiny_vocab_size=args.vocab, text_max_len=args.text_max_len,
                             image_model=args.image_model, image_size=args.image_size,
                             image_model_kwargs=json.loads(args.image_kwargs), proj_dim=args.proj_dim)
    store = synthetic_items(args.items, args.image_size)
    work = Path(tempfile.mkdtemp(prefix="tssr-memory-"))
    users = max(args.micro) * (args.warmup + args.steps) * args.grad_accum * env.world_size
    # every rank writes the same shards into its own folder (no shared file system needed)
    dataset = synthetic_users(store, users, args.max_len, work / "shards", env.world_size)
    # one throwaway setting first: the process's one-time costs (DeepSpeed start-up, lazily
    # loaded kernels, allocator arenas) would otherwise land in the first row's peak
    run_setting(args, env, encoders, store, dataset, work, min(args.stages), args.micro[0], args.checkpointing[0], steps=1)
    rows = []
    # ZeRO stage outermost, 3 last: a ZeRO-3 engine keeps its model and optimizer state alive after
    # destroy() (seen on an H100: ~16 bytes/parameter), which would raise the later rows' baseline
    for stage in sorted(args.stages):
        for micro in args.micro:
            for checkpointing in args.checkpointing:
                row = run_setting(args, env, encoders, store, dataset, work, stage, micro, checkpointing)
                rows.append(row)
                if env.is_main:
                    print(json.dumps(row), flush=True)
    shutil.rmtree(work)
    if env.is_main:
        name = "cpu" if device.type == "cpu" else "cuda"
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"tssr_memory_{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("stages", "micro", "checkpointing", "out")}
        report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                  or platform.machine(),
                  "world_size": env.world_size,
                  "memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
                  "torch": torch.__version__, "settings": settings, "encoders": dataclasses.asdict(encoders),
                  "rows": rows}
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nTSSR end to end, {env.world_size} rank(s) on {report['device']} ({report['memory']}):\n")
        print(table(rows))
        print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()

"""One training engine for every trainer: a single process, DDP, or DeepSpeed (ZeRO).

    # cfg: a training section (its OptimConfig and EngineConfig keys), e.g. the TrainConfig of train_id
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), cfg.lr), env, cfg, "train_id")
    out = engine(*batch)          # forward through the wrapper (DDP / DeepSpeed) under autocast
    engine.backward(loss); engine.step()
    engine.save(ckpt_dir, {"epoch": 3}); client_state = engine.load(ckpt_dir)

Checkpoints hold the model, the optimizer, the caller's client state and every rank's RNG states
(torch, CUDA, numpy, random), so a resumed run continues exactly where the saved one stopped.
Single / DDP checkpoints are one file written atomically by rank 0 (temp file, fsync, rename);
DeepSpeed uses its own `save_checkpoint` on every rank. Either way the previous checkpoint is
kept (`state.prev.pt`; DeepSpeed alternates two tags, `latest` naming the newest): a resume that
finds the newest unreadable (a kill during the write, a full disk) falls back to the previous one
with a warning, and one that finds none readable says so, naming the file (--force restarts).

DeepSpeed reads a JSON config (default `ds_config.json` at the repository root) whose "auto"
values are filled here: micro batch (sicsrec.config.micro_batch_per_rank of the section's global
batch_size), gradient accumulation, global batch, clipping and bf16.
On CPU, DeepSpeed needs DS_ACCELERATOR=cpu (set here before it is imported) and a torch
optimizer (`zero_allow_untested_optimizer`); it uses the gloo group that sicsrec.runtime.dist created.
Gradient accumulation > 1 is DeepSpeed's job; the single and DDP engines step every micro batch.
ZeRO-3 partitions every parameter above DeepSpeed's `stage3_param_persistence_threshold` (default
1e5 elements: a large item table) over the ranks; a module whose forward uses parameters outside
their own submodule's forward lists them in `external_parameters()` (registered with DeepSpeed
here; parameters read by attribute, like `item_emb.weight` in a loss, DeepSpeed finds itself), and
`gathered()` keeps them whole across the forwards of an evaluation.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sicsrec.config import OptimConfig, micro_batch_per_rank
from sicsrec.runtime.dist import DistEnv, device as env_device

KINDS = ("auto", "single", "ddp", "deepspeed")
REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "state.pt"
PREVIOUS_STATE_FILE = "state.prev.pt"
DS_TAGS = ("slot0", "slot1")  # DeepSpeed checkpoint tags, used in turn
log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if precision in ("bf16", "fp32"):
        return torch.bfloat16 if precision == "bf16" else torch.float32
    raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ranks_rng() -> list[dict]:
    mine = rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _restore_rng(states: list[dict], rank: int) -> None:
    if rank >= len(states):
        raise ValueError(f"checkpoint holds RNG states of {len(states)} rank(s); cannot resume rank {rank} "
                         f"exactly (resume with the same world size)")
    set_rng_state(states[rank])


def load_ds_config(path: str | Path, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
                   bf16: bool, zero_stage: int | None = None) -> dict:
    """Read a DeepSpeed JSON config and fill its "auto" values from our config."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    cfg = json.loads(path.read_text())
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in filled.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif key != "gradient_clipping" and cfg[key] != value:
            raise ValueError(f"{path}: {key}={cfg[key]} contradicts the trainer's {value}; set it to \"auto\"")
    # bf16 = torch autocast (fp32 weights, the same numerics as the single/DDP engines) unless the
    # config asks for DeepSpeed's native bf16 (bf16 weights: less memory; float inputs are cast).
    cfg.setdefault("bf16", {})
    cfg.setdefault("torch_autocast", {})
    native = cfg["bf16"].get("enabled", False)
    cfg["bf16"]["enabled"] = bool(bf16 if native == "auto" else native)
    autocast = cfg["torch_autocast"].get("enabled", "auto")
    cfg["torch_autocast"]["enabled"] = bool(bf16 and not cfg["bf16"]["enabled"] if autocast == "auto" else autocast)
    if cfg["torch_autocast"]["enabled"]:
        cfg["torch_autocast"].setdefault("dtype", "bfloat16")
    if zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    cfg["zero_allow_untested_optimizer"] = True
    leftover = [k for k, v in cfg.items() if v == "auto"]
    if leftover:
        raise ValueError(f"{path}: cannot fill \"auto\" for {leftover}")
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bf16(obj):
    """Floating tensors (in nested tuples/lists/dicts) cast to bf16; everything else as is."""
    if torch.is_tensor(obj):
        return obj.to(torch.bfloat16) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_bf16(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_bf16(v) for k, v in obj.items()}
    return obj


class Engine:
    """A model and its optimizer behind one interface for single, DDP and DeepSpeed training."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, kind: str, env: DistEnv,
                 device: torch.device, dtype: torch.dtype, wrapped: nn.Module, ds_engine=None, grad_clip: float = 0.0):
        self.module, self.optimizer, self.kind, self.env = module, optimizer, kind, env
        self.device, self.dtype, self.wrapped, self.ds = device, dtype, wrapped, ds_engine
        self.grad_clip = grad_clip

    @property
    def zero_stage(self) -> int:
        return self.ds.zero_optimization_stage() if self.ds is not None else 0

    @property
    def grad_accum(self) -> int:
        """Micro batches per optimizer step (DeepSpeed's setting; 1 for single and DDP)."""
        return self.ds.gradient_accumulation_steps() if self.ds is not None else 1

    @property
    def native_bf16(self) -> bool:
        """DeepSpeed's own bf16 mode: the model's weights are bf16 (no autocast)."""
        return self.ds is not None and self.ds.bfloat16_enabled()

    def autocast(self):
        """bf16 autocast for code run outside the engine's forward (evaluation)."""
        if self.dtype == torch.bfloat16 and not self.native_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        if self.native_bf16:
            args, kwargs = _to_bf16(args), _to_bf16(kwargs)
        if self.ds is not None:  # DeepSpeed applies its torch_autocast config in its forward
            return self.wrapped(*args, **kwargs)
        with self.autocast():
            return self.wrapped(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def eval(self) -> None:
        self.wrapped.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            loss.backward()

    def step(self) -> None:
        if self.ds is not None:
            self.ds.step()
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, modify: bool = False):
        """Context in which `module`'s parameters are whole on every rank (ZeRO-3 partitions them).
        With modify=True, rank 0's changes inside the context are kept (all ranks must make them)."""
        if self.zero_stage == 3:
            return _zero3_gathered(list(self.module.parameters()), modify)
        return contextlib.nullcontext()

    def module_state_dict(self) -> dict:
        """The plain model's full weights (CPU tensors), e.g. for a best-model file."""
        with self.gathered():
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, ckpt_dir: str | Path, client_state: dict) -> None:
        """Every rank calls this. Saves model, optimizer, client state and all ranks' RNG states."""
        ckpt_dir = Path(ckpt_dir)
        # one key of our own: DeepSpeed adds its metadata keys to what load_checkpoint returns
        client_state = {"sicsrec": {"client": client_state, "rng": _all_ranks_rng()}}
        if self.ds is not None:
            newest = _ds_latest(ckpt_dir)
            tag = DS_TAGS[1] if newest == DS_TAGS[0] else DS_TAGS[0]  # never overwrite the newest
            self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
            return
        if self.env.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "client_state": client_state}
            tmp = ckpt_dir / (STATE_FILE + ".tmp")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            if (ckpt_dir / STATE_FILE).exists():
                os.replace(ckpt_dir / STATE_FILE, ckpt_dir / PREVIOUS_STATE_FILE)
            os.replace(tmp, ckpt_dir / STATE_FILE)
        if dist.is_initialized():
            dist.barrier()

    def load(self, ckpt_dir: str | Path) -> dict | None:
        """Restore the newest readable checkpoint written by `save` (same kind); returns its client
        state, or None when there is none. Restores this rank's RNG states."""
        ckpt_dir = Path(ckpt_dir)
        if self.ds is not None:
            newest = _ds_latest(ckpt_dir)
            tags = [t for t in sorted(DS_TAGS, key=lambda t: t != newest) if (ckpt_dir / t).is_dir()]
            candidates = [(ckpt_dir / t, functools.partial(self._load_ds, ckpt_dir, t)) for t in tags]
        else:
            files = [ckpt_dir / f for f in (STATE_FILE, PREVIOUS_STATE_FILE) if (ckpt_dir / f).exists()]
            candidates = [(f, functools.partial(self._load_file, f)) for f in files]
        if not candidates:
            return None
        errors = []
        for path, load in candidates:
            try:
                client_state = load()
                ok = True
            except Exception as err:  # noqa: BLE001 - any failure to read means: try the previous one
                errors.append(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                ok = False
            if _all_ranks_ok(ok, self.device):
                if errors:
                    log.warning("checkpoint unreadable (%s); resumed from the previous one, %s", errors[0], path)
                ours = client_state["sicsrec"]
                _restore_rng(ours["rng"], self.env.rank)
                return ours["client"]
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir} ({'; '.join(errors) or 'unreadable on another rank'}): "
                              f"delete {ckpt_dir} or re-run the stage with --force to start it over")

    def _load_ds(self, ckpt_dir: Path, tag: str) -> dict:
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under tag {tag}")
        return client_state

    def _load_file(self, path: Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]


@contextlib.contextmanager
def _zero3_gathered(params: list[nn.Parameter], modify: bool):
    """deepspeed.zero.GatheredParameters, whole until the exit even across forwards: ZeRO-3's
    post-forward hooks re-partition a submodule's parameters after each of its forwards, so a
    tensor taken from the module before an evaluation forward (the item table handed to
    `evaluate`) would turn empty. Marked external (what DeepSpeed does to a parameter used
    outside its module) for the context, no hook releases them; the exit partitions them."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        saved = [p.is_external_param for p in params]
        for p in params:
            p.is_external_param = True
        try:
            yield
        finally:
            for p, flag in zip(params, saved):
                p.is_external_param = flag


class CheckpointError(ValueError):
    """No checkpoint of a run can be read."""


def _ds_latest(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def _all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when `ok` holds on every rank (so all ranks resume from the same checkpoint)."""
    flag = torch.tensor([int(ok)], device=device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, cfg: OptimConfig,
                 where: str = "train") -> Engine:
    """Move `module` to this rank's device and wrap it. `cfg` is a training section (config
    section `where`, named in errors): its OptimConfig keys batch_size (global per optimizer
    step), grad_accum, grad_clip and its EngineConfig keys engine, precision, ds_config,
    zero_stage. engine "auto" = DDP when distributed, else single. `optimizer` must already hold
    `module`'s parameters."""
    kind, grad_accum, grad_clip = cfg.engine, cfg.grad_accum, cfg.grad_clip
    micro_batch = micro_batch_per_rank(cfg.batch_size, grad_accum, env.world_size, where)
    if kind not in KINDS:
        raise ValueError(f"engine must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "ddp" if env.distributed else "single"
    if kind == "ddp" and not env.distributed:
        kind = "single"  # DDP over one process is a single process
    if kind != "deepspeed" and grad_accum != 1:
        raise ValueError(f"{where}.grad_accum={grad_accum} needs {where}.engine=deepspeed (got {cfg.engine!r})")
    device = env_device(env)
    dtype = resolve_precision(cfg.precision, device)
    module.to(device)
    if kind == "single":
        return Engine(module, optimizer, kind, env, device, dtype, module, grad_clip=grad_clip)
    if kind == "ddp":
        if not dist.is_initialized():
            raise RuntimeError("engine=ddp needs torch.distributed initialised (sicsrec.runtime.dist.init) "
                               "under torchrun")
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return Engine(module, optimizer, kind, env, device, dtype, wrapped, grad_clip=grad_clip)

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import deepspeed

    if not dist.is_initialized():  # a single process: DeepSpeed still wants a process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size)))
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else
                               ("nccl" if device.type == "cuda" else "gloo"), verbose=False)
    config = load_ds_config(cfg.ds_config, micro_batch, grad_accum, env.world_size, grad_clip,
                            dtype == torch.bfloat16, None if cfg.zero_stage < 0 else cfg.zero_stage)
    ds_engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if ds_engine.zero_optimization_stage() == 3:
        # what the module's forward uses outside the forward of the submodule owning it (a loss
        # term over weights): ZeRO-3 would hand it over partitioned (empty) and fail in backward
        for param in getattr(module, "external_parameters", list)():
            deepspeed.zero.register_external_parameter(module, param)
    dtype = torch.bfloat16 if config["bf16"]["enabled"] or config["torch_autocast"]["enabled"] else torch.float32
    return Engine(module, ds_optimizer, kind, env, device, dtype, ds_engine, ds_engine, grad_clip)


class RunCheckpoint:
    """The engine checkpoint of one run: a folder stamped with the run's id (a fingerprint of
    config, inputs and seed), so a checkpoint is only ever resumed by the run that wrote it."""

    def __init__(self, engine: Engine, folder: str | Path, run_id: str, env: DistEnv):
        self.engine, self.folder, self.run_id, self.env = engine, Path(folder), run_id, env
        self.stamp = self.folder / "run_id"

    def load(self, restart: bool = False) -> dict | None:
        """The saved client state, or None. `restart` (a stage's --force) discards the checkpoint;
        one written by another config is discarded with a warning."""
        import shutil

        from sicsrec.runtime.dist import barrier

        stale = self.stamp.exists() and self.stamp.read_text() != self.run_id
        if (restart or stale) and self.env.is_main and self.folder.exists():
            if stale and not restart:
                log.warning("checkpoint in %s is from another config; starting over", self.folder)
            shutil.rmtree(self.folder)
        barrier()
        state = self.engine.load(self.folder) if self.stamp.exists() else None
        if state is not None:
            log.info("resumed from %s after epoch %d", self.folder, state["epoch"])
        return state

    def save(self, state: dict) -> None:
        from sicsrec.runtime.dist import barrier

        self.engine.save(self.folder, state)
        if self.env.is_main:
            self.stamp.write_text(self.run_id)
        barrier()

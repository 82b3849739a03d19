"""One typed config tree, loaded from YAML (configs/*.yaml) with `--set a.b=value` overrides.

Each section is a dataclass; unknown keys are errors so that a typo never silently runs with a
default. Sections belong to the stage that reads them and live beside its code
(shards/config.py, llm_labeling/config.py, sicsrec/config.py); this module holds the tree that
gathers them, loading, overrides and validation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llm_labeling.config import LabelConfig
from shards.config import DataConfig, ShardConfig, SynthConfig
from sicsrec.config import EncodeConfig, SFTConfig, SICSRecConfig, TrainConfig, TSSRConfig


@dataclass
class Config:
    run_dir: str = "runs/demo"
    seed: int = 0
    pipeline: list[str] = field(default_factory=lambda: ["synth", "prepare", "shard", "label"])
    data: DataConfig = field(default_factory=DataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train_id: TrainConfig = field(default_factory=TrainConfig)
    sicsrec: SICSRecConfig = field(default_factory=SICSRecConfig)
    tssr: TSSRConfig = field(default_factory=TSSRConfig)

    def stage_dir(self, stage: str) -> Path:
        """Where `stage` (a CLI name) writes in the run directory: the registry names the folder."""
        from launcher.stages import STAGES

        return Path(self.run_dir) / STAGES[stage].folder


class ConfigError(ValueError):
    pass


def _merge(default, values: dict, where: str):
    """A copy of the dataclass instance `default` with `values` applied (nested sections merged,
    so a partial override keeps the section's own defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    cls = type(default)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    removed = sorted(unknown & set(getattr(cls, "REMOVED_FIELDS", {})))
    if removed:
        raise ConfigError(f"{where}: {removed} set the model, which this section never read (it trains a model "
                          f"configured in its parent section; the step-1 model is train_id's): remove them")
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    changes = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        current = getattr(default, key)
        changes[key] = (_merge(current, value, path) if dataclasses.is_dataclass(current)
                        else _coerce(hints[key], value, path))
    return dataclasses.replace(default, **changes)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(hint) or (str,)
        return [_coerce(item_type, v, where) for v in value]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(raw)


def _migrate(tree: dict) -> None:
    """Keys of an earlier layout: mapped where the meaning carries over (DeprecationWarning naming
    the new key), a ConfigError where it does not."""
    tssr = tree.get("tssr")
    if isinstance(tssr, dict) and "grad_accum" in tssr:
        accum = tssr.pop("grad_accum")
        train = tssr.setdefault("train", {})
        if not isinstance(train, dict) or not isinstance(accum, int) or "grad_accum" in train:
            raise ConfigError("tssr.grad_accum is now tssr.train.grad_accum (with tssr.train.batch_size the global "
                              "batch per optimizer step): set those two instead")
        micro = train.get("batch_size", TSSRConfig().train.batch_size)  # then: the global micro batch
        train.update(grad_accum=accum, batch_size=micro * accum if isinstance(micro, int) else micro)
        warnings.warn(f"tssr.grad_accum is deprecated: it is tssr.train.grad_accum, and tssr.train.batch_size is "
                      f"now the global batch per optimizer step (micro batch x ranks x grad_accum); read as "
                      f"tssr.train.grad_accum={accum}, tssr.train.batch_size={train['batch_size']}",
                      DeprecationWarning, stacklevel=3)
    sft = tree.get("sft")
    if isinstance(sft, dict) and "micro_batch" in sft:
        raise ConfigError(f"sft.micro_batch (pairs per rank) is replaced by sft.batch_size, the global pairs per "
                          f"optimizer step = micro batch x ranks x sft.grad_accum: set sft.batch_size="
                          f"{sft['micro_batch']!r} x ranks x grad_accum (one process, no accumulation: the same number)")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or defaults) and apply `key.sub=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    _migrate(tree)
    cfg = _merge(Config(), tree, "")
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class Range:
    """An allowed numeric range; open ends are exclusive."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
FRACTION, PROBABILITY = Range(0, 1, high_open=True), Range(0, 1)
# Ranges by key name, in every section that has the key; RANGES_BY_PATH takes precedence.
RANGES = {
    "seed": AT_LEAST_0, "kcore": AT_LEAST_1,
    "hidden": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1, "ffn_dim": AT_LEAST_0, "proj_dim": AT_LEAST_1,
    "content_layers": AT_LEAST_1, "decoder_layers": AT_LEAST_1, "uni_layers": AT_LEAST_1, "multi_layers": AT_LEAST_1,
    "lora_rank": AT_LEAST_1, "tiny_hidden": AT_LEAST_1, "tiny_layers": AT_LEAST_1, "tiny_heads": AT_LEAST_1,
    "tiny_vocab_size": AT_LEAST_1, "text_max_len": AT_LEAST_1, "image_size": AT_LEAST_0,
    "dropout": FRACTION, "max_len": AT_LEAST_1, "window_stride": AT_LEAST_0,
    "lr": POSITIVE, "weight_decay": AT_LEAST_0, "grad_clip": AT_LEAST_0,
    "batch_size": AT_LEAST_1, "eval_batch_size": AT_LEAST_1,
    "encode_batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "epochs": AT_LEAST_1, "patience": AT_LEAST_1,
    "steps_per_epoch": AT_LEAST_0, "num_workers": AT_LEAST_0, "zero_stage": Range(-1, 3),
    "temperature": POSITIVE, "temperature_u": POSITIVE, "temperature_i": POSITIVE,
    "alpha": AT_LEAST_0, "reg": AT_LEAST_0, "lambda_u": AT_LEAST_0, "lambda_i": AT_LEAST_0, "lambda_ce": AT_LEAST_0,
    "holdout_fraction": FRACTION, "pairs_per_shard": AT_LEAST_1,
    "items_per_shard": AT_LEAST_1, "users_per_shard": AT_LEAST_1, "max_shard_bytes": AT_LEAST_1,
    "jpeg_quality": Range(1, 100),
    "num_users": AT_LEAST_1, "num_items": AT_LEAST_1, "num_topics": AT_LEAST_1, "min_seq_len": Range(2),
    "max_seq_len": Range(2), "topic_stickiness": PROBABILITY, "drift": PROBABILITY,
    "popularity_exponent": AT_LEAST_0,
    "max_candidates": AT_LEAST_1, "max_title_chars": AT_LEAST_1, "num_actors": AT_LEAST_1, "max_users": AT_LEAST_0,
    "max_new_tokens": AT_LEAST_1, "tensor_parallel_size": AT_LEAST_1, "max_restarts": AT_LEAST_0,
    "loss_chunk": AT_LEAST_1, "num_negatives": AT_LEAST_1, "eval_item_chunk": AT_LEAST_0, "eval_users": AT_LEAST_0,
    "test_users": AT_LEAST_0,
}
RANGES_BY_PATH = {
    "label.temperature": AT_LEAST_0,  # LLM sampling: 0 = greedy
    "data.synth.image_size": AT_LEAST_1,
}
# Global batches per optimizer step, split over ranks (and accumulation steps): each rank needs at
# least one example per step. Their exact split: sicsrec.config.micro_batch_per_rank, at run time.
GLOBAL_BATCHES = ("train_id.batch_size", "sicsrec.train.batch_size", "tssr.train.batch_size", "sft.batch_size")


def _numeric_fields(section, where: str = ""):
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, f.name, value


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Range-check every numeric key before any work; the error names the key. world_size
    (default: $WORLD_SIZE, else 1) bounds the global batch sizes from below."""
    for path, name, value in _numeric_fields(cfg):
        allowed = RANGES_BY_PATH.get(path, RANGES.get(name))
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{path}={value!r} is out of range: must be {allowed}")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    for path in GLOBAL_BATCHES:
        section = cfg
        for key in path.split("."):
            section = getattr(section, key)
        if section < world_size:
            raise ConfigError(f"{path}={section} is smaller than the world size {world_size}: every rank needs "
                              f"at least one example per step")
    for path, train in (("train_id", cfg.train_id), ("sicsrec.train", cfg.sicsrec.train), ("tssr.train", cfg.tssr.train)):
        if train.window_stride and (train.windows != "all" or train.window_stride > train.max_len):
            raise ConfigError(f"{path}.window_stride={train.window_stride} needs {path}.windows=all and at most "
                              f"{path}.max_len={train.max_len} (0 = max_len)")
    if cfg.data.synth.max_seq_len < cfg.data.synth.min_seq_len:
        raise ConfigError(f"data.synth.max_seq_len={cfg.data.synth.max_seq_len} is below "
                          f"data.synth.min_seq_len={cfg.data.synth.min_seq_len}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)

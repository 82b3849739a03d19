"""Config by concern: the optimisation / engine keys shared by the training sections, one meaning
of batch_size (global per optimizer step), the keys of the earlier layout, and stage
fingerprints that stay those of the earlier layout where the meaning did not change."""
import re
import warnings

import pytest

from launcher.config import ConfigError, load_config
from sicsrec.config import (EngineConfig, OptimConfig, SFTConfig, SICSRecConfig, SequenceTrainConfig, TrainConfig,
                            TSSRConfig, micro_batch_per_rank)
from sicsrec.runtime.rundir import fingerprint, fingerprinted

# `train_id` (= TrainConfig()) as the stage fingerprinted it before the sections were split: one
# flat TrainConfig, also reused (model keys and all) by sicsrec.train and tssr.train.
OLD_TRAIN = {
    "model": "sasrec", "hidden": 64, "layers": 2, "heads": 2, "ffn_dim": 0, "activation": "relu", "dropout": 0.5,
    "max_len": 50, "windows": "last", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.0, "batch_size": 256,
    "epochs": 50, "patience": 10, "eval_batch_size": 512, "mask_history": False, "eval_item_chunk": 65536,
    "eval_users": 0, "test_users": 0, "engine": "auto", "precision": "auto", "ds_config": "ds_config.json",
    "zero_stage": -1, "loss": "full", "loss_chunk": 1024, "num_negatives": 1024, "sampler": "uniform",
    "sparse_item_grad": False,
}
OLD_TSSR_TRAIN = dict(OLD_TRAIN, max_len=10, lr=1e-4, batch_size=128, epochs=20, patience=5, engine="deepspeed",
                      zero_stage=2)


def test_default_stage_fingerprints_are_those_of_the_earlier_layout():
    assert fingerprinted(TrainConfig()) == OLD_TRAIN
    assert fingerprinted(SICSRecConfig())["train"] == dict(OLD_TRAIN, batch_size=1024)
    tssr = fingerprinted(TSSRConfig())
    assert tssr["train"] == OLD_TSSR_TRAIN and tssr["grad_accum"] == 1
    # the hashes of the earlier code's fingerprinted(section), inputs {}
    assert fingerprint(fingerprinted(TrainConfig()), {}) == "328fc786be6cfadb"
    assert fingerprint(fingerprinted(SICSRecConfig()), {}) == "6157dda91f8e04fe"
    assert fingerprint(fingerprinted(TSSRConfig()), {}) == "10cf2ab03de03afb"


def test_tssr_accumulation_keeps_the_fingerprint_of_the_same_micro_batch():
    """Before: tssr.grad_accum=2 with tssr.train.batch_size=64 (the global micro batch); now the
    same run is tssr.train.grad_accum=2 with tssr.train.batch_size=128 (per optimizer step)."""
    cfg = TSSRConfig()
    cfg.train.grad_accum, cfg.train.batch_size = 2, 128
    assert fingerprint(fingerprinted(cfg), {}) == "f69c54cf66cef6ff"
    assert fingerprinted(cfg)["train"]["batch_size"] == 64 and fingerprinted(cfg)["grad_accum"] == 2


def test_the_training_sections_share_the_optimisation_and_engine_keys():
    for section in (TrainConfig, SequenceTrainConfig, SFTConfig):
        assert issubclass(section, OptimConfig) and issubclass(section, EngineConfig)
    model_keys = set(SequenceTrainConfig.REMOVED_FIELDS)
    step2 = {f for f in SequenceTrainConfig.__dataclass_fields__}
    assert not model_keys & step2 and model_keys <= set(TrainConfig.__dataclass_fields__)
    assert (SFTConfig().lr, SFTConfig().batch_size, SFTConfig().engine, SFTConfig().zero_stage) == (5e-5, 16, "deepspeed", 2)


@pytest.mark.parametrize("batch, accum, world, micro", [(256, 1, 1, 256), (256, 1, 4, 64), (256, 2, 4, 32), (8, 8, 1, 1)])
def test_micro_batch_per_rank(batch, accum, world, micro):
    assert micro_batch_per_rank(batch, accum, world, "train_id") == micro


def test_a_batch_that_does_not_split_names_the_key():
    with pytest.raises(ValueError, match=re.escape("tssr.train.batch_size=100 is not divisible by world size 4 x "
                                                   "tssr.train.grad_accum=2")):
        micro_batch_per_rank(100, 2, 4, "tssr.train")
    with pytest.raises(ValueError, match="sft.grad_accum must be >= 1"):
        micro_batch_per_rank(8, 0, 1, "sft")


def test_old_tssr_grad_accum_is_mapped_keeping_the_micro_batch():
    with pytest.warns(DeprecationWarning, match="tssr.grad_accum is deprecated: it is tssr.train.grad_accum"):
        old = load_config(None, ["tssr.grad_accum=2", "tssr.train.batch_size=8"])
    assert (old.tssr.train.grad_accum, old.tssr.train.batch_size) == (2, 16)
    new = load_config(None, ["tssr.train.grad_accum=2", "tssr.train.batch_size=16"])
    assert old.tssr == new.tssr and fingerprinted(old.tssr) == fingerprinted(new.tssr)
    with pytest.warns(DeprecationWarning):
        default_micro = load_config(None, ["tssr.grad_accum=3"])
    assert default_micro.tssr.train.batch_size == 3 * 128  # the default global micro batch, 3 times
    with pytest.raises(ConfigError, match="tssr.grad_accum is now tssr.train.grad_accum"):
        load_config(None, ["tssr.grad_accum=2", "tssr.train.grad_accum=2"])


def test_new_keys_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["tssr.train.grad_accum=2", "sft.batch_size=64", "sicsrec.train.grad_accum=1"])


def test_old_sft_micro_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match=re.escape("sft.micro_batch (pairs per rank) is replaced by sft.batch_size, "
                                                    "the global pairs per optimizer step = micro batch x ranks x "
                                                    "sft.grad_accum")):
        load_config(None, ["sft.micro_batch=32"])


@pytest.mark.parametrize("key", ["sicsrec.train.hidden", "tssr.train.dropout", "sicsrec.train.model"])
def test_model_keys_in_a_section_that_never_read_them_are_a_clear_error(key):
    value = {"model": "sasrec", "dropout": 0.1}.get(key.rsplit(".", 1)[1], 8)
    with pytest.raises(ConfigError, match=re.escape(f"{key.rsplit('.', 1)[0]}: ['{key.rsplit('.', 1)[1]}'] set the "
                                                    f"model, which this section never read")):
        load_config(None, [f"{key}={value}"])
    load_config(None, [f"train_id.{key.rsplit('.', 1)[1]}={value}"])  # step 1's own model key


def test_sft_batch_size_is_checked_against_the_world_size():
    from launcher.config import validate

    with pytest.raises(ConfigError, match="sft.batch_size=2 is smaller than the world size 4"):
        validate(load_config(None, ["sft.batch_size=2"]), world_size=4)

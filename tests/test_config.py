import re

import pytest

from launcher.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ndata:\n  kcore: 3\n  synth: {num_users: 10}\n")
    cfg = load_config(path, ["data.synth.num_users=20", "shard.items_per_shard=7", "pipeline=[synth, prepare]"])
    assert (cfg.run_dir, cfg.data.kcore, cfg.data.synth.num_users) == ("runs/x", 3, 20)
    assert cfg.shard.items_per_shard == 7 and cfg.pipeline == ["synth", "prepare"]
    assert cfg.data.synth.num_items == 400  # untouched default


@pytest.mark.parametrize("override, message", [
    ("data.kcor=3", "data: unknown key(s) ['kcor']"),
    ("data.kcore=three", "data.kcore: expected int, got 'three'"),
    ("data.synth=5", "data.synth: expected a mapping"),
    ("nothing", "is not of the form key.sub=value"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_int_accepted_for_float():
    assert load_config(None, ["data.synth.drift=1"]).data.synth.drift == 1.0


def test_partial_override_keeps_the_sections_own_defaults():
    cfg = load_config(None, ["sicsrec.train.lr=0.01"])
    assert cfg.sicsrec.train.lr == 0.01 and cfg.sicsrec.train.batch_size == 1024  # step 2's default, not TrainConfig's
    assert cfg.train_id.batch_size == 256

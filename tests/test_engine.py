"""The engine's precision handling: DeepSpeed bf16 as torch autocast (default) or native bf16."""
import json

import pytest
import torch
from torch import nn

from sicsrec.config import TrainConfig
from sicsrec.engine import build_engine, load_ds_config
from sicsrec.runtime.dist import DistEnv

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, source="none")


def _config(tmp_path, bf16_enabled):
    cfg = json.loads(open("ds_config.json").read())
    cfg["bf16"] = {"enabled": bf16_enabled}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("bf16_enabled, want_bf16, want_native, want_autocast", [
    (False, False, False, False),   # fp32 run
    (False, True, False, True),     # default: bf16 by autocast, fp32 weights
    (True, True, True, False),      # the config asks for native bf16 weights
    ("auto", True, True, False),    # "auto": native bf16 when the run is bf16
    ("auto", False, False, False),
])
def test_ds_config_precision_modes(tmp_path, bf16_enabled, want_bf16, want_native, want_autocast):
    cfg = load_ds_config(_config(tmp_path, bf16_enabled), 4, 1, 1, 0.0, want_bf16)
    assert cfg["bf16"]["enabled"] is want_native
    assert cfg["torch_autocast"]["enabled"] is want_autocast


class ImageHead(nn.Module):
    """Float inputs (images) through a conv and a linear layer, as the SFT encoders take them."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, images):
        return self.fc(self.conv(images).mean((2, 3))).float().logsumexp(-1).mean()


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True])
def test_deepspeed_bf16_takes_float_inputs_and_matches_autocast(tmp_path, native):
    torch.manual_seed(0)
    reference = ImageHead()
    images = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(images)
    model = ImageHead()
    model.load_state_dict(reference.state_dict())
    cfg = TrainConfig(engine="deepspeed", batch_size=4, precision="bf16", ds_config=str(_config(tmp_path, native)),
                      zero_stage=2)
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), SINGLE, cfg)
    assert engine.native_bf16 is native
    loss = engine(images)
    engine.backward(loss)
    engine.step()
    if native:  # bf16 weights: close to the autocast result, not equal
        assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
    else:  # the same autocast numerics as the single/DDP engines
        assert loss.item() == expected.item()

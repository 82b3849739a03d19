"""train_id.trim_padding: batches padded to their longest history give the same model function on
the real positions as max_len padding (SASRec, SICSRec, GRU4Rec), hence the same training run
without dropout and the same evaluation."""
import dataclasses
import json

import pytest
import torch

from shards.windows import pad_left, trim_left_padding
from sicsrec.config import TrainConfig
from sicsrec.models.gru4rec import GRU4Rec
from sicsrec.models.sasrec import SASRec
from sicsrec.models.sicsrec import SICSRec
from sicsrec.train import train_id
from tests.test_train_id import TINY, make_dataset


def test_trim_drops_only_the_columns_that_are_padding_everywhere():
    inputs = pad_left([[3, 4], [5], [6, 7, 8]], 6)
    targets = pad_left([[4, 9], [2], [7, 8, 1]], 6)
    a, b = trim_left_padding(inputs, targets)
    assert a.tolist() == [[0, 3, 4], [0, 0, 5], [6, 7, 8]] and b.tolist() == [[0, 4, 9], [0, 0, 2], [7, 8, 1]]
    assert trim_left_padding(torch.zeros(2, 5, dtype=torch.long))[0].shape == (2, 1)  # never empty


@pytest.mark.parametrize("model", ["sasrec", "sicsrec", "gru4rec"])
def test_the_real_positions_get_the_same_outputs(model):
    torch.manual_seed(0)
    n, max_len = 20, 10
    sasrec = SASRec(n, hidden=16, layers=2, heads=2, dropout=0.0, max_len=max_len)
    net = {"sasrec": sasrec, "gru4rec": GRU4Rec(n, hidden=16, layers=1, dropout=0.0),
           "sicsrec": SICSRec(sasrec, torch.randn(n + 1, 8), torch.randn(n + 1, 6), dropout=0.0)}[model].eval()
    full = pad_left([[1, 2, 3], [4, 5], [6]], max_len)
    trimmed, = trim_left_padding(full)
    assert trimmed.shape[1] == 3
    h_full, h_trim = net.hidden_states(full), net.hidden_states(trimmed)
    real = trimmed != 0
    torch.testing.assert_close(h_trim[real], h_full[:, -3:][real], atol=1e-5, rtol=1e-5)


def test_training_and_evaluation_match_max_len_padding_without_dropout(tmp_path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=3, patience=3, windows="all")
    runs = {}
    for trim in (False, True):
        out = tmp_path / f"trim{trim}"
        runs[trim] = train_id(dataclasses.replace(cfg, trim_padding=trim), prepared, out, seed=0)["metrics"]
        runs[trim]["losses"] = [e["loss"] for e in json.loads((out / "metrics.json").read_text())["history"]
                                if "loss" in e]
    assert len(runs[False]["losses"]) == 3
    assert runs[True]["losses"] == pytest.approx(runs[False]["losses"], rel=1e-4)
    for split in ("valid", "test"):
        assert runs[True][split] == pytest.approx(runs[False][split], abs=1e-6)

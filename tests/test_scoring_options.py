"""train_id.tied_output / train_id.history_bias through the step-1 stage: trained, saved, reloaded
by load_id_encoder (what step 2 starts from), and left out of earlier runs' fingerprints."""
from pathlib import Path

import torch

from shards.prepared import PreparedDataset
from sicsrec.config import TrainConfig
from sicsrec.evaluate import evaluate
from sicsrec.runtime.rundir import fingerprinted
from sicsrec.train import load_id_encoder, train_id
from tests.test_train_id import TINY, make_dataset


def test_untied_output_and_history_bias_train_save_and_reload(tmp_path: Path):
    prepared = make_dataset(tmp_path / "prepare")
    cfg = TrainConfig(**TINY, dropout=0.0, epochs=3, patience=3, tied_output=False, history_bias=True)
    manifest = train_id(cfg, prepared, tmp_path / "out", seed=0)
    model = load_id_encoder(tmp_path / "out")
    assert model.out_emb is not None and model.history_logit is not None
    assert float(model.history_logit.detach()) != 0.0  # it trained
    # the stage's test metrics are the reloaded model's own scores (score_all adds the bias itself)
    dataset = PreparedDataset.load(prepared)
    with torch.no_grad():
        test = evaluate(model.score_all, dataset, "test", cfg.max_len, cfg.eval_batch_size)
    for key in ("ndcg@10", "hit@10"):
        assert abs(test[key] - manifest["metrics"]["test"][key]) < 1e-9, key
    assert not {"tied_output", "history_bias"} & set(fingerprinted(TrainConfig()))  # earlier runs unchanged

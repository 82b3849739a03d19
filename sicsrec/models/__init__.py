"""The recommenders. Step-1 ID models are registered in `ID_MODELS` (the `train_id.model` key):
each class builds itself from the step-1 config with `from_config(cfg, num_items)`; a new one is
a `SequentialRecommender` subclass (sasrec.py) plus its entry here."""
from __future__ import annotations

from sicsrec.models.gru4rec import GRU4Rec
from sicsrec.models.sasrec import SASRec, SequentialRecommender

ID_MODELS: dict[str, type[SequentialRecommender]] = {"sasrec": SASRec, "gru4rec": GRU4Rec}


def build_id_model(cfg, num_items: int) -> SequentialRecommender:
    """The step-1 model named by `cfg.model` (a TrainConfig), for `num_items` items."""
    if cfg.model not in ID_MODELS:
        raise ValueError(f"train_id.model must be one of {sorted(ID_MODELS)}, got {cfg.model!r}")
    if not cfg.tied_output and cfg.model != "sasrec":
        raise ValueError(f"train_id.tied_output=false (a separate output table) is SASRec only, not {cfg.model!r}")
    if cfg.history_bias and (cfg.model != "sasrec" or cfg.loss != "full"):
        raise ValueError(f"train_id.history_bias=true needs model sasrec and loss full, got model={cfg.model!r} "
                         f"loss={cfg.loss!r}")
    return ID_MODELS[cfg.model].from_config(cfg, num_items)

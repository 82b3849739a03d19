"""Config sections of the models and trainers in `sicsrec/` (one dataclass per section)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Section `train_id`: SICSRec step 1, SASRec / GRU4Rec ID encoder with full-softmax CE."""
    model: str = "sasrec"  # sasrec | gru4rec
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    max_len: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256  # global batch (split over ranks)
    epochs: int = 50
    patience: int = 10  # early stopping on validation NDCG@10
    eval_batch_size: int = 512
    engine: str = "auto"  # auto | single | ddp | deepspeed
    num_workers: int = 0


@dataclass
class EncoderConfig:
    """Section `encoders`: text (transformers) and image (timm) encoders and their projection."""
    text_model: str = "tiny-bert"  # "tiny-bert" builds a small BertConfig model; else a local folder
    text_pooling: str = "mean"  # mean | cls
    text_max_len: int = 32
    image_model: str = "swin_base_patch4_window7_224"  # any timm name
    image_checkpoint: str = ""  # local weights for the timm model; empty = random init
    image_size: int = 224
    proj_dim: int = 128


@dataclass
class SFTConfig:
    """Section `sft`: encoder supervised fine-tuning with t2t, i2i, t2i InfoNCE (§3.3.2)."""
    temperature: float = 0.05
    lr: float = 5e-5
    micro_batch: int = 16  # per rank
    grad_accum: int = 1
    epochs: int = 1
    zero_stage: int = 2
    ds_config: str = "ds_config.json"
    encoders: EncoderConfig = field(default_factory=EncoderConfig)

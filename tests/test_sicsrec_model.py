import pytest
import torch
import torch.nn.functional as F

from sicsrec.models.sasrec import SASRec
from sicsrec.models.sicsrec import SICSRec, SICSRecVariant, freeze_with_lora

N, D = 30, 16


def build(variant=None, lora=True, seed=0):
    torch.manual_seed(seed)
    base = SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8)
    has_image = torch.ones(N + 1, dtype=torch.bool)
    has_image[5] = False
    return base, SICSRec(freeze_with_lora(base, rank=2, use_lora=lora), torch.randn(N + 1, 12), torch.randn(N + 1, 10),
                         has_image, content_layers=2, decoder_layers=2, heads=2, dropout=0.0, variant=variant)


@pytest.mark.parametrize("variant", [SICSRecVariant(), SICSRecVariant(l2norm=False), SICSRecVariant(use_mmsd=False),
                                     SICSRecVariant(use_imse=False, use_mmsd=False), SICSRecVariant(use_image=False)])
def test_no_position_sees_the_future_and_padding_is_ignored(variant):
    _, model = build(variant)
    model.eval()
    seq = torch.tensor([[0, 0, 3, 7, 5, 9, 11]])
    h = model.hidden_states(seq)
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([2, 4])  # change the future of position 4
    assert torch.allclose(model.hidden_states(changed)[:, :5], h[:, :5], atol=1e-6)
    assert not torch.allclose(model.hidden_states(changed)[:, 5:], h[:, 5:], atol=1e-4)
    # more left padding leaves the real positions unchanged (positions count from the oldest item)
    padded = torch.tensor([[0, 0, 0, 0, 3, 7, 5, 9, 11]])[:, -8:]
    assert torch.allclose(model.hidden_states(padded)[:, -5:], h[:, -5:], atol=1e-5)


def test_lora_keeps_frozen_weights_bit_identical_and_only_new_parts_train():
    base, model = build()
    frozen = {k: v.clone() for k, v in model.id_encoder.state_dict().items() if "lora_" not in k}
    tables = model.text_table.clone(), model.image_table.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    seq = torch.randint(1, N + 1, (4, 6))
    for _ in range(3):
        loss = F.cross_entropy(model.logits(model.hidden_states(seq[:, :-1])).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.id_encoder.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    assert torch.equal(model.text_table, tables[0]) and torch.equal(model.image_table, tables[1])
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    id_params = {f"id_encoder.{n}" for n, _ in model.id_encoder.named_parameters()}
    assert {n for n in with_grad if n in id_params} == {n for n in id_params if "lora_" in n}
    assert any(n.startswith("cmse.") for n in with_grad) and any(n.startswith("mmsd.") for n in with_grad)
    assert any(n.startswith("text_adapter.") for n in with_grad) and "aggregate.weight" in with_grad


def test_lora_starts_at_the_step1_function_and_can_be_left_out():
    torch.manual_seed(0)
    base = SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8).eval()
    seq = torch.randint(1, N + 1, (3, 8))
    ref = base.hidden_states(seq)
    assert torch.allclose(freeze_with_lora(base, rank=4).hidden_states(seq), ref, atol=1e-6)
    _, no_lora = build(lora=False)
    assert not any(p.requires_grad for p in no_lora.id_encoder.parameters())


def test_lora_with_a_trainable_item_table_is_fixed_id_enc():
    """train_embedding=True: E_id trains (Table 9 "Fixed IDEnc"), the encoder layers stay frozen."""
    torch.manual_seed(0)
    encoder = freeze_with_lora(SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8), rank=2,
                               train_embedding=True)
    names = [n for n, _ in encoder.named_parameters()]
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == \
        {"item_emb.weight"} | {n for n in names if "lora_" in n}
    frozen = {k: v.clone() for k, v in encoder.state_dict().items() if "lora_" not in k and not k.startswith("item_emb.")}
    table = encoder.item_emb.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    seq = torch.randint(1, N + 1, (4, 6))
    for _ in range(2):
        loss = F.cross_entropy(encoder.logits(encoder.hidden_states(seq[:, :-1])).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in frozen.items())
    assert not torch.equal(encoder.item_emb.weight, table)
    assert torch.equal(encoder.item_emb.weight[0], table[0])  # the padding row never moves


def test_parameter_groups_cover_every_parameter_once():
    _, model = build()
    groups = model.parameter_groups()
    named = [n for params in groups.values() for n, _ in params]
    assert sorted(named) == sorted(n for n, _ in model.named_parameters())
    assert [n for n, _ in groups["id_emb"]] == ["id_encoder.item_emb.weight"]
    assert groups["lora"] and all("lora_" in n for n, _ in groups["lora"])
    assert model.used_groups(concl=True) == set(groups)
    _, no_imse = build(SICSRecVariant(use_imse=False, use_mmsd=False))
    assert no_imse.used_groups(concl=True) == {"id_emb", "content_emb", "content_enc", "mix"}
    _, no_cmse = build(SICSRecVariant(use_cmse=False, use_mmsd=False))
    assert no_cmse.used_groups(concl=False) == {"id_emb", "id_enc", "lora", "mix"}
    assert no_cmse.used_groups(concl=True) == {"id_emb", "id_enc", "lora", "content_emb", "mix"}


def test_unified_content_is_eq10_and_missing_images_use_text():
    _, model = build()
    model.eval()
    items = torch.tensor([4, 5])
    t = model.text_adapter(model.text_table[items])
    i = model.image_adapter(model.image_table[items])
    got = model.unified_content(items)
    assert torch.allclose(got[0], F.normalize(t[0] + i[0], dim=-1), atol=1e-6)
    assert torch.allclose(got[1], F.normalize(t[1], dim=-1), atol=1e-6)  # item 5 has no image
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_scores_use_the_frozen_id_table_and_mask_padding():
    _, model = build()
    scores = model.score_all(torch.randint(1, N + 1, (2, 5)))
    assert scores.shape == (2, N + 1) and torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_invalid_variants_are_clear_errors():
    with pytest.raises(ValueError, match="mix decoder needs both"):
        build(SICSRecVariant(use_imse=False))
    with pytest.raises(ValueError, match="needs the ID encoder, the content encoder, or both"):
        build(SICSRecVariant(use_imse=False, use_cmse=False, use_mmsd=False))


@pytest.mark.parametrize("variant", [SICSRecVariant(), SICSRecVariant(use_mmsd=False), SICSRecVariant(use_cmse=False,
                                                                                                      use_mmsd=False)])
def test_identity_aggregation_starts_step2_at_the_step1_model(variant):
    torch.manual_seed(0)
    base = SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8).eval()
    seq = torch.randint(0, N + 1, (3, 8))
    expected = base.score_all(seq)
    model = SICSRec(freeze_with_lora(base, rank=2), torch.randn(N + 1, 12), None, None, content_layers=1,
                    decoder_layers=1, heads=2, dropout=0.0, variant=variant, aggregate_init="identity").eval()
    assert torch.allclose(model.score_all(seq)[:, 1:], expected[:, 1:], atol=1e-5)
    loss = F.cross_entropy(model.logits(model.sequence_repr(seq)), torch.randint(1, N + 1, (3,)))
    loss.backward()
    if variant.use_cmse:  # the zero-initialised content blocks of the aggregation still learn
        assert model.aggregate.weight.grad[:, D:].abs().sum() > 0
    with pytest.raises(ValueError, match="aggregate_init"):
        SICSRec(base, torch.randn(N + 1, 12), None, aggregate_init="zeros")

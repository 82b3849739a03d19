"""SASRec / GRU4Rec: causality, padding invariance, the CE objective and LoRA-ready layer names."""
import pytest
import torch
import torch.nn.functional as F

from shards.windows import collate, pad_left
from sicsrec.models.gru4rec import GRU4Rec
from sicsrec.models.sasrec import SASRec
from sicsrec.train import NextItemLoss

NUM_ITEMS = 20


def models():
    torch.manual_seed(0)
    return [SASRec(NUM_ITEMS, hidden=16, layers=2, heads=2, dropout=0.0, max_len=8).eval(),
            GRU4Rec(NUM_ITEMS, hidden=16, layers=1, dropout=0.0, max_len=8).eval()]


@pytest.mark.parametrize("model", models(), ids=["sasrec", "gru4rec"])
def test_no_position_sees_the_future_or_the_padding(model):
    seq = [3, 7, 1, 9, 4]
    base = model.hidden_states(pad_left([seq], 8))
    changed_future = model.hidden_states(pad_left([seq[:3] + [11, 12]], 8))
    torch.testing.assert_close(base[:, :-2], changed_future[:, :-2])  # positions up to item 3 unchanged
    assert not torch.allclose(base[:, -1], changed_future[:, -1])
    # more left padding changes nothing for the real positions
    short = model.hidden_states(pad_left([seq], 5))
    torch.testing.assert_close(base[:, -5:], short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.sequence_repr(pad_left([seq], 8)), base[:, -1])
    # an all-padding row (empty history) gives finite values
    assert torch.isfinite(model.hidden_states(torch.zeros(2, 8, dtype=torch.long))).all()


@pytest.mark.parametrize("model", models(), ids=["sasrec", "gru4rec"])
def test_full_softmax_ce_over_all_positions_ignores_padding(model):
    windows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    inputs, targets = collate(windows, max_len=8)
    loss_sum, count = NextItemLoss(model)(inputs, targets)
    # reference: one prediction at a time, scoring items 1..N only (the padding item is no candidate)
    expected, n = 0.0, 0
    for w in windows:
        w = w[-9:]
        for t in range(1, len(w)):
            h = model.sequence_repr(pad_left([w[:t]], 8))[0]
            logits = h @ model.item_emb.weight[1:].T
            expected += F.cross_entropy(logits[None], torch.tensor([w[t] - 1]), reduction="sum")
            n += 1
    assert count.item() == n == 5 + 1 + 8
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    scores = model.score_all(inputs)
    assert scores.shape == (3, NUM_ITEMS + 1) and torch.isinf(scores[:, 0]).all()


def test_sasrec_layers_have_stable_linear_names_for_lora():
    from peft import LoraConfig, get_peft_model

    model = models()[0]
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for block in range(2):
        for suffix in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn.fc1", "ffn.fc2"):
            assert f"blocks.{block}.{suffix}" in names
    inputs = pad_left([[1, 2, 3], [4, 5, 6, 7]], 8)
    before = model.score_all(inputs)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj",
                                                                   "fc1", "fc2"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(lora.base_model.model.score_all(inputs), before)  # LoRA starts as identity


def test_untied_sasrec_scores_and_trains_against_its_output_table():
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, hidden=16, layers=1, heads=2, dropout=0.0, max_len=8, tied_output=False)
    assert model.item_table() is model.out_emb.weight and not torch.equal(model.out_emb.weight, model.item_emb.weight)
    assert model.out_emb.weight[0].abs().sum() == 0  # padding row, like the input table
    inputs, targets = collate([[1, 2, 3, 4], [5, 6, 7]], max_len=8)
    hidden = model.hidden_states(inputs)
    expected = F.cross_entropy((hidden @ model.out_emb.weight[1:].T)[targets > 0], targets[targets > 0] - 1,
                               reduction="sum")
    loss_sum, _ = NextItemLoss(model)(inputs, targets)
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    loss_sum.backward()
    assert model.out_emb.weight.grad.abs().sum() > 0 and model.item_emb.weight.grad.abs().sum() > 0


def test_the_history_bias_is_added_to_the_items_seen_up_to_each_position():
    """history_bias=True: the training CE at position t scores h_t . e_i + b [i in items <= t]
    (reference: one prediction at a time with score_all, which adds b to the row's history)."""
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, hidden=16, layers=1, heads=2, dropout=0.0, max_len=8, history_bias=True)
    assert float(model.history_bias().detach()) == 0.0  # starts at the plain SASRec
    with torch.no_grad():
        model.history_logit.fill_(0.25)
    windows = [[1, 2, 1, 3, 2, 4], [5, 6, 5, 5]]  # repeats, so some targets are history items
    inputs, targets = collate(windows, max_len=8)
    loss_sum, count = NextItemLoss(model)(inputs, targets)
    expected = 0.0
    for w in windows:
        for t in range(1, len(w)):
            scores = model.score_all(pad_left([w[:t]], 8))[0, 1:]
            expected += F.cross_entropy(scores[None], torch.tensor([w[t] - 1]), reduction="sum")
    assert count.item() == 5 + 3
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    seen = pad_left([[1, 2, 1]], 8)
    plain = model.logits(model.sequence_repr(seen))
    want = torch.zeros(NUM_ITEMS)
    want[[0, 1]] = 2.5  # items 1 and 2 (1 twice: once)
    torch.testing.assert_close((model.score_all(seen) - plain)[0, 1:], want)
    loss_sum.backward()
    assert model.history_logit.grad.abs() > 0


def test_untied_output_is_sasrec_only():
    from sicsrec.config import TrainConfig
    from sicsrec.models import build_id_model

    assert build_id_model(TrainConfig(tied_output=False), NUM_ITEMS).out_emb is not None
    with pytest.raises(ValueError, match="SASRec only"):
        build_id_model(TrainConfig(model="gru4rec", tied_output=False), NUM_ITEMS)
    assert build_id_model(TrainConfig(history_bias=True), NUM_ITEMS).history_bias() is not None
    for bad in (dict(model="gru4rec"), dict(loss="sampled")):
        with pytest.raises(ValueError, match="history_bias=true needs"):
            build_id_model(TrainConfig(history_bias=True, **bad), NUM_ITEMS)


def test_sasrec_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="max_len"):
        models()[0].hidden_states(torch.ones(1, 9, dtype=torch.long))

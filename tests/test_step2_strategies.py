"""Step-2 training strategies (Table 9): exactly the right parameters train under each one, and no
variant ever holds a trainable parameter without a gradient path (DDP would fail on it)."""
import copy
import dataclasses

import pytest
import torch

from sicsrec.config import SICSRecConfig
from sicsrec.models.sasrec import SASRec
from sicsrec.models.sicsrec import SICSRecVariant
from sicsrec.train_sicsrec import (ALIASES, STRATEGIES, SICSRecLoss, build_step2_model, resolve_strategy,
                                   starts_at_step1)

N, D, L = 30, 16, 6
GROUPS = ("id_emb", "id_enc", "lora", "content_emb", "content_enc", "mix")
CONTENT = ("fixed_content_enc", "fixed_content_emb", "fixed_content_emb_enc")

# (strategy, phase) -> the groups that train (full variant, LoRA on)
EXPECTED = {
    ("fixed_id_enc", ""): {"id_emb", "lora", "content_emb", "content_enc", "mix"},
    ("fixed_id_emb", ""): {"id_enc", "content_emb", "content_enc", "mix"},
    ("fixed_id_emb_enc", ""): {"lora", "content_emb", "content_enc", "mix"},
    ("end_to_end", ""): {"id_emb", "id_enc", "content_emb", "content_enc", "mix"},
    **{(name, "content"): {"content_emb", "content_enc", "mix"} for name in CONTENT},
    ("fixed_content_enc", "id"): {"id_emb", "id_enc", "content_emb", "mix"},
    ("fixed_content_emb", "id"): {"id_emb", "id_enc", "content_enc", "mix"},
    ("fixed_content_emb_enc", "id"): {"id_emb", "id_enc", "mix"},
}
RUNS = [(name, phase) for name, s in STRATEGIES.items() for phase in (("content", "id") if s.content_pretrain else ("",))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny models: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step1(tied_output: bool = True) -> SASRec:
    torch.manual_seed(0)
    return SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8, tied_output=tied_output).eval()


def tables() -> dict:
    g = torch.Generator().manual_seed(1)
    has_image = torch.ones(N + 1, dtype=torch.bool)
    has_image[5] = False
    return {"text": torch.randn(N + 1, 12, generator=g), "image": torch.randn(N + 1, 10, generator=g),
            "has_image": has_image}


def config(strategy: str, **changes) -> SICSRecConfig:
    return dataclasses.replace(SICSRecConfig(strategy=strategy, content_layers=1, decoder_layers=1, heads=2,
                                             dropout=0.0, lora_rank=2, alpha=0.5, temperature=0.2), **changes)


def build(cfg: SICSRecConfig, phase: str, init_state=None, seed: int = 0, tied_output: bool = True):
    torch.manual_seed(seed)
    return build_step2_model(cfg, step1(tied_output), tables(), phase, init_state)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N + 1, (8, L + 1), generator=g)
    seq[:3, :2] = 0  # some left padding
    return seq[:, :-1], torch.where(seq[:, :-1] == 0, 0, seq[:, 1:])


def backward(loss_module: SICSRecLoss, seed: int = 0) -> None:
    ce_sum, count, extra = loss_module(*batch(seed))
    (ce_sum / count + extra).backward()


@pytest.mark.parametrize("content_tables", ["frozen", "trainable"])
@pytest.mark.parametrize("strategy,phase", RUNS, ids=[f"{s}-{p or 'single'}" for s, p in RUNS])
def test_exactly_the_strategys_parameters_train(strategy, phase, content_tables):
    cfg = config(strategy, reg=0.01, content_tables=content_tables)
    init = build(cfg, "content").state_dict() if phase == "id" else None  # phase 2 starts at phase 1's weights
    model = build(cfg, phase, init)
    groups = model.parameter_groups()
    assert all(groups[g] for g in EXPECTED[(strategy, phase)]), "an expected group is empty"
    want = {name for g in EXPECTED[(strategy, phase)] for name, _ in groups[g]}
    tables_train = content_tables == "trainable" and "content_emb" in EXPECTED[(strategy, phase)]
    assert {"text_table", "image_table"} <= want if tables_train else not {"text_table", "image_table"} & want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    if phase == "id":
        assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())
    before = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and buffers (cached tables)
    loss = SICSRecLoss(model, cfg.alpha, cfg.temperature, cfg.reg, cfg.concl_similarity, cfg.reg_id_emb)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        backward(loss, step)
        if step == 1:  # after one step (LoRA B, the zero aggregation blocks have moved): every trainable grad is nonzero
            nograd = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
            assert not nograd
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
    trainable = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        if key in want:
            assert not torch.equal(value, before[key]), f"{key} should have trained"
        else:
            assert torch.equal(value, before[key]), f"{key} should be frozen (bit-identical)"
            assert key not in trainable or not trainable[key].requires_grad


VARIANTS = [SICSRecVariant(), SICSRecVariant(l2norm=False), SICSRecVariant(use_mmsd=False),
            SICSRecVariant(use_imse=False, use_mmsd=False), SICSRecVariant(use_cmse=False, use_mmsd=False),
            SICSRecVariant(use_image=False), SICSRecVariant(use_text=False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(k for k, on in dataclasses.asdict(v).items() if not on)
                         or "full")
def test_no_trainable_parameter_without_a_gradient_path(variant):
    """Every variant x strategy x phase x (alpha 0 | > 0), reg 0 (the fewest gradient paths): the
    trainable parameters are exactly those that get a gradient; LoRA only where IMSE runs."""
    for (strategy, phase), alpha, lora in [(r, a, lo) for r in RUNS for a in (0.0, 0.5) for lo in (True, False)]:
        cfg = config(strategy, alpha=alpha, reg=0.0, use_lora=lora, **dataclasses.asdict(variant))
        if STRATEGIES[strategy].content_pretrain and not variant.use_cmse:
            with pytest.raises(ValueError, match="use_cmse"):
                build(cfg, phase)
            continue
        model = build(cfg, phase)
        backward(SICSRecLoss(model, cfg.alpha, cfg.temperature, cfg.reg, cfg.concl_similarity))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert trainable == with_grad, (strategy, phase, alpha, trainable ^ with_grad)
        has_lora = any("lora_" in n for n, _ in model.named_parameters())
        assert has_lora == (lora and variant.use_imse and STRATEGIES[strategy].lora), (strategy, phase)


def test_trainable_content_tables_start_at_the_cache_and_join_theta():
    """content_tables=trainable: the same function at the start as the frozen tables (same init, same
    saved names), the tables in eq. 19's Theta; an unknown value is refused."""
    frozen, trainable = (build(config("fixed_id_enc", content_tables=t), "") for t in ("frozen", "trainable"))
    assert frozen.state_dict().keys() == trainable.state_dict().keys()
    assert all(torch.equal(v, trainable.state_dict()[k]) for k, v in frozen.state_dict().items())
    assert torch.equal(trainable.text_table, tables()["text"])
    inputs, _ = batch()
    assert torch.equal(frozen.eval().hidden_states(inputs), trainable.eval().hidden_states(inputs))
    theta = SICSRecLoss(trainable, 0.5, 0.2, 0.01).regularized()
    assert any(p is trainable.text_table for p in theta) and any(p is trainable.image_table for p in theta)
    assert not any(p is frozen.text_table for p in SICSRecLoss(frozen, 0.5, 0.2, 0.01).regularized())
    with pytest.raises(ValueError, match="content_tables"):
        build(config("fixed_id_enc", content_tables="learned"), "")


def test_aliases_mean_what_they_meant():
    assert ALIASES == {"fixed_id": "fixed_id_emb_enc", "fixed_content": "fixed_content_emb_enc"}
    assert SICSRecConfig().strategy == "fixed_id_enc"
    for old, new in ALIASES.items():
        assert resolve_strategy(old) == new
        phase = "id" if STRATEGIES[new].content_pretrain else ""
        a, b = build(config(old), phase), build(config(new), phase)
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("fixed_idemb")
    with pytest.raises(ValueError, match="phase"):
        build(config("fixed_id_enc"), "content")


@pytest.mark.parametrize("strategy", ["fixed_id_enc", "fixed_id_emb", "fixed_id_emb_enc"])
def test_from_step1_strategies_start_at_the_step1_model(strategy):
    cfg = config(strategy)
    assert starts_at_step1(cfg)
    seq = batch()[0]
    model = build(cfg, "").eval()
    assert torch.allclose(model.score_all(seq)[:, 1:], step1().score_all(seq)[:, 1:], atol=1e-5)
    assert not starts_at_step1(config(strategy, use_imse=False, use_mmsd=False))
    assert not starts_at_step1(config(strategy, aggregate_init="random"))


def test_which_strategies_start_trained():
    assert not starts_at_step1(config("end_to_end"))
    for name in CONTENT:
        assert not starts_at_step1(config(name), "content") and starts_at_step1(config(name), "id")


@pytest.mark.parametrize("strategy", ["fixed_id_enc", "fixed_id_emb_enc", "end_to_end"])
def test_an_untied_output_table_is_part_of_e_id(strategy):
    """train_id.tied_output=false: the output table scores (eq. 16), sits in id_emb beside the input
    table, trains exactly when E_id does and is regularised with it."""
    model = build(config(strategy), "", tied_output=False)
    out_table = model.id_encoder.out_emb.weight
    assert model.item_table() is out_table and out_table is not model.id_encoder.item_emb.weight
    assert [n for n, _ in model.parameter_groups()["id_emb"]] == ["id_encoder.item_emb.weight",
                                                                  "id_encoder.out_emb.weight"]
    id_emb_trains = "id_emb" in EXPECTED[(strategy, "")]
    assert out_table.requires_grad == model.id_encoder.item_emb.weight.requires_grad == id_emb_trains
    theta = SICSRecLoss(model, 0.5, 0.2, 0.01).regularized()
    assert any(p is out_table for p in theta) == id_emb_trains
    hidden = torch.randn(2, D)
    torch.testing.assert_close(model.logits(hidden)[:, 1:], hidden @ out_table[1:].T)


def test_a_history_bias_scores_step2_and_trains_with_e_id():
    """train_id.history_bias: the step-1 bias stays part of the scores in step 2, in id_emb."""
    torch.manual_seed(0)
    encoder = SASRec(N, hidden=D, layers=2, heads=2, dropout=0.0, max_len=8, history_bias=True).eval()
    with torch.no_grad():
        encoder.history_logit.fill_(-0.2)
    step1_scores = encoder.score_all(batch()[0])
    for strategy, trains in (("fixed_id_enc", True), ("fixed_id_emb_enc", False)):
        torch.manual_seed(0)
        model = build_step2_model(config(strategy), copy.deepcopy(encoder), tables(), "", None).eval()
        assert "id_encoder.history_logit" in [n for n, _ in model.parameter_groups()["id_emb"]]
        assert model.id_encoder.history_logit.requires_grad == trains
        torch.testing.assert_close(model.score_all(batch()[0])[:, 1:], step1_scores[:, 1:], atol=1e-5, rtol=1e-5)


def test_theta_is_the_trainable_e_id_and_adapters_and_similarity_is_a_key():
    model = build(config("fixed_id_enc"), "")
    emb = model.id_encoder.item_emb.weight
    adapters = [p for a in (model.text_adapter, model.image_adapter) for p in a.parameters()]
    theta = SICSRecLoss(model, 0.5, 0.2, 0.01).regularized()
    assert any(p is emb for p in theta) and len(theta) == len(adapters) + 1
    assert not any(p is emb for p in SICSRecLoss(model, 0.5, 0.2, 0.01, reg_id_emb=False).regularized())
    frozen_emb = build(config("fixed_id_emb_enc"), "")
    assert not any(p is frozen_emb.id_encoder.item_emb.weight for p in SICSRecLoss(frozen_emb, 0.5, 0.2, 0.01).regularized())
    # the reg term is lambda * sum ||p||^2 over Theta
    no_reg = SICSRecLoss(model, 0.0, 0.2, 0.0)(*batch())[2]
    with_reg = SICSRecLoss(model, 0.0, 0.2, 0.01)(*batch())[2]
    assert float(no_reg) == 0.0
    assert with_reg.item() == pytest.approx(0.01 * sum(p.pow(2).sum().item() for p in theta), rel=1e-5)
    model.eval()
    cosine = SICSRecLoss(model, 1.0, 0.2, 0.0, "cosine")(*batch())[2]
    inner = SICSRecLoss(model, 1.0, 0.2, 0.0, "inner")(*batch())[2]
    assert cosine.item() != pytest.approx(inner.item())
    with pytest.raises(ValueError, match="concl_similarity"):
        SICSRecLoss(model, 1.0, 0.2, 0.0, "dot")

import torch

from sicsrec.models.tssr import TSSR, mean_pool


def model(seed=0):
    torch.manual_seed(seed)
    return TSSR(num_items=20, content_dim=6, hidden=16, heads=2, uni_layers=2, multi_layers=2, dropout=0.0, max_len=6).eval()


def test_shapes_and_gate_fusion():
    m = model()
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    out = m(items, torch.randn(2, 6, 6))
    for t in (out.fused, out.id_states, out.content_states, out.id_emb, out.content_emb):
        assert t.shape == (2, 6, 16)
    assert m.logits(out.fused[:, -1]).shape == (2, 21)
    # gate fusion is a convex combination of the two cross-attention streams: recompute it
    captured = {}
    m.gate.register_forward_hook(lambda mod, inp, res: captured.update(inp=inp[0], out=res))
    out = m(items, torch.randn(2, 6, 6))
    cross_id, cross_con = captured["inp"].split(16, dim=-1)
    s = torch.sigmoid(captured["out"])
    assert torch.allclose(out.fused, s * cross_id + (1 - s) * cross_con, atol=1e-6)


def test_no_position_sees_the_future_in_any_stream():
    m = model()
    items = torch.tensor([[0, 0, 3, 4, 5, 6]])
    content = torch.randn(1, 6, 6)
    out = m(items, content)
    changed_items, changed_content = items.clone(), content.clone()
    changed_items[0, 4:] = torch.tensor([9, 10])
    changed_content[0, 4:] = torch.randn(2, 6)
    out2 = m(changed_items, changed_content)
    for a, b in ((out.fused, out2.fused), (out.id_states, out2.id_states), (out.content_states, out2.content_states)):
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
        assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)


def test_padding_content_is_ignored():
    m = model()
    items = torch.tensor([[0, 0, 3, 4, 5, 6]])
    content = torch.randn(1, 6, 6)
    noisy = content.clone()
    noisy[0, :2] = 100.0  # garbage features at padding positions
    assert torch.allclose(m(items, content).fused[:, 2:], m(items, noisy).fused[:, 2:], atol=1e-5)


def test_mean_pool_ignores_padding():
    states = torch.arange(12.0).view(1, 4, 3)
    real = torch.tensor([[False, True, True, False]])
    assert torch.equal(mean_pool(states, real), torch.tensor([[4.5, 5.5, 6.5]]))

"""The encoders + pooled SFT loss under DDP on 2 gloo ranks == one process on the whole batch.

Also checks that DDP runs with find_unused_parameters=False (every parameter is in the graph)
and that each rank, building its tokenizer from the same titles, gets the same vocabulary.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from sicsrec.encoders import build_content_encoder
from sicsrec.losses import sft_loss
from test_encoders import TITLES, tiny_config

PAIRS_A = ["Toy Story (1995)", "GoldenEye (1995)", "Babe (1995)", "Copycat (1995)", "Toy Story (1995)", "Get Shorty"]
PAIRS_B = ["Four Rooms (1995)", "Twelve Monkeys", "Star Wars (1977)", "Toy Story (1995)", "Four Rooms (1995)", "Babe"]
IDS_A = torch.tensor([1, 2, 3, 4, 1, 5])
IDS_B = torch.tensor([6, 7, 8, 1, 6, 3])
HAS_IMAGE_A = torch.tensor([True, True, True, False, True, True])
HAS_IMAGE_B = torch.tensor([True, False, True, True, True, True])


def _model():
    torch.manual_seed(0)
    return build_content_encoder(tiny_config(), titles=TITLES).eval()  # eval: no dropout, comparable runs


def _images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _step(model, rows: slice) -> torch.Tensor:
    n = rows.stop - rows.start
    images = _images()
    out = model(texts=PAIRS_A[rows] + PAIRS_B[rows], images=torch.cat([images[:6][rows], images[6:][rows]]))
    text_a, text_b = out["text"][:n], out["text"][n:]
    image_a, image_b = out["image"][:n], out["image"][n:]
    loss = sft_loss(text_a, text_b, IDS_A[rows], IDS_B[rows], 0.1, image_a=image_a, image_b=image_b,
                    has_image_a=HAS_IMAGE_A[rows], has_image_b=HAS_IMAGE_B[rows]).total
    loss.backward()
    return loss.detach()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(_model(), find_unused_parameters=False)
        vocabs = [None] * world
        dist.all_gather_object(vocabs, model.module.text.tokenizer.get_vocab())
        assert vocabs[0] == vocabs[1]
        loss = _step(model, slice(3 * rank, 3 * rank + 3))
        dist.all_reduce(loss)
        if rank == 0:
            grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
            torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sft_step_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    single = _model()
    loss = _step(single, slice(0, 6))
    torch.testing.assert_close(ddp["loss"], loss, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys() and len(grads) == len(list(single.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)

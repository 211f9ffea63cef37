"""Contrastive loss (SPEC §6): definition, and 2 gloo ranks × B samples == 1 process × 2B samples."""

import os

import torch
import torch.nn.functional as F

from clamp2.loss import ContrastiveLoss, contrastive_loss
from conftest import free_port, join_as_rank, spawn_ranks


def test_loss_is_mean_of_both_directions():
    torch.manual_seed(0)
    t, m = torch.randn(5, 8), torch.randn(5, 8)
    logits = 2.0 * t @ m.T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(contrastive_loss(t, m, 2.0), expected)
    assert torch.allclose(ContrastiveLoss()(t, m, 2.0), expected)  # no process group: local only


def test_loss_uses_raw_dot_products_not_cosine():
    t = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scaled = contrastive_loss(t * 3, m)
    assert not torch.allclose(scaled, contrastive_loss(t, m))  # scale of the features matters


def make_models(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _worker(rank, world_size, port, out_dir):
    join_as_rank(rank, world_size, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clamp2.distributed import distributed_context

    with distributed_context(device="cpu") as info:
        assert info.backend == "gloo" and info.world_size == 2
        text_net, music_net = make_models()
        text_net, music_net = DDP(text_net), DDP(music_net)
        x_text, x_music = data()
        half = len(x_text) // world_size
        sl = slice(rank * half, (rank + 1) * half)
        loss = ContrastiveLoss()(text_net(x_text[sl]), music_net(x_music[sl]), 1.5)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in list(text_net.parameters()) + list(music_net.parameters())]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Freed inside the context, as the trainers' DDP models are: a DDP module that outlives the group's
        # teardown holds the group's last reference and runs its destructor later, outside teardown's care.
        del text_net, music_net


def test_two_ranks_equal_one_process(tmp_path):
    spawn_ranks(_worker, (2, free_port(), str(tmp_path)))
    text_net, music_net = make_models()
    x_text, x_music = data()
    loss = contrastive_loss(text_net(x_text), music_net(x_music), 1.5)
    loss.backward()
    grads = [p.grad for p in list(text_net.parameters()) + list(music_net.parameters())]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        for g_dist, g_single in zip(got["grads"], grads):
            assert torch.allclose(g_dist, g_single, atol=1e-6)

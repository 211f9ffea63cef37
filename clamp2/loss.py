"""Symmetric contrastive (CLIP) loss of CLaMP 2 (SPEC §6), open_clip's ClipLoss with global logits.

With several processes every rank gathers the features of all ranks *with gradient*
(``torch.distributed.nn.all_gather``) and computes the full N×N loss, so the gradients equal those
of one process holding the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of this rank's slice.

    The same maths as ``torch.distributed.nn.all_gather`` (deprecated in torch 2.13), written out
    so no deprecated or private API is needed.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world_size, ctx.rows = dist.get_rank(), dist.get_world_size(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` of all ranks in rank order; gradients flow back to every rank.

    Every rank must pass the same number of rows (batches are equal: incomplete ones are dropped).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return _AllGatherWithGrad.apply(features)


def contrastive_loss(text_features: torch.Tensor, music_features: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """Mean of the text→music and music→text cross-entropies against the diagonal.

    Logits are raw dot products times ``logit_scale`` (no L2 normalisation, as published).
    """
    logits_per_text = logit_scale * text_features @ music_features.T
    logits_per_music = logit_scale * music_features @ text_features.T
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_music, labels)) / 2


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss` over the features of all processes (gathered with gradient)."""

    def forward(self, text_features: torch.Tensor, music_features: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
        return contrastive_loss(gather_with_grad(text_features), gather_with_grad(music_features), logit_scale)

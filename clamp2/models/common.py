"""What every model family shares: pooling, parameter counting, reading depths from a state dict."""

from __future__ import annotations

import torch
from torch import nn


def count_layers(state, prefix: str) -> int:
    """Number of numbered sub-modules ``<prefix><i>.`` in a state dict (e.g. BERT's ``encoder.layer.``)."""
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state
               if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return max(indices) + 1 if indices else 0


def masked_mean(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``masks`` is 1: [B, L, H], [B, L] → [B, H]."""
    masks = masks.unsqueeze(-1).to(features.dtype)
    return (features * masks).sum(dim=1) / masks.sum(dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""The references' linear probes, with a padding mask so batches give batch-size-1 results.

CLaMP 2's (SPEC §10, :class:`LinearProbe`) and CLaMP 3's (SPEC_CLAMP3 §20, :class:`LinearClassifier`,
``hidden_size`` 0 in :func:`build_probe`).

Linear(D→H) and ReLU on every position, mean over the positions, Linear(H→classes), softmax. The
loss is cross-entropy applied to that softmax output (a second softmax inside the loss): the
reference does so and it changes the numbers, so it is kept. Parameter names (``fc1``, ``fc2``)
are the reference's, so its checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .defaults import HIDDEN_SIZE  # the reference's HIDDEN_SIZE, in a module without torch (fast --help)


class LinearProbe(nn.Module):
    """CLaMP 2's probe: per-position Linear(D→H) + ReLU, mean over positions, Linear(H→classes), softmax."""

    def __init__(self, input_size: int, num_classes: int, hidden_size: int = HIDDEN_SIZE):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, num_classes)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class probabilities ``[B, classes]``.

        ``features`` ``[B, L, D]`` alone: every position counts (the reference). With a ``[B, L]``
        boolean ``mask`` of the real positions, ``features`` is either padded ``[B, L, D]`` or
        the real positions only, packed file after file ``[mask.sum(), D]``
        (:func:`clamp2.probe.data.pack_positions`); padding then never reaches the first layer
        and each file gets the mean over its own positions.
        """
        if mask is None:
            return self.softmax(self.fc2(self.relu(self.fc1(features)).mean(dim=1)))
        if features.dim() == 3:
            features = features[mask]
        hidden = self.relu(self.fc1(features))
        slots = hidden.new_zeros((*mask.shape, hidden.shape[-1]))
        slots[mask] = hidden
        pooled = slots.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(slots.dtype)
        return self.softmax(self.fc2(pooled))


    @property
    def input_size(self) -> int:
        return self.fc1.in_features


class LinearClassifier(nn.Module):
    """CLaMP 3's probe: one Linear(D→classes) on a global feature, then softmax (no hidden layer, no mean).

    The parameter names (``fc``) are the reference's, so its checkpoints load unchanged. Inputs are
    global features, ``[B, D]`` or ``[B, 1, D]`` (what batches of ``[1, D]`` files look like).
    """

    def __init__(self, input_size: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(input_size, num_classes)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if features.dim() == 3:
            if features.shape[1] != 1 or mask is not None:
                raise ValueError("CLaMP 3's linear probe takes global features [1, D], not per-position ones")
            features = features[:, 0]
        return self.softmax(self.fc(features))

    @property
    def input_size(self) -> int:
        return self.fc.in_features


def build_probe(input_size: int, num_classes: int, hidden_size: int = HIDDEN_SIZE) -> nn.Module:
    """CLaMP 2's probe with ``hidden_size`` > 0, CLaMP 3's single linear layer with ``hidden_size`` 0."""
    if hidden_size == 0:
        return LinearClassifier(input_size, num_classes)
    return LinearProbe(input_size, num_classes, hidden_size)


def probe_loss(probabilities: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the probabilities, as the reference computes it (log-softmax of a softmax)."""
    return F.cross_entropy(probabilities.float(), targets, reduction=reduction)


def probe_from_state(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """An untrained probe with the sizes of a state dict (input, hidden and class counts from its shapes)."""
    if "fc.weight" in state and "fc1.weight" not in state:
        num_classes, input_size = state["fc.weight"].shape
        return LinearClassifier(int(input_size), int(num_classes))
    missing = [key for key in ("fc1.weight", "fc2.weight") if key not in state]
    if missing:
        raise KeyError(f"no {', '.join(missing)} entry: not a linear-probe checkpoint")
    hidden_size, input_size = state["fc1.weight"].shape
    num_classes = state["fc2.weight"].shape[0]
    return LinearProbe(int(input_size), int(num_classes), int(hidden_size))

"""CLaMP 2 (SPEC §6): XLM-R text encoder + M3 patch encoder, projected into one space.

The module names (``text_model``, ``text_proj``, ``music_model``, ``music_proj``) are the published
keys: do not rename them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .common import JointSpaceModel
from .m3 import M3Dims, M3PatchEncoder


class CLaMP2Model(JointSpaceModel):
    """XLM-R text encoder + M3 patch encoder, each with a projection into the joint space.

    ``text_model`` is passed in (see :mod:`clamp2.text_model`): from pretrained weights for training,
    from a config alone when a CLaMP 2 checkpoint will overwrite it anyway.
    """

    def __init__(self, text_model: nn.Module, m3_dims: M3Dims, hidden_size: int = 768):
        super().__init__(text_model, hidden_size)
        self.music_model = M3PatchEncoder(m3_dims)
        self.music_proj = nn.Linear(m3_dims.hidden_size, hidden_size)
        nn.init.normal_(self.music_proj.weight, std=0.02)

    def music_states(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.music_model(patches, masks)

    def music_global(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked mean of the music states, projected. Not L2-normalised."""
        return self.pooled(self.music_states(patches, masks), masks, self.music_proj)

    def forward(self, text_inputs, text_masks, music_inputs, music_masks, logit_scale: float = 1.0,
                loss_fn: Optional[nn.Module] = None) -> torch.Tensor:
        """Symmetric contrastive loss of a batch of (text, music) pairs."""
        from ..loss import ContrastiveLoss

        loss_fn = loss_fn or ContrastiveLoss()
        text = self.text_global(text_inputs, text_masks)
        music = self.music_global(music_inputs, music_masks)
        return loss_fn(text, music, logit_scale)

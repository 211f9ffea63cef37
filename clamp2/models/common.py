"""What every model family shares: the text tower and pooling of the joint-space models, parameter
counting, reading depths from a state dict."""

from __future__ import annotations

from typing import List

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


def transformer_flops(batch: int, length: int, width: int, layers: int) -> float:
    """Forward FLOPs of ``layers`` transformer layers (MLP 4·width) over ``batch`` sequences of ``length``.

    2 FLOPs per multiply-add: 24·N·width² for QKV, output and MLP over N = batch·length positions,
    4·batch·length²·width for the attention scores and weighted sum (benchmarks' MFU).
    """
    return layers * (24.0 * batch * length * width ** 2 + 4.0 * batch * length ** 2 * width)


def compile_transformers(model: nn.Module, **options) -> List[str]:
    """Compile every transformers model inside ``model`` in place (``nn.Module.compile``); returns their names.

    The encoders and decoders are where the time goes; the code around them (losses gathered across
    processes, M3's decoding in length groups) stays eager, out of the compiler's way. In place, so
    the state-dict keys (checkpoints) do not change. Dynamic shapes: batches are padded to their
    longest sample, a different length each step. ``options`` go to ``torch.compile``.
    """
    from transformers import PreTrainedModel

    compiled: List[str] = []
    for name, module in model.named_modules():
        # The outermost model only: GPT2LMHeadModel holds a GPT2Model, compiled with it.
        if isinstance(module, PreTrainedModel) and not any(done == "" or name.startswith(f"{done}.")
                                                           for done in compiled):
            module.compile(**{"dynamic": True, **options})
            compiled.append(name)
    return compiled


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class JointSpaceModel(nn.Module):
    """The part CLaMP 2 and CLaMP 3 share: the text encoder, its projection, and the pooling rule.

    A global feature is the masked mean of an encoder's last hidden states, then that modality's
    projection (not L2-normalised). ``text_model`` is passed in (see :mod:`clamp2.text_model`).
    Sub-classes add their music encoders after these two modules (the state-dict order is the
    published one: ``text_model``, ``text_proj``, then the music side).
    """

    def __init__(self, text_model: nn.Module, hidden_size: int):
        super().__init__()
        self.text_model = text_model
        self.text_proj = nn.Linear(text_model.config.hidden_size, hidden_size)
        nn.init.normal_(self.text_proj.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.text_proj.weight.device

    @staticmethod
    def pooled(states: torch.Tensor, masks: torch.Tensor, projection: nn.Module) -> torch.Tensor:
        return projection(masked_mean(states, masks.to(states.device)))

    def text_states(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        device = self.device
        return self.text_model(input_ids.to(device), attention_mask=masks.to(device)).last_hidden_state

    def text_global(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked mean of the text states, projected. Not L2-normalised."""
        return self.pooled(self.text_states(input_ids, masks), masks, self.text_proj)

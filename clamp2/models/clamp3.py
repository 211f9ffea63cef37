"""CLaMP 3 (SPEC_CLAMP3 §13): XLM-R text encoder, M3 patch encoder and an audio BERT over MERT features.

The module names (``text_model``, ``text_proj``, ``symbolic_model``, ``symbolic_proj``,
``audio_model``, ``audio_proj``) and their order are the published keys of the SAAS and C2
checkpoints: do not rename or reorder them. The text tower and the pooling rule are CLaMP 2's
(:class:`~clamp2.models.common.JointSpaceModel`); the symbolic encoder is M3's patch encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from transformers import BertConfig, BertModel

from ..attention_arguments import ATTN_IMPLEMENTATION
from .common import JointSpaceModel, count_layers
from .m3 import M3Dims, M3PatchEncoder

MODALITIES = ("symbolic", "audio")


@dataclass(frozen=True)
class AudioDims:
    """The sizes of CLaMP 3's audio encoder (config.py's AUDIO_HIDDEN_SIZE / AUDIO_NUM_LAYERS / MAX_AUDIO_LENGTH)."""

    hidden_size: int = 768
    num_layers: int = 12
    max_length: int = 128

    @classmethod
    def from_config(cls, config) -> "AudioDims":
        return cls(config.AUDIO_HIDDEN_SIZE, config.AUDIO_NUM_LAYERS, config.MAX_AUDIO_LENGTH)


def audio_encoder_config(dims: AudioDims) -> BertConfig:
    # hidden // 64 heads as the reference: a width that is not a multiple of 64 has no valid head count.
    if dims.hidden_size < 64 or dims.hidden_size % 64:
        raise ValueError(f"AUDIO_HIDDEN_SIZE={dims.hidden_size}: CLaMP 3's audio encoder needs a multiple of 64 "
                         "(it has AUDIO_HIDDEN_SIZE // 64 attention heads)")
    return BertConfig(vocab_size=1, hidden_size=dims.hidden_size, num_hidden_layers=dims.num_layers,
                      num_attention_heads=dims.hidden_size // 64, intermediate_size=dims.hidden_size * 4,
                      max_position_embeddings=dims.max_length, attn_implementation=ATTN_IMPLEMENTATION)


def infer_audio_dims(state, prefix: str = "audio_model.") -> AudioDims:
    """The audio encoder sizes a CLaMP 3 state dict implies. Raises ``KeyError`` naming a missing entry."""
    positions = state[f"{prefix}embeddings.position_embeddings.weight"]
    return AudioDims(hidden_size=int(positions.shape[1]), num_layers=count_layers(state, f"{prefix}encoder.layer."),
                     max_length=int(positions.shape[0]))


def clamp2_state_as_clamp3(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A CLaMP 2 state dict under CLaMP 3's names (``music_*`` → ``symbolic_*``); the audio keys stay absent."""
    renamed = {}
    for key, value in state.items():
        for old, new in (("music_model.", "symbolic_model."), ("music_proj.", "symbolic_proj.")):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


class CLaMP3Model(JointSpaceModel):
    """Text, symbolic music and audio, each encoded, mean-pooled and projected into one space.

    ``text_model`` is passed in (see :mod:`clamp2.text_model`) as for CLaMP 2.
    """

    def __init__(self, text_model: nn.Module, m3_dims: M3Dims, audio_dims: AudioDims, hidden_size: int = 768):
        super().__init__(text_model, hidden_size)
        self.symbolic_model = M3PatchEncoder(m3_dims)
        self.symbolic_proj = nn.Linear(m3_dims.hidden_size, hidden_size)
        nn.init.normal_(self.symbolic_proj.weight, std=0.02)
        self.audio_dims = audio_dims
        self.audio_model = BertModel(audio_encoder_config(audio_dims))
        self.audio_proj = nn.Linear(audio_dims.hidden_size, hidden_size)
        nn.init.normal_(self.audio_proj.weight, std=0.02)

    def symbolic_states(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.symbolic_model(patches, masks)

    def symbolic_global(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked mean of the M3 states, projected. Not L2-normalised."""
        return self.pooled(self.symbolic_states(patches, masks), masks, self.symbolic_proj)

    def audio_states(self, rows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Last hidden states of MERT rows [B, L, AUDIO_HIDDEN_SIZE] (read as ``inputs_embeds``) under mask [B, L]."""
        weight = self.audio_proj.weight
        out = self.audio_model(inputs_embeds=rows.to(weight.device, weight.dtype), attention_mask=masks.to(weight.device))
        return out.last_hidden_state

    def audio_global(self, rows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked mean of the audio states, projected. Not L2-normalised."""
        return self.pooled(self.audio_states(rows, masks), masks, self.audio_proj)

    def music_global(self, modality: str, inputs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if modality == "symbolic":
            return self.symbolic_global(inputs, masks)
        if modality == "audio":
            return self.audio_global(inputs, masks)
        raise ValueError(f"unknown CLaMP 3 modality {modality!r}: expected one of {', '.join(MODALITIES)}")

    def forward(self, text_inputs, text_masks, music_inputs, music_masks, modality: str, logit_scale: float = 1.0,
                loss_fn: Optional[nn.Module] = None) -> torch.Tensor:
        """Symmetric contrastive loss of a batch of (text, music) pairs of one modality (§13)."""
        from ..loss import ContrastiveLoss

        loss_fn = loss_fn or ContrastiveLoss()
        text = self.text_global(text_inputs, text_masks)
        music = self.music_global(modality, music_inputs, music_masks)
        return loss_fn(text, music, logit_scale)

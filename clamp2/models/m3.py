"""M3: the patch encoder (bars / MIDI messages → states) and its token decoder (SPEC §5).

The module names (``encoder.patch_embedding``, ``encoder.base``, ``decoder.base``) are the published
keys: do not rename them. The patch encoder is shared by every model family that reads symbolic music
(CLaMP 2's ``music_model``, CLaMP 3's ``symbolic_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from ..attention import set_attention
from ..attention_arguments import ATTN_IMPLEMENTATION
from ..patchilizer import NUM_CLASSES, PAD_TOKEN_ID
from .common import count_layers


@dataclass(frozen=True)
class M3Dims:
    """The sizes that define an M3 model (config.py's PATCH_* / TOKEN_* / M3_HIDDEN_SIZE)."""

    patch_size: int = 64
    patch_length: int = 512
    patch_num_layers: int = 12
    token_num_layers: int = 3
    hidden_size: int = 768

    @classmethod
    def from_config(cls, config) -> "M3Dims":
        return cls(config.PATCH_SIZE, config.PATCH_LENGTH, config.PATCH_NUM_LAYERS,
                   config.TOKEN_NUM_LAYERS, config.M3_HIDDEN_SIZE)


def infer_m3_dims(state, encoder_prefix: str, decoder_prefix: Optional[str] = None) -> M3Dims:
    """The M3 sizes that a state dict's shapes imply, so that a checkpoint loads without config.py.

    ``encoder_prefix`` is ``"music_model."`` in a CLaMP 2 checkpoint and ``"encoder."`` in an M3 one;
    the token decoder's depth is read under ``decoder_prefix`` (default 3 when there is none).
    Raises ``KeyError`` naming the first missing entry.
    """
    embedding = state[f"{encoder_prefix}patch_embedding.weight"]
    hidden_size, one_hot_width = (int(n) for n in embedding.shape)
    positions = state[f"{encoder_prefix}base.embeddings.position_embeddings.weight"]
    token_layers = M3Dims.token_num_layers
    if decoder_prefix is not None:
        token_layers = count_layers(state, f"{decoder_prefix}base.transformer.h.")
    return M3Dims(patch_size=one_hot_width // NUM_CLASSES, patch_length=int(positions.shape[0]),
                  patch_num_layers=count_layers(state, f"{encoder_prefix}base.encoder.layer."),
                  token_num_layers=token_layers, hidden_size=hidden_size)


def m3_encoder_config(dims: M3Dims) -> BertConfig:
    return BertConfig(vocab_size=1, hidden_size=dims.hidden_size, num_hidden_layers=dims.patch_num_layers,
                      num_attention_heads=dims.hidden_size // 64, intermediate_size=dims.hidden_size * 4,
                      max_position_embeddings=dims.patch_length, attn_implementation=ATTN_IMPLEMENTATION)


def m3_decoder_config(dims: M3Dims) -> GPT2Config:
    # bos/eos default to 50256, out of this 128-token vocabulary: unset them. The activation is GPT-2's
    # tanh GELU ("gelu_new") through PyTorch's fused kernel rather than transformers' seven-op Python
    # version: the same function up to rounding, M3 training ~1.35x faster on 2 CPU cores. Only the
    # token decoder uses it (training loss), never the features.
    return GPT2Config(vocab_size=NUM_CLASSES, n_positions=dims.patch_size, n_embd=dims.hidden_size,
                      n_layer=dims.token_num_layers, n_head=dims.hidden_size // 64,
                      n_inner=dims.hidden_size * 4, bos_token_id=None, eos_token_id=None,
                      activation_function="gelu_pytorch_tanh")


def one_hot_patches(patches: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N*patch_size] or [B, N, patch_size] ids → [B, N, patch_size*128] one-hot, on the ids' device."""
    patches = patches.reshape(patches.shape[0], -1, patch_size)
    one_hot = F.one_hot(patches.long(), num_classes=NUM_CLASSES)
    return one_hot.reshape(patches.shape[0], patches.shape[1], patch_size * NUM_CLASSES).to(dtype)


class M3PatchEncoder(nn.Module):
    """One-hot patches → Linear → BERT (via ``inputs_embeds``)."""

    # Training embeds patches by lookup (see embed_by_lookup); False computes the one-hot Linear as the
    # reference's trainers do (benchmarks/bench_train.py's *-reference variants).
    lookup_in_training = True

    def __init__(self, dims: M3Dims):
        super().__init__()
        self.dims = dims
        self.patch_embedding = nn.Linear(dims.patch_size * NUM_CLASSES, dims.hidden_size)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        self.base = BertModel(m3_encoder_config(dims))

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def forward(self, input_patches: torch.Tensor, input_masks: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, N, hidden] of patches [B, N, patch_size] under mask [B, N]."""
        weight = self.patch_embedding.weight
        patches = input_patches.to(weight.device)
        # Under autocast (bf16/fp16 extraction) the one-hot Linear would round the weights to 16 bits;
        # the lookup stays in fp32 and skips a matmul of ~7% of the encoder's FLOPs.
        if (self.training and self.lookup_in_training) or torch.is_autocast_enabled(patches.device.type):
            embeds = self.embed_by_lookup(patches)
        else:
            # The one-hot is built where the model lives (the reference builds it on the CPU).
            embeds = self.patch_embedding(one_hot_patches(patches, self.dims.patch_size, weight.dtype))
        out = self.base(inputs_embeds=embeds, attention_mask=input_masks.to(weight.device))
        return out.last_hidden_state

    def embed_by_lookup(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding as a sum of looked-up columns: what the one-hot Linear computes.

        A one-hot row has one 1 per position, so ``Linear(one_hot)`` = bias + Σ_i W[:, i*128 + id_i]
        (pads included, as in the one-hot). The lookup skips building the [B, N, patch_size*128]
        one-hot and multiplying its zeros: a training step of the quick start's model is ~1.5× faster
        on 2 CPU cores. It sums in another order, so results differ by rounding (~3e-7 on the
        embedding); training and autocast (bf16/fp16) inference use it, fp32 inference keeps the
        one-hot Linear, exact to the reference.
        """
        size = self.dims.patch_size
        ids = patches.reshape(patches.shape[0], -1, size).long()
        offsets = torch.arange(size, device=ids.device) * NUM_CLASSES
        columns = (ids + offsets).reshape(-1, size)
        weight = self.patch_embedding.weight
        device_type = weight.device.type
        if weight.requires_grad and torch.is_grad_enabled() and torch.is_autocast_enabled(device_type):
            summed = LookupSum.apply(columns, weight, torch.get_autocast_dtype(device_type))
        else:
            # A contiguous [patch_size*128, hidden] table: embedding_bag on the transposed view is ~3x slower.
            summed = F.embedding_bag(columns, weight.t().contiguous(), mode="sum")
        return (summed + self.patch_embedding.bias).reshape(ids.shape[0], ids.shape[1], -1)


class LookupSum(torch.autograd.Function):
    """Σ_i weight[:, columns[k, i]] for each row k (the lookup); the weight's gradient by GEMMs in ``dtype``.

    Used in autocast (bf16/fp16) training. embedding_bag's own backward sorts every looked-up index and
    sums rows per column: 14 ms of each CLaMP 2 step on an H200 (batch 128, docs/performance.md), most of
    the indices being the same pad columns. The gradient is one_hot(columns)ᵀ·grad, which the one-hot
    Linear of the reference computes too: as 16-bit GEMMs (exact one-hot, fp32 accumulation, grad rounded
    to ``dtype`` as autocast rounds every Linear's), in chunks of ``ROWS`` rows to bound the one-hot's memory
    (256 MiB). ``dtype`` float32 gives embedding_bag's gradient up to summation order (the tests' check).
    """

    ROWS = 16384

    @staticmethod
    def forward(ctx, columns: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(columns)
        ctx.dtype, ctx.width = dtype, weight.shape[1]
        return F.embedding_bag(columns, weight.t().contiguous(), mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        columns, = ctx.saved_tensors
        grad_weight = grad.new_zeros((grad.shape[1], ctx.width), dtype=torch.float32)
        for start in range(0, len(columns), LookupSum.ROWS):
            rows = columns[start:start + LookupSum.ROWS]
            one_hot = grad.new_zeros((len(rows), ctx.width), dtype=ctx.dtype).scatter_(1, rows, 1)
            grad_weight += grad[start:start + LookupSum.ROWS].to(ctx.dtype).t() @ one_hot
        return None, grad_weight.to(grad.dtype), None


# Decoded lengths are rounded up to a multiple of this: few groups, little padding.
DECODE_LENGTH_STEP = 16


class M3TokenDecoder(nn.Module):
    """GPT-2 that reconstructs a patch's characters from its encoder vector."""

    # On a GPU, decode in length groups as on the CPU instead of one full-length pass. Off: one pass was
    # measured faster on an H200 (48.5 samples/s against 18.6 in groups, default config, batch 16) while
    # cuDNN's attention planned every group's new shape and each group synced with the host twice; M3
    # training now keeps cuDNN out (training.tasks.CUDNN_ATTENTION), so the groups may pay there:
    # ``benchmarks/bench_train.py --m3_decode_groups`` times them (not measured yet).
    decode_groups_on_gpu = False

    def __init__(self, dims: M3Dims):
        super().__init__()
        self.dims = dims
        self.base = set_attention(GPT2LMHeadModel(m3_decoder_config(dims)), ATTN_IMPLEMENTATION)
        # Named explicitly: transformers otherwise warns that it guessed this default loss.
        self.base.loss_type = "ForCausalLM"

    def forward(self, patch_features: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
        """LM loss of ``target_patches`` [K, patch_size] given ``patch_features`` [K, hidden].

        The mean cross-entropy over every predicted id (each non-pad id after position 0), as
        GPT-2's own loss; see :meth:`grouped_loss_sum` for how it is computed.
        """
        loss_sum, predicted = self.grouped_loss_sum(patch_features, target_patches)
        return loss_sum / predicted

    def grouped_loss_sum(self, patch_features: torch.Tensor, target_patches: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(Σ cross-entropy, number of predicted ids), decoding patches in groups of similar length.

        Each group is cut after its patches' last non-pad id, rounded up to DECODE_LENGTH_STEP:
        the cut positions are pads (masked, never predicted) and attention is causal, so the result
        equals decoding all patch_size positions up to rounding, at about half the cost (a patch
        holds ~21 of its 64 ids on average in real music).
        """
        size = target_patches.shape[1]
        if not self.decodes_in_groups(target_patches.device):
            # On a GPU one full-length pass unless asked (decode_groups_on_gpu; see the class's comment).
            return self.loss_sum(patch_features, target_patches)
        is_pad = target_patches == PAD_TOKEN_ID
        filled = (~is_pad) * torch.arange(1, size + 1, device=target_patches.device)
        groups = (filled.amax(dim=1) + DECODE_LENGTH_STEP - 1) // DECODE_LENGTH_STEP
        group_count = (size + DECODE_LENGTH_STEP - 1) // DECODE_LENGTH_STEP + 1
        # One host sync for the whole call: each group's size, its patches with a pad inside, and the ids
        # predicted (scatter_add, not bincount or boolean indexing, which sync on CUDA by themselves).
        sizes = groups.new_zeros(group_count).scatter_add_(0, groups, torch.ones_like(groups))
        inner = groups.new_zeros(group_count).scatter_add_(0, groups, inner_pads(is_pad).long())
        stats = torch.cat((sizes, inner, (~is_pad[:, 1:]).sum().view(1))).tolist()
        sizes, inner, predicted = stats[:group_count], stats[group_count:-1], stats[-1]
        order = torch.argsort(groups, stable=True)  # each group's rows in their order, groups ascending
        total, start = patch_features.new_zeros((), dtype=torch.float32), 0
        for group, count in enumerate(sizes):
            if not count:
                continue
            rows, start = order[start:start + count], start + count
            length = min(max(group, 1) * DECODE_LENGTH_STEP, size)
            total = total + self._cross_entropy_sum(patch_features[rows], target_patches[rows, :length],
                                                    masked=bool(inner[group]))
        return total, predicted

    def decodes_in_groups(self, device: torch.device) -> bool:
        return device.type == "cpu" or self.decode_groups_on_gpu

    def loss_sum(self, patch_features: torch.Tensor, target_patches: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(Σ cross-entropy, number of predicted ids) of patches [K, L] (L ≤ patch_size)."""
        is_pad = target_patches == PAD_TOKEN_ID
        # One host sync for both counts: the ids predicted, and the pads followed by a non-pad id.
        predicted, inner = torch.stack(((~is_pad[:, 1:]).sum(), inner_pads(is_pad).sum())).tolist()
        return self._cross_entropy_sum(patch_features, target_patches, masked=bool(inner)), predicted

    def _cross_entropy_sum(self, patch_features: torch.Tensor, target_patches: torch.Tensor,
                           masked: bool) -> torch.Tensor:
        """Σ cross-entropy of the non-pad ids after position 0; ``masked``: some pad has a non-pad id after it."""
        token_embeds = F.embedding(target_patches, self.base.transformer.wte.weight)
        # The encoder vector takes the place of the bos token: position 0 conditions the patch.
        inputs_embeds = torch.cat((patch_features.unsqueeze(1), token_embeds[:, 1:, :]), dim=1)
        is_pad = target_patches == PAD_TOKEN_ID
        # Pads only trail a patch (a NUL character inside one is the exception): then a causal pass without
        # the padding mask gives every predicted position the same keys, so the same loss, and lets sdpa use
        # its flash kernel instead of the masked one (M3 training on an H200: docs/performance.md).
        attention_mask = (~is_pad).long() if masked else None
        logits = self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        # Position i predicts id i + 1; pads are not predicted. Float32 as transformers' own loss.
        labels = target_patches[:, 1:].masked_fill(is_pad[:, 1:], -100)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")


def inner_pads(is_pad: torch.Tensor) -> torch.Tensor:
    """Per patch [K, L] → [K]: whether a pad id has a non-pad id after it (a NUL character inside the patch)."""
    return (is_pad[:, :-1] & ~is_pad[:, 1:]).any(dim=1)


class M3Model(nn.Module):
    """M3: patch encoder + token decoder, pre-trained by masked-patch reconstruction."""

    def __init__(self, dims: M3Dims):
        super().__init__()
        self.dims = dims
        self.encoder = M3PatchEncoder(dims)
        self.decoder = M3TokenDecoder(dims)

    def forward(self, input_patches, input_masks, selected_indices, target_patches) -> torch.Tensor:
        """Reconstruction loss of the selected (corrupted) patches: mean cross-entropy per predicted id."""
        loss_sum, predicted = self.reconstruction_sums(input_patches, input_masks, selected_indices, target_patches)
        return loss_sum / predicted

    def reconstruction_sums(self, input_patches, input_masks, selected_indices,
                            target_patches) -> tuple[torch.Tensor, int]:
        """(Σ cross-entropy, number of predicted ids) of the selected patches: losses of several batches add up."""
        device = self.encoder.device
        size = self.dims.patch_size
        input_patches = input_patches.reshape(len(input_patches), -1, size).to(device)
        target_patches = target_patches.reshape(len(target_patches), -1, size).to(device)
        selected = selected_indices.to(device).bool()
        hidden = self.encoder(input_patches, input_masks.to(device))
        return self.decoder.grouped_loss_sum(hidden[selected], target_patches[selected])

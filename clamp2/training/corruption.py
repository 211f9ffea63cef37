"""M3 pre-training corruption (SPEC §5): pick patches, then mask, shuffle or keep them.

ceil(mask_ratio · n) patch positions are picked (special patches included, as in the reference).
In training one action is drawn per sample with weights 0.8 / 0.1 / 0.1:

- ``mask``: each picked patch becomes an all-mask patch (every position, bos included);
- ``shuffle``: each picked patch's characters strictly between its bos (position 0) and its first
  eos are permuted; a patch with no eos (its text filled the patch) permutes positions
  1..PATCH_SIZE-1. This is the first of the two variants SPEC §5 allows; it differs from the
  reference only for a patch holding several eos ids, i.e. the eos special patch (where the
  reference permutes identical ids, a no-op either way) or text containing control character 2;
- ``keep``: the input is left as it is.

Evaluation always keeps. The decoder then reconstructs the original picked patches.
"""

from __future__ import annotations

import math
import random
from typing import Tuple

import torch

from ..patchilizer import EOS_TOKEN_ID, MASK_TOKEN_ID

ACTIONS = ("mask", "shuffle", "keep")
ACTION_WEIGHTS = (0.8, 0.1, 0.1)


def pick_positions(num_patches: int, mask_ratio: float, rng: random.Random) -> list[int]:
    """ceil(mask_ratio · n) distinct positions, drawn uniformly, in ascending order."""
    order = list(range(num_patches))
    rng.shuffle(order)
    return sorted(order[: math.ceil(mask_ratio * num_patches)])


def shuffle_patch(patch: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The patch with its characters between bos and the first eos permuted (see the module doc)."""
    eos = (patch == EOS_TOKEN_ID).nonzero()
    end = int(eos[0]) if len(eos) else len(patch)
    inner = list(range(1, end))
    rng.shuffle(inner)
    order = [0] + inner + list(range(end, len(patch)))
    return patch[order]


def corrupt_patches(patches: torch.Tensor, mask_ratio: float, training: bool,
                    rng: random.Random) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_patches, selected)`` for patches [n, PATCH_SIZE]; ``selected`` is 1.0 at picked positions."""
    positions = pick_positions(len(patches), mask_ratio, rng)
    action = rng.choices(ACTIONS, weights=ACTION_WEIGHTS)[0] if training else "keep"
    inputs = patches.clone()
    if action == "mask":
        inputs[positions] = MASK_TOKEN_ID
    elif action == "shuffle":
        for position in positions:
            inputs[position] = shuffle_patch(patches[position], rng)
    selected = torch.zeros(len(patches))
    selected[positions] = 1.0
    return inputs, selected

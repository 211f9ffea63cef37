"""M3 corruption (SPEC §5): ceil(ratio·n) picks, mask / shuffle / keep, evaluation keeps."""

import math
import random
from collections import Counter

import pytest
import torch

from clamp2.patchilizer import EOS_TOKEN_ID, MASK_TOKEN_ID, PAD_TOKEN_ID, M3Patchilizer
from clamp2.training.corruption import corrupt_patches, pick_positions, shuffle_patch

PATCHILIZER = M3Patchilizer(patch_size=16, patch_length=64)
TEXT = "X:1\nL:1/8\nK:G\n" + "|".join(["GABc dedB", "A2 F2 D4", "g f e d", "c4 z4", "B8"] * 3) + "|\n"


def patches():
    return torch.tensor(PATCHILIZER.encode(TEXT, add_special_patches=True))


@pytest.mark.parametrize("n,ratio", [(1, 0.45), (7, 0.45), (20, 0.45), (10, 0.5), (3, 0.01)])
def test_picks_ceil_of_ratio_distinct(n, ratio):
    picked = pick_positions(n, ratio, random.Random(n))
    assert len(picked) == math.ceil(ratio * n) == len(set(picked)) and picked == sorted(picked)
    assert all(0 <= p < n for p in picked)


def test_evaluation_keeps_the_input():
    target = patches()
    for seed in range(20):
        inputs, selected = corrupt_patches(target, 0.45, training=False, rng=random.Random(seed))
        assert torch.equal(inputs, target)
        assert int(selected.sum()) == math.ceil(0.45 * len(target))


def classify(inputs, target, selected):
    changed = [i for i in range(len(target)) if not torch.equal(inputs[i], target[i])]
    assert set(changed) <= set(selected.nonzero().flatten().tolist())  # only picked patches change
    if all(torch.all(inputs[i] == MASK_TOKEN_ID) for i in selected.nonzero().flatten().tolist()):
        return "mask"
    return "shuffle" if changed else "keep"


def test_training_actions_and_their_frequencies():
    target = patches()
    counts = Counter()
    for seed in range(1000):
        inputs, selected = corrupt_patches(target, 0.45, training=True, rng=random.Random(seed))
        counts[classify(inputs, target, selected)] += 1
    # 0.8 / 0.1 / 0.1 (a shuffle that happens to leave every picked patch unchanged counts as keep)
    assert 740 < counts["mask"] < 860 and 60 < counts["shuffle"] < 140 and 60 < counts["keep"] < 150


def test_shuffle_permutes_only_between_bos_and_first_eos():
    patch = torch.tensor(PATCHILIZER.patch_to_ids("GABc dedB|"))
    eos = int((patch == EOS_TOKEN_ID).nonzero()[0])
    seen_change = False
    for seed in range(20):
        out = shuffle_patch(patch, random.Random(seed))
        assert out[0] == patch[0] and torch.equal(out[eos:], patch[eos:])  # bos, eos and pads stay
        assert sorted(out[1:eos].tolist()) == sorted(patch[1:eos].tolist())
        seen_change |= not torch.equal(out, patch)
    assert seen_change


def test_shuffle_of_a_full_patch_without_eos_permutes_all_but_bos():
    patch = torch.tensor(PATCHILIZER.patch_to_ids("abcdefghijklmnopqrstuvwxyz"))  # longer than the patch: no eos
    assert EOS_TOKEN_ID not in patch.tolist() and PAD_TOKEN_ID not in patch.tolist()
    out = shuffle_patch(patch, random.Random(0))
    assert out[0] == patch[0] and sorted(out.tolist()) == sorted(patch.tolist()) and not torch.equal(out, patch)


def test_special_patches_are_unchanged_by_shuffling():
    bos_patch, eos_patch = patches()[0], patches()[-1]
    for seed in range(5):
        assert torch.equal(shuffle_patch(bos_patch, random.Random(seed)), bos_patch)
        assert torch.equal(shuffle_patch(eos_patch, random.Random(seed)), eos_patch)

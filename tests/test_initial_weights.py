"""Initial weights drawn as the reference draws them: the same seed gives the same model (docs/differences.md).

tests/data/reference_initial_weights.json holds, for every tensor of the reference's freshly built M3, CLaMP 2
and CLaMP 3 (sanderwood/clamp3 code/utils.py's M3Model and CLaMP3Model, CLaMP 2's CLaMP2Model, transformers
4.46.3, built right after seeding 42 as their training scripts do, at the tests' tiny sizes), its sum, its sum
of squares, its first value and its middle value. A changed initialiser (a std, an init order, a layer built
in another order) changes them.
"""

import json

import pytest
import torch

from clamp2.distributed import seed_everything
from clamp2.models.clamp3 import AudioDims
from clamp2.models.m3 import M3Dims, M3Model
from clamp2.training.tasks import build_clamp2_model, build_clamp3_model
from conftest import DATA_DIR, VECTORS

REFERENCE = json.loads((DATA_DIR / "reference_initial_weights.json").read_text())
TEXT_MODEL = str(VECTORS / "tiny_text_model")


def build(which: str) -> torch.nn.Module:
    seed_everything(42)
    if which == "m3":
        return M3Model(M3Dims(64, 32, 1, 1, 64))
    if which == "clamp2":
        return build_clamp2_model(TEXT_MODEL, M3Dims(64, 32, 1, 1, 64), 32, None, log=lambda message: None)
    return build_clamp3_model(TEXT_MODEL, M3Dims(64, 32, 2, 1, 64), AudioDims(64, 2, 4), 48, (),
                              log=lambda message: None)


@pytest.mark.parametrize("which", ["m3", "clamp2", "clamp3"])
def test_initial_weights_are_the_references(which):
    expected = REFERENCE[which]
    state = build(which).state_dict()
    assert sorted(state) == sorted(expected)
    for key, (total, squares, first, middle) in expected.items():
        values = state[key].double().flatten()
        got = (values.sum().item(), values.square().sum().item(), values[0].item(), values[len(values) // 2].item())
        assert got == pytest.approx((total, squares, first, middle), rel=1e-6, abs=1e-6), key

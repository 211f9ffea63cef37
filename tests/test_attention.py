"""Attention kernels (clamp2.attention): PyTorch's fused SDPA gives the eager path's numbers on every model.

Each model is one of the tests' tiny checkpoints (the reference's weights, perturbed so that every
tensor matters) on real inputs from tests/data: windows of different lengths in one batch, so the
padding mask is exercised. fp32: equal within 1e-5. bf16 (CPU autocast): the features keep their
direction (cosine ≥ 0.99; docs/performance.md gives the measured deviations).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clamp2.attention import attention_of, set_attention
from clamp2.attention_arguments import ATTN_IMPLEMENTATION
from clamp2.checkpoint import load_model_weights, read_checkpoint, state_dict_of
from clamp2.extraction.core import AudioEncoder, MusicEncoder, TextEncoder, pad_batch
from clamp2.models.clamp2 import CLaMP2Model
from clamp2.models.clamp3 import CLaMP3Model, infer_audio_dims
from clamp2.models.m3 import M3Model, infer_m3_dims
from clamp2.patchilizer import PAD_TOKEN_ID, M3Patchilizer
from clamp2.text_model import load_text_model, load_tokenizer
from conftest import FP32_FLAGS, PRECISION_OPERATORS, VECTORS, legacy_precision_flags, precision_flags

VECTORS3 = VECTORS.parent / "vectors_clamp3"
TEXT_MODEL = str(VECTORS / "tiny_text_model")


def windows_of(sequences, lengths):
    """One window per requested length, cut from the sequences in turn (real content, varied padding)."""
    return [sequences[i % len(sequences)][:length] for i, length in enumerate(lengths)]


def music_batch(folder: Path, patch_length: int, remove_unit_length: bool = False):
    encode = MusicEncoder(M3Patchilizer(64, patch_length), remove_unit_length=remove_unit_length)
    sequences = [encode(p).long() for p in sorted(folder.glob("abc/*.abc")) + sorted(folder.glob("mtf/*.mtf"))]
    return pad_batch(windows_of(sequences, [patch_length, patch_length // 2 + 1, 5, patch_length - 3, 2]), PAD_TOKEN_ID)


def text_batch(folder: Path, tokenizer, max_length: int):
    sequences = [TextEncoder(tokenizer)(p) for p in sorted(folder.glob("txt/*.txt"))]
    return pad_batch(windows_of(sequences, [max_length, 7, 3, max_length - 1]), tokenizer.pad_token_id)


def audio_batch(folder: Path, width: int, max_length: int):
    sequences = [AudioEncoder(width)(p) for p in sorted(folder.glob("audio/*.npy"))]
    return pad_batch(windows_of(sequences, [max_length, 2, max_length - 1]), 0.0)


def outputs(model, forward, implementation: str, bf16: bool = False):
    set_attention(model, implementation)
    assert attention_of(model) == {implementation}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return {name: value.float() for name, value in forward().items()}


def real_positions(states: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return states[masks.bool()]


def assert_equal_paths(model, forward):
    """fp32: SDPA == eager within 1e-5; bf16 SDPA keeps every feature's direction. Returns the bf16 cosines."""
    eager, sdpa = outputs(model, forward, "eager"), outputs(model, forward, "sdpa")
    for name in eager:
        torch.testing.assert_close(sdpa[name], eager[name], atol=1e-5, rtol=0, msg=name)
    bf16 = outputs(model, forward, "sdpa", bf16=True)
    cosines = {name: float(torch.nn.functional.cosine_similarity(bf16[name], sdpa[name], dim=-1).min())
               for name in sdpa}
    assert min(cosines.values()) >= 0.99, cosines
    set_attention(model, ATTN_IMPLEMENTATION)
    return cosines


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEXT_MODEL)


def test_every_built_model_uses_the_package_choice():
    from clamp2.models.clamp3 import AudioDims
    from clamp2.models.m3 import M3Dims
    from clamp2.models.mert import load_mert

    dims = M3Dims(patch_length=8, patch_num_layers=1, token_num_layers=1, hidden_size=64)
    assert attention_of(M3Model(dims)) == {ATTN_IMPLEMENTATION} == {"sdpa"}
    clamp3 = CLaMP3Model(load_text_model(TEXT_MODEL, pretrained=False), dims, AudioDims(64, 1, 4), hidden_size=16)
    assert attention_of(clamp3) == {"sdpa"}
    assert attention_of(load_mert(VECTORS3 / "tiny_mert")) == {"sdpa"}
    assert attention_of(load_text_model(TEXT_MODEL)) == {"sdpa"}
    with pytest.raises(ValueError, match="expected one of sdpa, eager"):
        set_attention(clamp3, "flash")


def test_m3_encoder_and_decoder(vectors):
    state = state_dict_of(read_checkpoint(vectors / "tiny_m3.pth"))
    dims = infer_m3_dims(state, "encoder.", "decoder.")
    model = M3Model(dims)
    load_model_weights(model, vectors / "tiny_m3.pth")
    model.eval()
    patches, masks = music_batch(vectors / "extract_in", dims.patch_length, remove_unit_length=True)
    # The loss of every real patch decoded by the token decoder (GPT-2, causal attention with padding).
    selected = masks.clone()

    def forward():
        states = model.encoder(patches, masks)
        return {"encoder states": real_positions(states, masks),
                "decoder loss": model(patches, masks, selected, patches).reshape(1, 1)}

    assert_equal_paths(model, forward)


def test_clamp2_global_and_per_position_features(vectors, tokenizer):
    state = state_dict_of(read_checkpoint(vectors / "tiny_clamp2.pth"))
    dims = infer_m3_dims(state, "music_model.")
    model = CLaMP2Model(load_text_model(TEXT_MODEL, pretrained=False), dims, hidden_size=state["music_proj.weight"].shape[0])
    load_model_weights(model, vectors / "tiny_clamp2.pth")
    model.eval()
    patches, music_masks = music_batch(vectors / "extract_in", dims.patch_length)
    ids, text_masks = text_batch(vectors / "extract_in", tokenizer, 16)

    def forward():
        return {"music global": model.music_global(patches, music_masks),
                "text global": model.text_global(ids, text_masks),
                "music states": real_positions(model.music_states(patches, music_masks), music_masks),
                "text states": real_positions(model.text_states(ids, text_masks), text_masks)}

    assert_equal_paths(model, forward)


def test_clamp3_text_symbolic_and_audio(tokenizer):
    state = state_dict_of(read_checkpoint(VECTORS3 / "tiny_clamp3.pth"))
    dims, audio = infer_m3_dims(state, "symbolic_model."), infer_audio_dims(state)
    model = CLaMP3Model(load_text_model(TEXT_MODEL, pretrained=False), dims, audio,
                        hidden_size=state["audio_proj.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    model.eval()
    patches, music_masks = music_batch(VECTORS3 / "extract_in", dims.patch_length, remove_unit_length=True)
    ids, text_masks = text_batch(VECTORS3 / "extract_in", tokenizer, 16)
    rows, audio_masks = audio_batch(VECTORS3 / "extract_in", audio.hidden_size, audio.max_length)

    def forward():
        return {"symbolic global": model.symbolic_global(patches, music_masks),
                "text global": model.text_global(ids, text_masks),
                "audio global": model.audio_global(rows, audio_masks),
                "audio states": real_positions(model.audio_states(rows, audio_masks), audio_masks)}

    assert_equal_paths(model, forward)


def test_mert_hidden_states():
    from clamp2.extraction.audio import load_windows
    from clamp2.models.mert import load_mert

    model = load_mert(VECTORS3 / "tiny_mert")
    wave, bounds = load_windows(VECTORS3 / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav")
    windows = torch.stack([torch.from_numpy(wave[start:end]) for start, end in bounds[:2]])

    def forward():
        out = model(windows, output_hidden_states=True)
        return {f"hidden state {i}": state for i, state in enumerate(out.hidden_states)}

    assert_equal_paths(model, forward)


def sdp_flags():
    cuda = torch.backends.cuda
    return {"cudnn": cuda.cudnn_sdp_enabled(), "flash": cuda.flash_sdp_enabled(),
            "efficient": cuda.mem_efficient_sdp_enabled(), "math": cuda.math_sdp_enabled()}


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_every_half_precision_context_keeps_sdpa_off_cudnn():
    # cuDNN's attention plans each new shape on the CPU (docs/performance.md): every bf16/fp16 context the
    # package opens on CUDA (extraction and API, training and probes) leaves it out, and gives it back after.
    from clamp2.extraction.core import autocast_context
    from clamp2.training.loop import Precision

    before = sdp_flags()
    assert before["cudnn"]  # PyTorch's default: the test would prove nothing otherwise
    cuda = torch.device("cuda")
    contexts = [autocast_context(cuda, "bf16"), autocast_context(cuda, "fp16"),
                Precision.choose(cuda, "bf16").autocast(), Precision.choose(cuda, "fp16").autocast()]
    assert [context.dtype for context in contexts] == [torch.bfloat16, torch.float16] * 2  # as asked for
    for context in contexts:
        for _ in range(2):  # one object guards every batch of a run
            with context:
                assert sdp_flags() == {"cudnn": False, "flash": True, "efficient": True, "math": True}
                with context:  # re-entrant, as torch.autocast
                    assert not sdp_flags()["cudnn"]
                assert not sdp_flags()["cudnn"]
            assert sdp_flags() == before
    # Trainers whose batches keep their shapes leave PyTorch's choice, cuDNN included.
    with Precision.choose(cuda, "bf16", cudnn_attention=True).autocast():
        assert sdp_flags() == before


def test_cpu_autocast_context_is_torch_autocast():
    from clamp2.attention import Autocast

    context = Autocast("cpu", torch.bfloat16)
    a = torch.randn(4, 4)
    for _ in range(2):
        with context:
            assert torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.bfloat16
            assert sdp_flags()["cudnn"]  # the CPU has no cuDNN attention: nothing to change
        assert not torch.is_autocast_enabled("cpu")


CALLER_PRECISION = {
    "defaults": lambda: None,
    "legacy switches": lambda: (setattr(torch.backends.cudnn, "allow_tf32", True),
                                torch.set_float32_matmul_precision("medium")),
    # What transformers' TrainingArguments(tf32=True) does; the legacy matmul getter then raises.
    "global tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "mixed per-operator flags": lambda: (setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32"),
                                         setattr(torch.backends.cudnn.rnn, "fp32_precision", "ieee"),
                                         setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                                         setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")),
}


@pytest.mark.parametrize("machine", ["cuda", "cpu only"])
@pytest.mark.parametrize("caller", list(CALLER_PRECISION))
def test_fp32_context_turns_every_shortcut_off_and_restores_the_callers_flags(precision_restored, monkeypatch, caller,
                                                                              machine):
    # cuDNN rounds fp32 convolutions (MERT's feature encoder) to TF32 by default: fp32 must mean fp32 on a GPU
    # too, whichever of PyTorch's two APIs the caller used, without raising where PyTorch's legacy getters do.
    # cuDNN's flags are set only where CUDA is: elsewhere they govern nothing, and are left as found.
    import clamp2.attention
    from clamp2.extraction.core import autocast_context

    monkeypatch.setattr(clamp2.attention, "_cuda_present", lambda: machine == "cuda")
    CALLER_PRECISION[caller]()
    before = precision_flags(), legacy_precision_flags()
    assert caller == "defaults" or before[0] != ("tf32", "tf32", "none", "none", "none")
    inside = FP32_FLAGS if machine == "cuda" else before[0][:2] + FP32_FLAGS[2:]
    for device in ("cuda", "cpu"):  # the flags only: no CUDA call is made
        context = autocast_context(torch.device(device), "fp32")
        for _ in range(2):  # one object guards every batch of a run
            with context:
                assert precision_flags() == inside
                # Consistent inside, so legacy readers work; cuDNN's legacy switch is left alone where it did not
                # read before (it could not be put back), and still does not read; and where CUDA is not.
                cudnn_legacy = False if machine == "cuda" and before[1][0] != "raises" else before[1][0]
                assert legacy_precision_flags() == (cudnn_legacy, "highest")
                with context:
                    assert precision_flags() == inside
                assert precision_flags() == inside
            assert (precision_flags(), legacy_precision_flags()) == before
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast is switched off inside
        with autocast_context(torch.device("cpu"), "fp32"):
            assert (a @ a).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.bfloat16


HOST_OPERATORS = [(backend, name) for backend, name in PRECISION_OPERATORS if backend != "cudnn"]


def host_flags():
    return tuple(getattr(getattr(torch.backends, backend), name).fp32_precision for backend, name in HOST_OPERATORS)


@pytest.mark.parametrize("later", ["ieee", "tf32", "none"])
@pytest.mark.parametrize("caller", list(CALLER_PRECISION))
def test_fp32_context_leaves_pytorchs_flag_inheritance_working(precision_restored, monkeypatch, caller, later):
    # The getters give the value in force, inherited or not. Writing those back made every flag explicit, so a
    # caller's later torch.backends.fp32_precision = "ieee" after one search no longer reached them (TF32 stayed
    # on), and "none" left the legacy matmul getter raising. The flags of the matrix products and of oneDNN must
    # answer a later switch as if no context had run (cuDNN's cannot where CUDA is: ExactFloat32's docstring).
    import clamp2.attention
    from clamp2.search.retrieval import full_float32_matmul

    monkeypatch.setattr(clamp2.attention, "_cuda_present", lambda: False)

    def run(with_context):
        torch.backends.fp32_precision = "none"  # PyTorch's start for these flags: all inheriting
        torch.backends.mkldnn.fp32_precision = "none"
        for backend, name in HOST_OPERATORS:
            getattr(getattr(torch.backends, backend), name).fp32_precision = "none"
        CALLER_PRECISION[caller]()
        if with_context:
            with full_float32_matmul():
                assert host_flags() == ("ieee",) * len(HOST_OPERATORS)
        torch.backends.fp32_precision = later
        return host_flags(), legacy_precision_flags()[1]

    assert run(with_context=True) == run(with_context=False)


def test_fp32_context_closed_from_another_thread_puts_the_flags_back(precision_restored):
    # A generator paused inside the context and closed (or collected) in another thread: the exit raised an
    # IndexError before the flags were put back, and the process stayed at fp32 for good.
    import threading

    from clamp2.attention import ExactFloat32

    CALLER_PRECISION["global tf32"]()
    before = precision_flags()
    context = ExactFloat32()

    def rows():
        with context:
            yield precision_flags()

    paused = rows()
    assert next(paused)[2:] == ("ieee",) * 3
    closer = threading.Thread(target=paused.close)
    closer.start()
    closer.join(10)
    assert precision_flags() == before
    with context:  # and the next use still works
        assert precision_flags()[2:] == ("ieee",) * 3
    assert precision_flags() == before


def test_fp32_context_is_thread_safe(tf32_allowed, cuda_machine):
    # Two threads (an API called from a thread pool): A in, B in, A out while B still computes, B out.
    # Each saving and restoring on its own left B computing with TF32, then the process with it off.
    import threading

    from clamp2.extraction.core import autocast_context

    before = precision_flags(), legacy_precision_flags()
    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out")}
    seen = {}

    def thread_a():
        with autocast_context(torch.device("cuda"), "fp32"):
            steps["a_in"].set()
            steps["b_in"].wait(10)
        steps["a_out"].set()

    def thread_b():
        steps["a_in"].wait(10)
        with autocast_context(torch.device("cuda"), "fp32"):
            steps["b_in"].set()
            steps["a_out"].wait(10)
            seen["b after a left"] = precision_flags()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert all(event.is_set() for event in steps.values())
    assert seen["b after a left"] == FP32_FLAGS
    assert (precision_flags(), legacy_precision_flags()) == before


def test_mert_fp32_forward_pass_runs_without_tf32(tf32_allowed, cuda_machine):
    # A caller that allowed TF32 beforehand; tests/test_extract.py checks the extraction scripts' passes.
    from clamp2.extraction.mert import MertFeatureExtractor
    from clamp2.models import mert

    seen = []
    before = precision_flags()
    model = mert.load_mert(VECTORS3 / "tiny_mert")
    model.register_forward_pre_hook(lambda module, args: seen.append(precision_flags()))
    MertFeatureExtractor(model, "cpu").features(VECTORS3 / "inputs" / "audio" / "banish_misfortune_22k05_mono_s16.wav")
    assert seen and set(seen) == {FP32_FLAGS}
    assert precision_flags() == before != FP32_FLAGS


def test_search_products_run_in_fp32_whatever_the_caller_set(precision_restored, cuda_machine):
    from clamp2.search.retrieval import full_float32_matmul

    CALLER_PRECISION["global tf32"]()
    with full_float32_matmul():
        assert precision_flags() == FP32_FLAGS
    assert precision_flags() == ("tf32",) * len(FP32_FLAGS)


def test_the_package_does_not_import_dynamo():
    # torch.compiler.disable on ExactFloat32's override imported torch._dynamo with the module: +1.2 s at the
    # start of every script (semantic_search.py --help 2.0 → 3.9 s). Only --compile needs it.
    import subprocess
    import sys

    code = ("import sys, clamp2.attention, clamp2.search.retrieval, clamp2.extraction.core, clamp2.extraction.audio; "
            "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

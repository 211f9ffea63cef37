"""CLaMP 3 model (SPEC_CLAMP3 §13): published key layout, the reference's tiny checkpoint, pooling per modality."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, XLMRobertaConfig

from clamp2.checkpoint import in_published_order
from clamp2.loss import contrastive_loss
from clamp2.models.clamp2 import CLaMP2Model
from clamp2.models.clamp3 import AudioDims, CLaMP3Model, audio_encoder_config, clamp2_state_as_clamp3, infer_audio_dims
from clamp2.models.m3 import M3Dims, infer_m3_dims
from conftest import SPEC_DIR
from test_models import key_list, read_key_list

VECTORS3 = SPEC_DIR / "vectors_clamp3"
TINY_M3 = M3Dims(patch_size=64, patch_length=32, patch_num_layers=2, token_num_layers=1, hidden_size=64)
TINY_AUDIO = AudioDims(hidden_size=64, num_layers=2, max_length=4)


def tiny_reference_model():
    """The reference's tiny CLaMP 3 (tests/data/vectors_clamp3/tiny_clamp3.pth), loaded strictly."""
    text_config = AutoConfig.from_pretrained(VECTORS3.parent / "vectors" / "tiny_text_model")
    model = CLaMP3Model(AutoModel.from_config(text_config), TINY_M3, TINY_AUDIO, hidden_size=48)
    checkpoint = torch.load(VECTORS3 / "tiny_clamp3.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.eval()


def test_default_clamp3_keys_and_shapes_equal_published():
    base = XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    with torch.device("meta"):  # 458 M parameters: shapes only
        model = CLaMP3Model(AutoModel.from_config(base), M3Dims(), AudioDims(), hidden_size=768)
    ours, theirs = key_list(model), read_key_list("clamp3_state_dict.tsv")
    assert len(ours) == len(theirs) == 605
    assert {k: (s, d) for k, s, d in ours} == {k: (s, d) for k, s, d in theirs}
    # The published module order (text, symbolic, audio) is the registration order.
    prefixes = [k.split(".")[0] for k, _, _ in ours]
    assert list(dict.fromkeys(prefixes)) == ["text_model", "text_proj", "symbolic_model", "symbolic_proj",
                                             "audio_model", "audio_proj"]
    assert sum(int(np.prod(s)) for _, s, _ in ours) == 457_896_960
    state = in_published_order(model.state_dict())  # what save_checkpoint writes
    assert [(k, list(v.shape), str(v.dtype)) for k, v in state.items()] == theirs


def test_audio_encoder_is_bert_defaults_with_hidden_over_64_heads():
    config = audio_encoder_config(AudioDims())
    assert (config.num_attention_heads, config.intermediate_size, config.max_position_embeddings) == (12, 3072, 128)
    assert (config.type_vocab_size, config.layer_norm_eps, config.vocab_size) == (2, 1e-12, 1)
    with pytest.raises(ValueError, match="multiple of 64"):
        audio_encoder_config(AudioDims(hidden_size=32))


def test_dims_read_back_from_the_reference_checkpoint():
    state = torch.load(VECTORS3 / "tiny_clamp3.pth", map_location="cpu", weights_only=True)["model"]
    assert infer_audio_dims(state) == TINY_AUDIO
    assert infer_m3_dims(state, "symbolic_model.") == M3Dims(64, 32, 2, 3, 64)  # no decoder: default depth


def test_reference_tiny_checkpoint_gives_reference_global_features():
    model = tiny_reference_model()
    expected = VECTORS3 / "expected" / "feat_clamp3_global"
    with torch.inference_mode():
        # One MERT segment between the two zero rows: a single (padded) window of 3 rows.
        segments = np.load(VECTORS3 / "extract_in" / "audio" / "bwv26.6_44k1_stereo_s16.npy").reshape(-1, 64)
        rows = np.concatenate([np.zeros((1, 64), np.float32), segments, np.zeros((1, 64), np.float32)])
        padded = torch.zeros(1, 4, 64)
        padded[0, :3] = torch.from_numpy(rows)
        audio = model.audio_global(padded, torch.tensor([[1, 1, 1, 0]]))
        np.testing.assert_allclose(audio.numpy(), np.load(expected / "audio" / "bwv26.6_44k1_stereo_s16.npy"), atol=1e-5)
        # 24 patches (≤ PATCH_LENGTH 32): a single symbolic window.
        patches = json.loads((VECTORS3 / "expected" / "patches" / "abc" / "banish_misfortune.abc.json").read_text())
        ids = torch.tensor(patches).unsqueeze(0)
        symbolic = model.symbolic_global(ids, torch.ones(1, ids.shape[1]))
        np.testing.assert_allclose(symbolic.numpy(), np.load(expected / "abc" / "banish_misfortune.npy"), atol=1e-5)


def test_audio_global_is_padding_invariant():
    model = tiny_reference_model()
    torch.manual_seed(0)
    rows = torch.randn(2, 4, 64)
    with torch.inference_mode():
        both = model.audio_global(rows, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
        alone = model.audio_global(rows[1:, :2], torch.ones(1, 2))
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=0)


def test_contrastive_loss_per_modality_and_unknown_modality():
    model = tiny_reference_model()
    text_ids = torch.tensor([[0, 10, 11, 2], [0, 12, 2, 1]])
    text_masks = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    loss = model(text_ids, text_masks, torch.randn(2, 4, 64), torch.ones(2, 4), "audio")
    loss.backward()
    assert torch.isfinite(loss)
    assert model.audio_proj.weight.grad is not None and model.symbolic_proj.weight.grad is None
    with pytest.raises(ValueError, match="modality 'video'"):
        model(text_ids, text_masks, torch.randn(2, 4, 64), torch.ones(2, 4), "video")


def test_clamp2_checkpoint_maps_onto_the_symbolic_side(tiny_text_dir):
    from clamp2.text_model import load_text_model

    torch.manual_seed(1)
    clamp2 = CLaMP2Model(load_text_model(str(tiny_text_dir)), TINY_M3, hidden_size=48)
    torch.manual_seed(2)
    clamp3 = CLaMP3Model(load_text_model(str(tiny_text_dir)), TINY_M3, TINY_AUDIO, hidden_size=48)
    missing, unexpected = clamp3.load_state_dict(clamp2_state_as_clamp3(clamp2.state_dict()), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(("audio_model.", "audio_proj.")) for k in missing)
    ids = torch.randint(0, 128, (1, 5, 64))
    with torch.inference_mode():
        torch.testing.assert_close(clamp3.eval().symbolic_global(ids, torch.ones(1, 5)),
                                   clamp2.eval().music_global(ids, torch.ones(1, 5)))


def _text_batch():
    return torch.tensor([[0, 10, 11, 2], [0, 12, 2, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def test_clamp3_training_loss_is_the_contrastive_loss_of_each_modalitys_globals():
    """CLaMP3Model.forward(modality) must route to that modality's global feature unchanged (SPEC_CLAMP3 §13)."""
    model = tiny_reference_model()
    text_ids, text_masks = _text_batch()
    torch.manual_seed(0)
    rows, row_masks = torch.randn(2, 4, 64), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    patches, patch_masks = torch.randint(4, 128, (2, 3, 64)), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        text = model.text_global(text_ids, text_masks)
        for modality, music, inputs, masks in (("audio", model.audio_global(rows, row_masks), rows, row_masks),
                                               ("symbolic", model.symbolic_global(patches, patch_masks), patches,
                                                patch_masks)):
            expected = contrastive_loss(text, music, 3.0)
            got = model(text_ids, text_masks, inputs, masks, modality, logit_scale=3.0)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_audio_rows_are_read_in_the_models_dtype():
    """float64 (or float16) MERT rows handed to the model directly give the float32 rows' feature, in float32."""
    model = tiny_reference_model()
    torch.manual_seed(1)
    rows, masks = torch.randn(1, 3, 64), torch.ones(1, 3)
    with torch.inference_mode():
        expected = model.audio_global(rows, masks)
        got = model.audio_global(rows.double(), masks)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

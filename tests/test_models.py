"""Models (SPEC §5–6): published key layout at default size, strict loading, padding invariance."""

import numpy as np
import torch
from transformers import AutoModel, XLMRobertaConfig

from clamp2.checkpoint import in_published_order, load_model_weights
from clamp2.models.clamp2 import CLaMP2Model
from clamp2.models.m3 import M3Dims, M3Model, M3PatchEncoder, one_hot_patches
from clamp2.models.common import masked_mean
from clamp2.patchilizer import M3Patchilizer
from conftest import SPEC_DIR

TINY = M3Dims(patch_size=64, patch_length=32, patch_num_layers=2, token_num_layers=1, hidden_size=64)


def read_key_list(name):
    rows = []
    for line in (SPEC_DIR / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(x) for x in shape.strip("[]").split(",") if x.strip()], dtype.strip()))
    return rows


def key_list(model):
    return [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]


def same_keys(model, published):
    # Compared as a mapping: the published list's order comes from transformers 4, whose
    # XLM-R embeddings registered position before token-type embeddings; loading ignores order.
    ours, theirs = key_list(model), read_key_list(published)
    assert len(ours) == len(theirs)
    assert {k: (s, d) for k, s, d in ours} == {k: (s, d) for k, s, d in theirs}


def test_default_m3_keys_and_shapes_equal_published():
    torch.manual_seed(0)
    assert key_list(M3Model(M3Dims())) == read_key_list("m3_state_dict.tsv")  # same order too


def test_default_clamp2_keys_and_shapes_equal_published():
    base = XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    model = CLaMP2Model(AutoModel.from_config(base), M3Dims(), hidden_size=768)
    same_keys(model, "clamp2_state_dict.tsv")
    # ... and checkpoints are written in the published order, key for key.
    state = in_published_order(model.state_dict())
    assert [(k, list(v.shape), str(v.dtype)) for k, v in state.items()] == read_key_list("clamp2_state_dict.tsv")


def test_reference_tiny_m3_loads_strict_and_gives_reference_features(vectors):
    model = M3Model(TINY).eval()
    load_model_weights(model, vectors / "tiny_m3.pth")
    text = (vectors / "extract_in/abc/bwv10.7.abc").read_text(encoding="utf-8").replace("L:1/8\n", "")
    patches = torch.tensor(M3Patchilizer(64, 32).encode(text, add_special_patches=True))
    expected = np.load(vectors / "expected/feat_m3/abc/bwv10.7.npy")[0]
    with torch.inference_mode():
        first = model.encoder(patches[None, :32], torch.ones(1, 32))[0]
    np.testing.assert_allclose(first.numpy(), expected[:32], atol=1e-5)


def tiny_patches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (n, 64), generator=g)


def test_m3_encoder_is_padding_invariant():
    torch.manual_seed(0)
    encoder = M3Model(TINY).encoder.eval()
    short, long = tiny_patches(7, 1), tiny_patches(20, 2)
    batch = torch.zeros(2, 20, 64, dtype=torch.long)
    batch[0, :7], batch[1] = short, long
    masks = torch.zeros(2, 20)
    masks[0, :7], masks[1] = 1, 1
    with torch.inference_mode():
        alone = encoder(short[None], torch.ones(1, 7))[0]
        batched = encoder(batch, masks)
    assert torch.allclose(alone, batched[0, :7], atol=1e-5)
    assert torch.allclose(encoder(long[None], torch.ones(1, 20))[0], batched[1], atol=1e-5)


def test_m3_reconstruction_loss_and_gradients():
    torch.manual_seed(0)
    model = M3Model(TINY)
    patches = tiny_patches(10, 3)[None]
    selected = torch.zeros(1, 10)
    selected[0, [2, 5]] = 1
    loss = model(patches, torch.ones(1, 10), selected, patches)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - np.log(128)) < 1.0  # untrained: close to uniform over 128 symbols
    loss.backward()
    assert model.encoder.patch_embedding.weight.grad.abs().sum() > 0
    assert model.decoder.base.transformer.wte.weight.grad.abs().sum() > 0


def tiny_m3_and_chorale_patches(vectors):
    """The tests' tiny M3 (the reference's weights) and the first 32 patches of a Bach chorale, [1, 32, 64]."""
    model = M3Model(TINY)
    load_model_weights(model, vectors / "tiny_m3.pth")
    text = (vectors / "extract_in/abc/bwv10.7.abc").read_text(encoding="utf-8")
    patches = torch.tensor(M3Patchilizer(64, 32).encode(text, add_special_patches=True))[None, :32]
    return model, patches


def test_training_patch_embedding_lookup_equals_the_one_hot_linear(vectors):
    """Training sums looked-up columns; inference keeps the reference's one-hot Linear (exact)."""
    from clamp2.models.m3 import one_hot_patches

    model, patches = tiny_m3_and_chorale_patches(vectors)
    encoder = model.encoder
    one_hot = one_hot_patches(patches, 64, torch.float32)

    linear = encoder.patch_embedding(one_hot)
    linear.square().sum().backward()
    grad_linear = encoder.patch_embedding.weight.grad.clone()
    encoder.patch_embedding.weight.grad = None
    lookup = encoder.embed_by_lookup(patches)
    lookup.square().sum().backward()
    grad_lookup = encoder.patch_embedding.weight.grad

    assert torch.allclose(lookup, linear, atol=1e-6, rtol=0)
    assert torch.allclose(grad_lookup, grad_linear, atol=1e-5, rtol=1e-5)  # gradients of size ~10
    assert grad_lookup.abs().sum() > 0

    # Eval mode takes the one-hot Linear: bit-identical to it.
    with torch.inference_mode():
        states = encoder.eval()(patches, torch.ones(1, 32))
        expected = encoder.base(inputs_embeds=encoder.patch_embedding(one_hot), attention_mask=torch.ones(1, 32))
    assert torch.equal(states, expected.last_hidden_state)


def test_autocast_training_lookup_gradient_by_one_hot_gemm(vectors, monkeypatch):
    """Under autocast, training's lookup takes its weight gradient from 16-bit GEMMs over a one-hot (LookupSum)."""
    from clamp2.models.m3 import LookupSum

    model, patches = tiny_m3_and_chorale_patches(vectors)
    encoder = model.encoder.train()
    weight = encoder.patch_embedding.weight
    signs = torch.randn(32, weight.shape[0], generator=torch.Generator().manual_seed(0))

    def lookup_and_grad(autocast: bool):
        weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            embeds = encoder.embed_by_lookup(patches)
        (embeds[0] * signs).sum().backward()
        return embeds.detach(), weight.grad.clone()

    exact, exact_grad = lookup_and_grad(False)
    monkeypatch.setattr(LookupSum, "ROWS", 5)  # several chunks, the last one short
    calls = []
    original = LookupSum.backward
    monkeypatch.setattr(LookupSum, "backward", staticmethod(lambda ctx, grad: calls.append(1) or original(ctx, grad)))
    fast, fast_grad = lookup_and_grad(True)
    assert calls  # the GEMM gradient ran
    assert fast.dtype == torch.float32 and torch.equal(fast, exact)  # the forward is the same fp32 lookup
    scale = exact_grad.abs().max()
    assert scale > 0 and (fast_grad - exact_grad).abs().max() <= 0.01 * scale  # bf16 rounding of grad
    # In float32 the same GEMMs give embedding_bag's gradient up to summation order.
    columns = (patches.reshape(1, -1, 64).long() + torch.arange(64) * 128).reshape(-1, 64)
    weight.grad = None
    (LookupSum.apply(columns, weight, torch.float32) * signs).sum().backward()
    assert torch.allclose(weight.grad, exact_grad, atol=1e-5, rtol=1e-5)  # gradients of size ~10


def test_autocast_inference_embeds_by_lookup_in_fp32(vectors, monkeypatch):
    """bf16 extraction: the lookup keeps the patch embedding in fp32, closer to fp32 than a bf16 one-hot Linear."""
    model, patches = tiny_m3_and_chorale_patches(vectors)
    encoder = model.encoder.eval()
    masks = torch.ones(1, 32)
    with torch.inference_mode():
        exact = encoder(patches, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lookup = encoder(patches, masks).float()
        monkeypatch.setattr(M3PatchEncoder, "embed_by_lookup", lambda self, ids: self.patch_embedding(
            one_hot_patches(ids, self.dims.patch_size, torch.float32)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            one_hot = encoder(patches, masks).float()
    error_lookup = (lookup - exact).abs().max().item()
    error_one_hot = (one_hot - exact).abs().max().item()
    assert error_lookup < error_one_hot, (error_lookup, error_one_hot)
    assert torch.nn.functional.cosine_similarity(lookup, exact, dim=-1).min() > 0.999


def test_token_decoder_gelu_is_gpt2s_gelu_new():
    """The decoder's fused tanh GELU gives the loss of GPT-2's own "gelu_new" up to rounding."""
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    model = M3Model(TINY).eval()
    patches = tiny_patches(10, 3)[None]
    selected = torch.ones(1, 10)
    with torch.inference_mode():
        fused = model(patches, torch.ones(1, 10), selected, patches)
        for block in model.decoder.base.transformer.h:
            assert type(block.mlp.act).__name__ != "NewGELUActivation"
            block.mlp.act = NewGELUActivation()
        python = model(patches, torch.ones(1, 10), selected, patches)
    assert abs(fused.item() - python.item()) < 1e-6
    # The function itself, where tanh GELU and erf GELU part (~1e-3 apart near |x| = 2).
    x = torch.linspace(-6, 6, 1201)
    for block in M3Model(TINY).decoder.base.transformer.h:
        assert (block.mlp.act(x) - NewGELUActivation()(x)).abs().max() < 1e-6


def test_token_decoder_loss_equals_the_references(vectors):
    """The reference's M3Model (sanderwood/clamp3 code/utils.py, transformers' GPT-2) with the same weights gives
    4.701282024383545 on this batch: every third of the chorale's 32 patches replaced by the all-mask patch
    and reconstructed. The decoder's config (heads, widths) and its inputs all show in this number."""
    model, patches = tiny_m3_and_chorale_patches(vectors)
    selected = (torch.arange(32) % 3 == 0).float()[None]
    corrupted = patches.clone()
    corrupted[0, ::3] = 3
    with torch.inference_mode():
        loss = model.eval()(corrupted, torch.ones(1, 32), selected, patches).item()
    assert abs(loss - 4.701282024383545) < 5e-6  # measured: 9.5e-7 (the fused tanh GELU's rounding)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(masked_mean(x, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_clamp2_global_features_padding_invariant(tiny_text_dir):
    from clamp2.text_model import load_text_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_text_dir))
    model = CLaMP2Model(load_text_model(str(tiny_text_dir)), TINY, hidden_size=48).eval()
    enc = tokenizer(["a folk tune from scotland", "bach"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        both = model.text_global(enc["input_ids"], enc["attention_mask"])
        alone = tokenizer(["bach"], return_tensors="pt")
        one = model.text_global(alone["input_ids"], alone["attention_mask"])
        assert torch.allclose(both[1], one[0], atol=1e-5)
        loss = model(enc["input_ids"], enc["attention_mask"], tiny_patches(6, 4).reshape(2, 3, 64), torch.ones(2, 3))
    assert torch.isfinite(loss)

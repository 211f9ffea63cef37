"""The numbers the benches print (FLOPs, MFU, rates, padding) checked against torch's FLOP counter and by hand:
the FLOP formulas, the peak table, and the arithmetic of the printed lines."""

import importlib.util
import re
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO_ROOT

import clamp2.benchmarking as benchmarking
from clamp2.attention import set_attention
from clamp2.models.common import transformer_flops
from clamp2.models.m3 import M3Dims, M3PatchEncoder
from clamp2.patchilizer import NUM_CLASSES


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- the peaks ---------------------------------------------------------------------------------------

def test_peak_table_is_the_dense_datasheet_values():
    # H100/H200 SXM: 989 TFLOP/s dense bf16/fp16 (1979 is with sparsity), 67 fp32 without TF32; A100 312 / 19.5.
    assert benchmarking.PEAK_TFLOPS["H200"] == {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
    assert benchmarking.PEAK_TFLOPS["H100"] == {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
    assert benchmarking.PEAK_TFLOPS["A100"] == {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}


def test_cuda_peak_is_by_name_and_precision_and_given_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert benchmarking.device_peak_tflops(cuda, "fp32") == 67.0
    assert benchmarking.device_peak_tflops(cuda, "bf16") == 989.0
    assert benchmarking.device_peak_tflops(cuda, "bf16", given=500.0) == 500.0
    for name, peak in (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0),
                       ("NVIDIA H100 80GB HBM3", 989.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert benchmarking.device_peak_tflops(cuda, "bf16") == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Unknown GPU")
    assert benchmarking.device_peak_tflops(cuda, "bf16") is None


# -- transformer_flops against torch's counter ---------------------------------------------------------

def test_transformer_flops_matches_the_flop_counter():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                        intermediate_size=256, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=False).eval()
    for batch, length in ((1, 7), (3, 40)):
        with torch.no_grad():
            flops = counted(lambda: model(inputs_embeds=torch.randn(batch, length, 64),
                                          attention_mask=torch.ones(batch, length, dtype=torch.long)))
        assert transformer_flops(batch, length, 64, 2) == pytest.approx(flops, rel=1e-9)


# -- bench_extract: real_flops and padding_share -------------------------------------------------------

DIMS = M3Dims(patch_size=16, patch_length=64, patch_num_layers=2, token_num_layers=1, hidden_size=64)


def test_extract_real_flops_counts_every_window_at_its_real_length():
    bench = load_bench("bench_extract")
    from clamp2.extraction.core import window_starts

    torch.manual_seed(0)
    encoder = set_attention(M3PatchEncoder(DIMS).eval(), "eager")
    for n in (10, 150):  # one short window; three windows (the last one overlaps: starts 0, 64, 86)
        flops = positions = 0
        with torch.no_grad():
            for start in window_starts(n, DIMS.patch_length):
                length = min(DIMS.patch_length, n - start)
                positions += length
                ids = torch.randint(0, NUM_CLASSES, (1, length, DIMS.patch_size))
                flops += counted(lambda: encoder(ids, torch.ones(1, length, dtype=torch.long)))
        windows = len(window_starts(n, DIMS.patch_length))
        per_position = bench.real_flops([n], DIMS, True)
        # The BERT pooler (unused by the features) is the counter's only extra: 2·h² per window.
        assert per_position == pytest.approx(flops - windows * 2 * DIMS.hidden_size ** 2, rel=1e-9)
        # Global: plus the 768-wide projection of each window's mean.
        assert bench.real_flops([n], DIMS, False) == per_position + windows * 2.0 * DIMS.hidden_size * 768
        # bf16/fp16: the lookup's additions (patch_size·h per position) replace the one-hot matmul.
        onehot = positions * 2.0 * NUM_CLASSES * DIMS.patch_size * DIMS.hidden_size
        lookup = positions * 1.0 * DIMS.patch_size * DIMS.hidden_size
        assert bench.real_flops([n], DIMS, True, lookup=True) == pytest.approx(per_position - onehot + lookup)


def test_extract_padding_share_is_padded_positions_of_the_planned_batches():
    bench = load_bench("bench_extract")
    # two windows of 10 and 3 patches in one batch: 13 real of 2 × 10 computed
    assert bench.padding_share([10, 3], DIMS, 2, 0, 256) == pytest.approx(1 - 13 / 20)
    assert bench.padding_share([10, 3], DIMS, 1, 0, 256) == 0.0
    assert bench.padding_share([10, 3], DIMS, 2, 0, 1) == 0.0  # one file per chunk: never batched together


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_extract_line_rates_and_mfu_are_consistent(tmp_path, capsys, monkeypatch, dtype):
    import contextlib

    bench = load_bench("bench_extract")
    if dtype != "fp32":  # the CPU has no bf16 autocast here: the arithmetic of the line is what is checked
        monkeypatch.setattr(bench, "autocast_context", lambda device, name: contextlib.nullcontext())
    asked = []
    peak_of = bench.device_peak_tflops
    monkeypatch.setattr(bench, "device_peak_tflops", lambda device, name, given=None: asked.append(name) or peak_of(device, name, given))
    music = REPO_ROOT / "tests" / "data" / "vectors" / "extract_in"
    assert bench.main(["--music_dir", str(music), "--files", "0", "--device", "cpu", "--threads", "1",
                       "--patch_length", "64", "--layers", "1", "--dtypes", dtype, "--batch_sizes", "4",
                       "--reference_files", "0", "--num_workers", "0", "--peak_tflops", "0.5",
                       "--scratch", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    files = sorted(f for f in music.rglob("*") if f.suffix in (".abc", ".mtf"))
    dims = M3Dims(patch_length=64, patch_num_layers=1)
    encode = bench.MusicEncoder(bench.M3Patchilizer(dims.patch_size, dims.patch_length))
    lengths = [len(encode(f)) for f in files]
    windows = sum(len(bench.window_starts(n, dims.patch_length)) for n in lengths)
    assert asked == [dtype, dtype]  # the MFU is against this precision's peak
    pattern = (r"^(extract_m3 \(per-position\)|extract_clamp2 --normalize \(music\)), batch 4, " + dtype + ": "
               r"([\d.]+) files/s, ([\d.]+) windows/s \(([\d.]+) s\), padding \d+%, ([\d.]+) TFLOP/s real, "
               r"MFU ([\d.]+)% of 0.5")
    found = [re.match(pattern, line) for line in out.splitlines()]
    found = [m for m in found if m]
    assert len(found) == 2, out
    for match in found:
        per_position = match.group(1).startswith("extract_m3")
        files_s, windows_s, tflops, mfu = (float(match.group(i)) for i in (2, 3, 5, 6))
        elapsed = windows / windows_s
        assert files_s == pytest.approx(len(files) / elapsed, rel=0.02)
        flops = bench.real_flops(lengths, dims, per_position, lookup=dtype != "fp32")
        assert tflops == pytest.approx(flops / elapsed / 1e12, rel=0.02, abs=1.5e-3)
        assert mfu == pytest.approx(100 * tflops / 0.5, rel=0.02, abs=0.15)


# -- bench_train: the training FLOPs against the counter, and the line's arithmetic ----------------------

@pytest.fixture(scope="module")
def train_bench(tmp_path_factory):
    bench = load_bench("bench_train")
    folder = tmp_path_factory.mktemp("bench_train")
    pairs = bench.read_pairs(bench.build_data(folder, 6), require_non_english=True)
    data = {"music": [p for item in pairs for p in item.music_paths], "pairs": pairs,
            "tokenizer": bench.load_tokenizer(str(bench.TOKENIZER))}
    return bench, data, folder


def run_recording(bench, data, folder, monkeypatch, variant, device="cpu", precision="fp32", measured=None,
                  warmup=0, steps=2, peak=None):
    """bench_train.run with ``measure`` replaced: the bench's FLOPs per batch, and the counter's (fwd + bwd)."""
    recorded, counted_flops = [], []
    for name in ("m3_train_flops", "clamp2_train_flops", "clamp3_train_flops"):
        original = getattr(bench, name)

        def wrapper(*a, _original=original, **k):
            value = _original(*a, **k)
            recorded.append(value)
            return value
        monkeypatch.setattr(bench, name, wrapper)

    def measure(model, batches, compute_loss, device_, precision_, steps_, warmup_, variant_, profile=False):
        if measured is not None:
            return measured
        set_attention(model, "eager")
        model.train()
        for batch in batches:
            with FlopCounterMode(display=False) as counter:
                compute_loss(model, batch).backward()
            counted_flops.append(counter.get_total_flops())
            model.zero_grad(set_to_none=True)
        return 1.0, 1.0, 0.0, float("nan")

    monkeypatch.setattr(bench, "measure", measure)
    args = bench.parse_args(["--steps", str(steps), "--warmup", str(warmup), "--scores", "6", "--data", str(folder)]
                            + (["--peak_tflops", str(peak)] if peak else []))
    bench.run(variant, "small", bench.CONFIGS["small"], torch.device(device), precision, data, args)
    # clamp3s' count is clamp2's: keep one value per batch (the outermost call's, recorded last).
    per_batch = len(recorded) // (warmup + steps)
    return recorded[per_batch - 1::per_batch], counted_flops


@pytest.mark.parametrize("variant", ["m3", "m3-reference", "clamp2", "clamp2-reference", "clamp3s", "clamp3a",
                                     "clamp3a-reference"])
def test_train_flops_match_the_flop_counter_of_forward_and_backward(train_bench, monkeypatch, variant):
    bench, data, folder = train_bench
    ours, reference = run_recording(bench, data, folder, monkeypatch, variant)
    assert len(ours) == len(reference) == 2
    for mine, theirs in zip(ours, reference):
        # the poolers, the contrastive loss and the lookup's additions are the < 0.5 % left
        assert mine == pytest.approx(theirs, rel=5e-3), (variant, mine, theirs)


@pytest.mark.parametrize("autocast", [False, True])
def test_patch_embedding_training_flops_follow_what_each_precision_computes(autocast):
    # Under autocast (bf16/fp16 training on CUDA; CPU bf16 takes the same code) the lookup's weight gradient
    # is LookupSum's one-hot GEMM, ~2% of an M3 step at default sizes; in fp32 it is embedding_bag's additions.
    bench = load_bench("bench_train")
    dims = M3Dims(64, 64, 2, 1, 128)
    encoder = set_attention(M3PatchEncoder(dims).train(), "eager")
    patches = torch.randint(0, NUM_CLASSES, (2, 64, dims.patch_size))
    masks = torch.ones(2, 64, dtype=torch.long)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = encoder(patches, masks)
        out.float().sum().backward()
    ours = 3 * transformer_flops(2, 64, dims.hidden_size, dims.patch_num_layers) + \
        bench.patch_embedding_train_flops(2, 64, dims, lookup=True, autocast=autocast)
    assert ours == pytest.approx(counted(step), rel=1e-2)


def test_train_flops_of_a_bf16_run_count_the_lookups_gradient_gemm(train_bench, monkeypatch, capsys):
    # bench_train.run passes the precision's autocast on to the FLOP count: a bf16 step computes the one-hot
    # GEMM for the lookup's weight gradient, an fp32 step embedding_bag's additions.
    bench, data, folder = train_bench
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    measured = (1.0, 1.0, 0.25, 1.0)
    fp32, _ = run_recording(bench, data, folder, monkeypatch, "m3", device="cuda", precision="fp32", measured=measured)
    bf16, _ = run_recording(bench, data, folder, monkeypatch, "m3", device="cuda", precision="bf16", measured=measured)
    dims = bench.CONFIGS["small"].dims
    # per embedded patch position: the GEMM's 2·128·P·h multiply-adds in place of the lookup's P·h additions
    per_position = dims.patch_size * dims.hidden_size * (2 * NUM_CLASSES - 1)
    assert len(fp32) == len(bf16) == 2
    for plain, autocast in zip(fp32, bf16):
        positions = (autocast - plain) / per_position
        assert positions == round(positions) and 0 < positions <= bench.CONFIGS["small"].m3_batch_cuda * dims.patch_length
    capsys.readouterr()


def test_train_line_rates_and_mfu_on_cuda(train_bench, monkeypatch, capsys):
    bench, data, folder = train_bench
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seconds, cpu_seconds, steady = 2e-5, 5e-6, 4e-5  # hundreds of TFLOP/s: a 0.1 % change shows
    flops, _ = run_recording(bench, data, folder, monkeypatch, "m3", device="cuda", precision="fp32",
                             measured=(seconds, cpu_seconds, 0.25, steady), warmup=1, steps=1)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    batch = bench.CONFIGS["small"].m3_batch_cuda
    assert flops[0] != flops[1]  # the warm-up batch differs: only the timed batches count
    assert f"{batch / seconds:9.2f} samples/s" in line, line
    achieved = flops[1] / seconds
    assert achieved / 67e12 > 0.01
    assert f"{achieved / 1e12:7.1f} TFLOP/s  MFU {achieved / 67e12:6.1%}" in line, line  # fp32 peak: 67
    assert f"back to back {batch / steady:9.2f} samples/s (MFU {flops[1] / steady / 67e12:6.1%})" in line, line


def test_measure_times_only_the_steps_after_warmup_and_back_to_back_per_step(monkeypatch):
    bench = load_bench("bench_train")
    clock = types.SimpleNamespace(now=0.0)
    durations = iter([10.0, 10.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0])  # 2 warm-up, 3 timed, 3 back to back

    def step(*args, **kwargs):
        clock.now += next(durations)
        return torch.tensor(0.5)
    monkeypatch.setattr(bench, "train_step", step)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock.now)
    model = torch.nn.Linear(2, 2)
    batches = [{"x": torch.zeros(1)}] * 5
    precision = bench.Precision.choose(torch.device("cpu"), "fp32")
    seconds, _, loss, steady = bench.measure(model, batches, None, torch.device("cpu"), precision, 3, 2, "m3")
    assert seconds == 2.0 and steady == 1.0 and loss == 0.5


# -- bench_mert: the printed FLOPs and MFU -------------------------------------------------------------

def test_mert_line_flops_per_window_and_mfu(tmp_path, capsys):
    bench = load_bench("bench_mert")
    from clamp2.extraction.audio import load_windows
    from clamp2.models.mert import build_mert, forward_flops
    import json

    assert bench.main(["--device", "cpu", "--size", "tiny", "--files", "1", "--seconds", "7", "--batch_size", "2",
                       "--dtypes", "fp32", "--skip_reference", "--threads", "1", "--num_workers", "0",
                       "--audio", "synthetic", "--data", str(tmp_path), "--peak_tflops", "0.01"]) == 0
    out = capsys.readouterr().out
    paths = sorted(tmp_path.rglob("*.wav"))
    bounds = [load_windows(p)[1] for p in paths]
    config = build_mert(json.loads(bench.TINY.read_text())).config
    flops = sum(forward_flops(config, e - s) for b in bounds for s, e in b)
    windows = sum(len(b) for b in bounds)
    assert len({e - s for b in bounds for s, e in b}) > 1  # a short last window: real lengths matter
    assert f"{flops / windows / 1e9:.1f} GFLOP per window" in out, out
    match = re.search(r"([\d.]+) TFLOP/s  MFU\s+([\d.]+)% of 0.01 TFLOP/s", out)
    assert match, out
    # TFLOP/s is printed to 0.001: the MFU agrees within that rounding (the mutants are off by 100x or more)
    assert float(match.group(2)) == pytest.approx(100 * float(match.group(1)) / 0.01, abs=100 * 0.0005 / 0.01 + 0.05)


def test_clamp2_train_flops_counts_both_projections_per_sample(train_bench):
    bench, _, _ = train_bench
    config = bench.CONFIGS["small"]
    b, t, n = 8, 20, 30
    batch = {"text_masks": torch.ones(b, t), "music_masks": torch.ones(b, n)}
    encoders = (bench.encoder_flops(b, t, config.text_hidden, config.text_layers)
                + bench.encoder_flops(b, n, config.dims.hidden_size, config.dims.patch_num_layers))
    projections = 2.0 * b * (config.text_hidden + config.dims.hidden_size) * config.clamp2_hidden
    embedding = bench.patch_embedding_flops(b, n, config.dims, True)
    assert bench.clamp2_train_flops(batch, config) == 3 * (encoders + projections) + 2 * embedding

"""MERT extraction paths a code-driven mutation audit found untested: process roles, a rerun's leftovers,
the script's flags, weights-file choice, integer feature arrays, the API's default."""

import shutil
from pathlib import Path

import numpy as np
import torch
import pytest

from clamp2 import files
from clamp2.extraction import mert as extraction
from clamp2.extraction.mert import MertFeatureExtractor, extract_folder
from clamp2.models import mert

DATA = Path(__file__).parent / "data"
VECTORS = DATA / "vectors_clamp3"
AUDIO_IN = VECTORS / "inputs" / "audio"
TINY = VECTORS / "tiny_mert"
ONE = "banish_misfortune_22k05_mono_s16.wav"


@pytest.fixture(scope="module")
def tiny_model():
    return mert.load_mert(TINY)


def test_only_the_first_process_reports_the_plans_failures(tiny_model, tmp_path):
    # mert.py extract_folder: `failures = list(plan.failures) if process_index == 0 else []`. Every process
    # plans the same listing; were each to report the collisions, they would be listed (and counted) twice.
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        shutil.copy(AUDIO_IN / ONE, folder / name)
    (folder / "b.WAV").write_bytes((folder / "b.wav").read_bytes())  # b.wav and b.WAV would both write b.npy
    out = tmp_path / "out"
    extractor = MertFeatureExtractor(tiny_model, "cpu")
    second = extract_folder(extractor, folder, out, process_index=1, num_processes=2, progress=False)
    assert second.failures == [] and second.log is None
    assert not (out / "failed_extract_mert_1.log").exists()
    first = extract_folder(extractor, folder, out, process_index=0, num_processes=2, progress=False)
    assert sorted(p.name for p, _ in first.failures) == ["b.WAV", "b.wav"]
    assert (out / "failed_extract_mert_0.log").is_file()


def test_a_run_clears_what_an_earlier_run_left(tiny_model, tmp_path):
    # mert.py extract_folder: clear_earlier_run. A stale failure log of another process count would list
    # files that now succeed; a killed run's temporary file of an output being written is removed.
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(AUDIO_IN / ONE, folder / "a.wav")
    out = tmp_path / "out"
    out.mkdir()
    (out / "failed_extract_mert_1.log").write_text("a.wav\tcannot decode audio\n")
    (out / "failed_extract_mert.log").write_text("a.wav\tcannot decode audio\n")
    partial = out / files._temporary_name("a.npy")
    partial.write_bytes(b"half")
    run = extract_folder(MertFeatureExtractor(tiny_model, "cpu"), folder, out, progress=False)
    assert run.written == 1 and run.failures == []
    assert sorted(p.name for p in out.iterdir()) == ["a.npy"]


def test_the_script_passes_resample_on_device_to_the_extractor(tmp_path, monkeypatch, capsys):
    # process_data/extract_mert.py: `resample_on_device=args.resample_on_device`. Dropped, the flag does
    # nothing (features then equal the host path's to ~1e-7, so feature checks alone cannot see it).
    import importlib.util

    script_path = Path(__file__).resolve().parents[1] / "process_data" / "extract_mert.py"
    spec = importlib.util.spec_from_file_location("extract_mert_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []

    class Spy(MertFeatureExtractor):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("resample_on_device"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(extraction, "MertFeatureExtractor", Spy)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(AUDIO_IN / ONE, folder / "a.wav")
    base = [str(folder), str(tmp_path / "o1"), "--model", str(TINY), "--num_workers", "0", "--no_progress"]
    assert script.main(base) == 0
    assert script.main([str(folder), str(tmp_path / "o2")] + base[2:] + ["--resample_on_device"]) == 0
    assert seen == [False, True]
    host, device = np.load(tmp_path / "o1" / "a.npy"), np.load(tmp_path / "o2" / "a.npy")
    assert host.shape == device.shape and np.abs(host - device).max() < 1e-5


def test_safetensors_is_preferred_when_a_folder_has_both_weight_files(tmp_path):
    # models/mert.py WEIGHT_FILES order: transformers' from_pretrained (the reference's loader) takes
    # model.safetensors over pytorch_model.bin when a folder holds both.
    for name in ("pytorch_model.bin", "model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert mert.weights_file(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert mert.weights_file(tmp_path) == tmp_path / "pytorch_model.bin"


def test_a_folder_without_config_json_names_the_download(tmp_path):
    # models/mert.py resolve_mert_folder: without its check, an existing folder lacking config.json fails later
    # with a bare FileNotFoundError and no download hint.
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(mert.MertNotFound, match="no config.json in MERT folder .*hf download m-a-p/MERT-v1-95M"):
        mert.load_mert(tmp_path)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16])
def test_integer_and_half_mert_arrays_are_read_as_float32(dtype):
    # core.py AudioEncoder.encode_array: `.astype(np.float32)`. Without it np.concatenate with the float32
    # zero rows gives float64 for int32/int64 arrays (the reference's torch.cat gives float32).
    from clamp2.extraction.core import AudioEncoder

    rows = AudioEncoder(64).encode_array(np.arange(2 * 64).reshape(1, 2, 64).astype(dtype))
    assert rows.dtype == torch.float32 and rows.shape == (4, 64)
    assert torch.equal(rows[1:3], torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64))


def test_the_api_z_scores_on_the_host_by_default(tiny_model):
    # The host path is the reference's numpy z-score bit for bit; the device path's torch sums differ by
    # ~1e-7 relative, so it is opt-in (--resample_on_device).
    assert MertFeatureExtractor(tiny_model, "cpu").resample_on_device is False


@pytest.mark.skipif(not Path("/proc/thread-self/children").exists(), reason="needs /proc/PID/task/TID/children")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_decoding_workers_do_not_outlive_a_killed_extraction(tmp_path, signal_name):
    # A killed MERT extraction (SIGKILL, or SIGTERM's default action) left its DataLoader workers running forever,
    # reparented: decoded tracks filled the pipe, and a worker's exit waits for its queue to flush.
    import sys

    import soundfile

    from conftest import workers_outliving_a_kill

    folder = tmp_path / "in"
    folder.mkdir()
    noise = (0.1 * np.random.default_rng(0).standard_normal(44100 * 20)).astype(np.float32)
    for index in range(24):
        soundfile.write(folder / f"{index}.wav", noise, 44100)
    code = ("import sys\n"
            "from clamp2.extraction.mert import MertFeatureExtractor, extract_folder\n"
            "from pathlib import Path\n"
            "from clamp2.models import mert\n"
            "extractor = MertFeatureExtractor(mert.load_mert(sys.argv[1]), 'cpu')\n"
            "extract_folder(extractor, Path(sys.argv[2]), Path(sys.argv[3]), num_workers=2, progress=False)\n")

    def children_of(pid):
        try:
            return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            return []

    def children(run):
        # The loader's workers: under "spawn" the resource tracker is a child too, under "forkserver" the workers
        # are the fork server's children.
        found = []
        for pid in children_of(run.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing.forkserver" in command:
                found += children_of(pid)  # forked by the server: they have its command line
            elif b"resource_tracker" not in command:
                found.append(pid)
        return sorted(found)

    # settle: the workers' decoded tracks fill the pipe (while tracks remain to decode)
    alive = workers_outliving_a_kill([sys.executable, "-c", code, str(TINY), str(folder), str(tmp_path / "out")],
                                     signal_name, children, settle=1)
    assert not alive, f"decoding workers {alive} outlived the killed extraction"


@pytest.mark.skipif(not Path("/proc/thread-self/children").exists(), reason="needs /proc/PID/task/TID/children")
def test_torchrun_processes_do_not_outlive_a_killed_launcher(tmp_path):
    # SIGKILL of torchrun (the agent) reparented its extraction processes, each in its own session: they went on
    # to the end of the folder (hours on a real one, holding the GPUs) while a re-run was started beside them.
    import os
    import sys

    import soundfile

    from conftest import free_port, workers_outliving_a_kill

    folder = tmp_path / "in"
    folder.mkdir()
    noise = (0.1 * np.random.default_rng(0).standard_normal(44100 * 20)).astype(np.float32)
    soundfile.write(folder / "0.wav", noise, 44100)
    for index in range(1, 600):  # well over the 15 s the helper waits: hard links, no disk
        os.link(folder / "0.wav", folder / f"{index}.wav")
    script = Path(__file__).resolve().parents[1] / "process_data" / "extract_mert.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), str(folder), str(tmp_path / "out"), "--model", str(TINY), "--num_workers", "0",
               "--no_progress"]

    def extracting(run):  # the launcher's children, once both have written a feature
        if len(list((tmp_path / "out").glob("*.npy"))) < 2:
            return []
        return [int(pid) for task in Path(f"/proc/{run.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]

    alive = workers_outliving_a_kill(command, "SIGKILL", extracting, timeout=120)
    assert not alive, f"extraction processes {alive} outlived the killed torchrun"

"""A full output disk (ENOSPC/EDQUOT): one clear line, the batch stops, nothing truncated, a re-run resumes."""

import errno
import signal

import numpy as np
import pytest
import torch

from clamp2.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from clamp2.convert import batch_runner
from conftest import DiskFullAfter


def upper(path):
    return path.read_text().upper()


def test_a_batch_stops_at_the_first_full_disk_with_one_line_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(6):
        (inputs / f"t{i}.txt").write_text(f"tune {i}")
    full = DiskFullAfter(monkeypatch, batch_runner, "atomic_write_text", 2)  # full from the third output on
    code = batch_runner.convert_folder(inputs, out, convert=upper, extensions=[".txt"], output_suffix=".up",
                                       tool="up", workers=1, progress=False)
    err = capsys.readouterr().err
    assert code == 1
    assert len(full.calls) == 3  # stopped at the first ENOSPC: no attempt per remaining file
    assert "failed:" not in err and "Traceback" not in err
    assert err.count("No space left on device") == 1 and f"cannot write {out / 't2.up'}" in err
    assert sorted(p.name for p in out.glob("*.up")) == ["t0.up", "t1.up"]
    assert not list(out.glob(".*.partial"))

    full.free()
    assert batch_runner.convert_folder(inputs, out, convert=upper, extensions=[".txt"], output_suffix=".up",
                                       tool="up", workers=1, progress=False) == 0
    assert capsys.readouterr().out.strip().endswith("converted 4, skipped 2, failed 0")
    assert [(out / f"t{i}.up").read_text() for i in range(6)] == [f"TUNE {i}" for i in range(6)]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_it_and_keeps_the_previous_one(tmp_path):
    resource = pytest.importorskip("resource")
    path = tmp_path / "latest_w.pth"
    save_checkpoint(path, torch.nn.Linear(4, 4), epoch=1)
    before = path.read_bytes()
    # A real short write from the kernel: files may not grow past 64 KiB (EFBIG, as ENOSPC for torch's writer).
    # Through torch's C++ file writer it was a RuntimeError "unexpected pos ..." naming neither the file nor why.
    # tmpfs with -o size gives ENOSPC the same way; RLIMIT_FSIZE needs no mount.
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(CheckpointError) as caught:
            save_checkpoint(path, torch.nn.Linear(256, 256), epoch=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(caught.value)
    assert str(path) in message and "File too large" in message and "\n" not in message
    assert path.read_bytes() == before and read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_disk_full_error_finds_enospc_behind_a_runtime_error():
    from clamp2.files import disk_full_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")
    except RuntimeError as error:
        assert disk_full_error(error).errno == errno.ENOSPC
    assert disk_full_error(OSError(errno.EACCES, "Permission denied")) is None


def test_extraction_stops_at_the_first_full_disk_with_one_line_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    # It went on encoding every file, printed one "No space left" failure per file, then ended in a traceback
    # writing its failure log on the full disk (no summary line).
    from clamp2.extraction import core
    from conftest import VECTORS, load_script

    for name, value in {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1",
                        "M3_HIDDEN_SIZE": "64"}.items():
        monkeypatch.setenv(name, value)
    extract_m3 = load_script("code/extract_m3.py")
    out = tmp_path / "out"
    args = [str(VECTORS / "extract_in"), str(out), "--weights", str(VECTORS / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress", "--batch_size", "1"]
    full = DiskFullAfter(monkeypatch, core, "save_npy", 2)  # full from the third feature on
    monkeypatch.setattr(core, "SAVE_GROUP", 1)
    assert extract_m3.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "failed:" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write ") and "stopped: free space" in err
    assert len(full.calls) <= 3 + 4  # the saves already queued to the writer threads, no more
    assert len(list(out.rglob("*.npy"))) == 2 and not list(out.rglob("*.partial"))
    full.free()
    assert extract_m3.main(args) == 0
    assert "extracted 2, skipped 2 existing, failed 0" in capsys.readouterr().err
    for expected in (VECTORS / "expected" / "feat_m3").rglob("*.npy"):  # the reference's features, all four
        np.testing.assert_allclose(np.load(out / expected.relative_to(VECTORS / "expected" / "feat_m3")),
                                   np.load(expected), atol=1e-5)


def test_mert_extraction_stops_at_the_first_full_disk_with_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util
    import shutil

    from clamp2.extraction import mert
    from conftest import REPO_ROOT

    audio = REPO_ROOT / "tests" / "data" / "vectors_clamp3" / "inputs" / "audio"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("banish_misfortune_22k05_mono_s16.wav", "bwv26.6_16k_stereo_s16.flac",
                 "bwv26.6_44k1_stereo_s16.wav"):
        shutil.copy(audio / name, folder / name)
    spec = importlib.util.spec_from_file_location("extract_mert_script", REPO_ROOT / "process_data" / "extract_mert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    full = DiskFullAfter(monkeypatch, mert, "save_npy", 1)  # full from the second feature on
    argv = [str(folder), str(tmp_path / "out"), "--model", str(REPO_ROOT / "tests" / "data" / "vectors_clamp3" /
                                                                "tiny_mert"), "--num_workers", "0", "--no_progress"]
    assert script.main(argv) == 1
    err = capsys.readouterr().err
    assert len(full.calls) == 2 and err.count("No space left on device") == 1 and "failed:" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write ") and "stopped: free space" in err
    full.free()
    assert script.main(argv) == 0
    assert "extracted 2, skipped 1 existing, failed 0" in capsys.readouterr().err

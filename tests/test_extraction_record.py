"""The output folder's record of what its features were extracted with (clamp2/extraction/record.py).

A re-run into a folder resumes by skipping existing features: with other weights or flags it used to skip them
all and report success, leaving features of two kinds under one name.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from clamp2.extraction import core
from clamp2.extraction.record import RECORD_NAME, plan_record
from conftest import REPO_ROOT, TINY_ENV, VECTORS, DiskFullAfter, free_port

EXPECTED = VECTORS / "expected"


def clamp2_args(out, *extra, weights=VECTORS / "tiny_clamp2.pth", inputs=VECTORS / "extract_in"):
    return [str(inputs), str(out), "--weights", str(weights), "--text_model", str(VECTORS / "tiny_text_model"),
            "--num_workers", "0", "--no_progress", *extra]


def features(folder):
    return {path.relative_to(folder): np.load(path) for path in sorted(folder.rglob("*.npy"))}


def assert_reference(folder, expected):
    want = features(EXPECTED / expected)
    got = features(folder)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=str(name))


def recorded(folder):
    return json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))["settings"]


def test_a_rerun_with_another_flag_is_refused_and_overwrite_replaces_every_feature(tiny_env, tmp_path, extract_clamp2,
                                                                                capsys):
    out = tmp_path / "out"
    assert extract_clamp2.main(clamp2_args(out, "--normalize")) == 0
    assert recorded(out)["features"] == "global" and recorded(out)["dtype"] == "fp32"
    before = {name: path.stat().st_mtime_ns for name, path in ((p.name, p) for p in out.rglob("*.npy"))}
    capsys.readouterr()

    assert extract_clamp2.main(clamp2_args(out)) == 2  # per-position into the folder of global features
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "features: global then, per-position now" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == before  # nothing touched
    assert_reference(out, "feat_clamp2_global")

    assert extract_clamp2.main(clamp2_args(out, "--overwrite")) == 0
    assert "extracted 7, skipped 0 existing" in capsys.readouterr().err
    assert_reference(out, "feat_clamp2_raw")
    assert recorded(out)["features"] == "per-position"
    assert extract_clamp2.main(clamp2_args(out)) == 0  # the same settings: resumes
    assert "extracted 0, skipped 7 existing, failed 0" in capsys.readouterr().err


def test_other_weights_are_refused(tiny_env, tmp_path, extract_clamp2, capsys):
    checkpoint = torch.load(VECTORS / "tiny_clamp2.pth", weights_only=True)
    state = checkpoint["model"]
    name = next(key for key, value in state.items() if value.is_floating_point())
    state[name] = state[name] + 0.01
    other = tmp_path / "other.pth"
    torch.save(checkpoint, other)
    out = tmp_path / "out"
    assert extract_clamp2.main(clamp2_args(out, "--normalize")) == 0
    capsys.readouterr()
    assert extract_clamp2.main(clamp2_args(out, "--normalize", weights=other)) == 2
    err = capsys.readouterr().err
    assert "weights (sha256): " in err and "features:" not in err
    assert_reference(out, "feat_clamp2_global")
    # The same weights under another name are the same weights.
    shutil.copy(VECTORS / "tiny_clamp2.pth", tmp_path / "copy.pth")
    assert extract_clamp2.main(clamp2_args(out, "--normalize", weights=tmp_path / "copy.pth")) == 0
    assert "skipped 7 existing" in capsys.readouterr().err


def test_features_without_a_record_are_kept_and_the_run_is_recorded(tiny_env, tmp_path, extract_m3, capsys):
    out = tmp_path / "out"
    shutil.copytree(EXPECTED / "feat_m3", out)  # written by the reference, or by an older version of this package
    args = [str(VECTORS / "extract_in"), str(out), "--weights", str(VECTORS / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress"]
    assert extract_m3.main(args) == 0
    err = capsys.readouterr().err
    assert "have no record of the settings" in err and "skipped 4 existing" in err
    assert recorded(out)["tool"] == "extract_m3"
    assert extract_m3.main(args) == 0
    assert "no record" not in capsys.readouterr().err


def test_an_overwrite_of_unrecorded_features_stopped_half_way_is_refused_not_resumed(tiny_env, tmp_path, extract_clamp2,
                                                                                      monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(EXPECTED / "feat_clamp2_global", out)  # global features from before the folder had a record
    full = DiskFullAfter(monkeypatch, core, "save_npy", 2)
    monkeypatch.setattr(core, "SAVE_GROUP", 1)
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", "--batch_size", "1")) == 1  # per-position, stopped
    full.free()
    capsys.readouterr()
    assert extract_clamp2.main(clamp2_args(out)) == 2  # two per-position features among five global ones
    assert "features: unknown (extracted before the folder had a record) then, per-position now" in \
        capsys.readouterr().err
    assert extract_clamp2.main(clamp2_args(out, "--overwrite")) == 0
    assert_reference(out, "feat_clamp2_raw")
    assert recorded(out)["features"] == "per-position"


def test_features_without_a_record_of_the_other_kind_are_refused(tiny_env, tmp_path, extract_clamp2, capsys):
    # an older version wrote global features (--normalize) and left no record: a per-position re-run skipped them all
    # and recorded the folder as per-position
    out = tmp_path / "out"
    shutil.copytree(EXPECTED / "feat_clamp2_global", out)
    assert extract_clamp2.main(clamp2_args(out)) == 2
    err = capsys.readouterr().err
    assert "no record of the settings" in err and "global [1, D]" in err and "--overwrite" in err
    assert not (out / RECORD_NAME).exists()
    assert_reference(out, "feat_clamp2_global")
    assert extract_clamp2.main(clamp2_args(out, "--normalize")) == 0  # the same kind: kept, and recorded
    assert recorded(out)["features"] == "global"


def test_plan_record_compares_the_kind_of_an_unrecorded_feature(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 4), np.float32))
    per_position = plan_record(tmp_path, {"tool": "t", "features": "per-position"}, False, lambda: tmp_path / "a.npy")
    assert "a.npy there is global [1, D] [1, 4] while this run extracts per-position" in per_position.problem
    same = plan_record(tmp_path, {"tool": "t", "features": "global"}, False, lambda: tmp_path / "a.npy")
    assert same.note and same.write_first and not same.problem
    overwrite = plan_record(tmp_path, {"tool": "t", "features": "per-position"}, True, lambda: tmp_path / "a.npy")
    assert overwrite.replacing and overwrite.unknown_first and not overwrite.problem


def test_an_unreadable_record_is_named_and_overwrite_replaces_it(tiny_env, tmp_path, extract_m3, capsys):
    out = tmp_path / "out"
    args = [str(VECTORS / "extract_in"), str(out), "--weights", str(VECTORS / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress"]
    assert extract_m3.main(args) == 0
    (out / RECORD_NAME).write_text('{"settings": ', encoding="utf-8")  # cut short
    capsys.readouterr()
    assert extract_m3.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot read {out / RECORD_NAME}: not a settings record" in err and "Traceback" not in err
    assert extract_m3.main(args + ["--overwrite"]) == 0
    assert recorded(out)["tool"] == "extract_m3"


def test_an_overwrite_stopped_half_way_leaves_the_old_record(tiny_env, tmp_path, extract_clamp2, monkeypatch, capsys):
    out = tmp_path / "out"
    assert extract_clamp2.main(clamp2_args(out, "--normalize", "--batch_size", "1")) == 0
    full = DiskFullAfter(monkeypatch, core, "save_npy", 2)
    monkeypatch.setattr(core, "SAVE_GROUP", 1)
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", "--batch_size", "1")) == 1
    assert recorded(out)["features"] == "global"  # two per-position features among five global ones
    full.free()
    capsys.readouterr()
    assert extract_clamp2.main(clamp2_args(out)) == 2  # so a plain re-run cannot resume into the mixture
    assert "features: global then, per-position now" in capsys.readouterr().err
    assert extract_clamp2.main(clamp2_args(out, "--overwrite")) == 0
    assert_reference(out, "feat_clamp2_raw")


def test_an_input_that_fails_under_the_new_settings_loses_its_old_feature(tiny_env, tmp_path, extract_clamp2, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(VECTORS / "extract_in", inputs)
    assert extract_clamp2.main(clamp2_args(out, "--normalize", inputs=inputs)) == 0
    text = next(inputs.rglob("*.txt"))
    feature = out / text.relative_to(inputs).with_suffix(".npy")
    assert feature.exists()
    text.write_bytes(b"\xff\xfe not UTF-8 \xff")
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", inputs=inputs)) == 1
    assert not feature.exists()  # not a global feature left among per-position ones
    assert recorded(out)["features"] == "per-position"
    # With the same settings, --overwrite keeps a failing input's feature (it is of the same kind).
    text.write_text("a tune", encoding="utf-8")
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", inputs=inputs)) == 0
    text.write_bytes(b"\xff\xfe not UTF-8 \xff")
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", inputs=inputs)) == 1
    assert feature.exists()


def test_a_record_is_kept_under_the_run_and_ignored_as_an_input(tiny_env, tmp_path, extract_clamp2, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(VECTORS / "extract_in" / "abc", inputs)
    assert extract_clamp2.main(clamp2_args(inputs, "--normalize", inputs=inputs)) == 0  # features beside the inputs
    assert (inputs / RECORD_NAME).exists()
    assert extract_clamp2.main(clamp2_args(inputs, "--normalize", inputs=inputs)) == 0
    assert "extracted 0, skipped 2 existing, failed 0" in capsys.readouterr().err


def test_plan_record_decides_from_the_record_alone(tmp_path):
    settings = {"tool": "t", "features": "global"}
    plan = plan_record(tmp_path, settings, overwrite=False, outputs_exist=lambda: False)
    assert plan.write_first and not plan.note and not plan.problem
    (tmp_path / RECORD_NAME).write_text(json.dumps({"settings": dict(settings, features="per-position")}))
    assert "features: per-position then, global now" in plan_record(tmp_path, settings, False, lambda: True).problem
    replacing = plan_record(tmp_path, settings, True, lambda: True)
    assert replacing.replacing and not replacing.problem and not replacing.write_first
    (tmp_path / RECORD_NAME).write_text(json.dumps({"settings": settings}))
    same = plan_record(tmp_path, settings, False, lambda: True)
    assert not (same.problem or same.note or same.write_first or same.replacing)


def test_mert_all_layers_into_a_folder_of_layer_means_is_refused(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    audio = REPO_ROOT / "tests" / "data" / "vectors_clamp3" / "inputs" / "audio"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(audio / "banish_misfortune_22k05_mono_s16.wav", folder / "tune.wav")
    spec = importlib.util.spec_from_file_location("extract_mert_script", REPO_ROOT / "process_data" / "extract_mert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [str(folder), str(tmp_path / "out"), "--model", str(REPO_ROOT / "tests" / "data" / "vectors_clamp3" /
                                                                "tiny_mert"), "--num_workers", "0", "--no_progress"]
    assert script.main(argv) == 0
    layer_mean = np.load(tmp_path / "out" / "tune.npy")
    capsys.readouterr()
    assert script.main(argv + ["--all_layers"]) == 2
    assert "features: layer mean then, every layer now" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "tune.npy"), layer_mean)
    assert script.main(argv + ["--all_layers", "--overwrite"]) == 0
    assert np.load(tmp_path / "out" / "tune.npy").shape[0] > 1
    assert recorded(tmp_path / "out")["features"] == "every layer"


def test_torchrun_two_processes_refuse_together_and_record_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "user_cache"), **TINY_ENV)
    out = tmp_path / "out"

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO_ROOT / "code/extract_clamp2.py"), *clamp2_args(out, *extra)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)

    first = torchrun("--normalize")
    assert first.returncode == 0, first.stderr[-3000:]
    assert recorded(out)["features"] == "global"
    refused = torchrun()
    assert refused.returncode != 0
    assert refused.stderr.count("holds features extracted with other settings") == 1, refused.stderr[-3000:]
    assert_reference(out, "feat_clamp2_global")
    replaced = torchrun("--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert recorded(out)["features"] == "per-position"
    assert_reference(out, "feat_clamp2_raw")


def test_a_folder_that_cannot_be_listed_takes_no_feature_along_under_overwrite(tiny_env, tmp_path, extract_clamp2,
                                                                             monkeypatch, capsys):
    # An unlistable folder sub/ is one of the plan's failures, but sub.npy (of sub.abc) is no output of it.
    from conftest import unlistable

    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(VECTORS / "extract_in" / "abc", inputs)
    shutil.copy(inputs / "bwv10.7.abc", inputs / "sub.abc")
    (inputs / "sub").mkdir()
    shutil.copy(inputs / "bwv10.7.abc", inputs / "sub" / "x.abc")
    assert extract_clamp2.main(clamp2_args(out, "--normalize", inputs=inputs)) == 0
    unlistable(monkeypatch, "sub")
    assert extract_clamp2.main(clamp2_args(out, "--overwrite", inputs=inputs)) == 1  # sub/ reported
    assert np.load(out / "sub.npy").ndim == 3  # extracted again per-position, and kept

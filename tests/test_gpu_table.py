"""benchmarks/gpu_table.sh, the one script a lent GPU runs: every step's arguments, its kit, its exit status.

Device time is scarce (minutes per session), so the script is proven here first: ``SMOKE=1`` runs the same
steps on the CPU at tiny sizes, and a step whose bench rejects its arguments fails this test.
"""

import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_table.sh"


def run_table(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("M3_", "CLAMP2_"))}
    environ.update(SMOKE="1", PYTHON=sys.executable, CACHE=str(tmp_path / "cache"), KIT=str(tmp_path / "no_kit"),
                   TMPDIR=str(tmp_path))
    environ.update(env)
    log = tmp_path / "table.log"
    result = subprocess.run(["bash", str(SCRIPT), str(log)], env=environ, capture_output=True, text=True, timeout=600)
    return result, log.read_text(encoding="utf-8")


def test_smoke_table_runs_every_bench_with_its_arguments(tmp_path):
    # tests/test_attention.py runs in this suite anyway; every other step runs as on the GPU, at tiny sizes.
    result, log = run_table(tmp_path, STEPS="train extract tunes clamp3 mert profile compile")
    assert result.returncode == 0, log + result.stderr
    assert "!! failed" not in log
    lines = log.splitlines()
    # m3 again under the profiler; m3 and clamp2 again compiled (the eager backend: the wiring, in seconds)
    for variant, runs in (("m3", 3), ("clamp2", 2), ("clamp3s", 1), ("clamp3a", 1)):
        assert sum(line.startswith(variant + " ") and "samples/s" in line for line in lines) == runs, log
    # extract (corpus cache) and tunes (the repository's vectors): per-position and global, batch and tokens.
    assert sum(line.startswith("extract_m3 (per-position), tokens 2048") for line in lines) == 2, log
    assert sum("host only" in line for line in lines) == 2, log
    assert any(line.startswith("global       audio") for line in lines), log
    assert any("s of audio/s" in line for line in lines), log
    assert any(line.startswith("host alone (decode only)") for line in lines), log  # MERT's host ceiling
    assert any(line.startswith("batched (batch 4, resampled on device)") for line in lines), log
    assert any(line.startswith("profile of m3") for line in lines), log
    assert sum(" compiled (eager) " in line for line in lines) == 2, log
    # The table's lines are repeated at the end, on stdout.
    assert "samples/s" in result.stdout.split("== table lines", 1)[1]


def test_a_failing_step_is_reported_the_rest_run_and_the_exit_status_says_so(tmp_path):
    result, log = run_table(tmp_path, STEPS="extract mert", STEP_TIMEOUT="0.01")
    assert result.returncode == 1
    assert log.count("!! failed or timed out") == 2, log


def write_wheel(path, module, text):
    """A minimal pure-Python wheel holding one module (what pip needs: METADATA, WHEEL, RECORD)."""
    name, version = path.name.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    files = {f"{module}.py": text,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in files.items():
            data = content.encode()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        archive.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")


def test_kit_wheels_come_first_on_the_path_and_its_caches_are_unpacked(tmp_path):
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    write_wheel(kit / "wheels" / "kitprobe-1.0-py3-none-any.whl", "kitprobe", "WHERE = 'kit'\n")
    payload = b"X:1\nK:C\nC|\n"
    with tarfile.open(kit / "data.tgz", "w:gz") as archive:
        member = tarfile.TarInfo("abc_tunes/interleaved/a/tune_1.abc")
        member.size = len(payload)
        archive.addfile(member, io.BytesIO(payload))
    result, log = run_table(tmp_path, KIT=str(kit), STEPS="", PYTHONPATH="")
    assert result.returncode == 0, log + result.stderr
    assert "kit: 1 wheels installed" in log and "caches unpacked" in log and "(1 files)" in log, log
    assert (tmp_path / "cache" / "abc_tunes" / "interleaved" / "a" / "tune_1.abc").read_bytes() == payload
    site = next(tmp_path.glob("clamp2_kit_site.*"))
    check = subprocess.run([sys.executable, "-c", "import kitprobe; print(kitprobe.WHERE)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert check.stdout.strip() == "kit", check.stderr

"""Pack what ``benchmarks/gpu_table.sh`` needs on a GPU machine that has no internet (a cluster's compute node).

    python benchmarks/gpu_kit.py [--out benchmarks/.kit] [--python_version 3.12] [--tunes DIR/interleaved]

Run it where pip reaches PyPI and music21 is installed (a login node, a laptop). It writes, into
``--out`` (ignored by git, so it travels only when copied or carried on purpose):

- ``wheels/``: the packages this project imports that a stock PyTorch GPU image lacks (``WHEELS``),
  at requirements.txt's pins, for ``--python_version`` on manylinux x86-64. torch and what a PyTorch
  image already holds (numpy, accelerate, tokenizers, huggingface-hub, safetensors, scikit-learn, pytest)
  are left to the image; transformers comes at this project's pin, because its tests pin its behaviour.
- ``data.tgz``: the benches' corpus caches, which need music21 to build: ``clamp2_bench_train``
  (bench_train.py), ``clamp2_bench_music`` (bench_extract.py, bench_extract_clamp3.py) and
  ``abc_tunes/interleaved`` (bench_abc_corpus.py's 12,978 tunes; ``--tunes`` reuses a folder made earlier).

Then, on the GPU machine, ``bash benchmarks/gpu_table.sh`` installs the wheels into a private folder,
unpacks the caches into ``$CACHE`` (default /tmp) and runs every step; MERT's bench uses seeded tones
there when music21 is absent. The kit is about 20 MB.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from clamp2.cli import ArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the benches import beyond a PyTorch image's packages. Checked by running SMOKE=1 gpu_table.sh in a venv
# holding only torch, numpy, accelerate, tokenizers, huggingface-hub, safetensors, scikit-learn, scipy, pytest,
# matplotlib and tqdm, plus this kit: every step passed.
# regex: transformers refuses to import beside one older than its floor, and an image's may be.
# abctoolkit and what it imports (jellyfish, RapidFuzz; pyparsing, which it does not declare): the `exact` step's
# reference tests convert MusicXML on the device.
WHEELS = ("transformers", "regex", "mido", "Unidecode", "soundfile", "cffi", "pycparser", "platformdirs",
          "abctoolkit", "jellyfish", "RapidFuzz", "pyparsing")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# gpu_table.sh's sizes: bench_extract.py --files 200 (100 ABC + 100 MTF); bench_train.py's default --scores.
EXTRACT_FILES = 200


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / ".kit", help="kit folder (replaced)")
    parser.add_argument("--python_version", default="3.12", help="the GPU machine's Python (X.Y)")
    parser.add_argument("--tunes", type=Path, default=None,
                        help="an interleaved tunes folder made earlier (bench_abc_corpus.py --out DIR: DIR/interleaved); "
                             "default: build it now (minutes on a few cores)")
    parser.add_argument("--no_wheels", action="store_true", help="only the caches")
    parser.add_argument("--no_data", action="store_true", help="only the wheels")
    return parser.parse_args(argv)


def pinned_version(name: str) -> str:
    """requirements.txt's pin of ``name``, else the installed version (a dependency of a pinned package)."""
    pattern = re.compile(rf"^{re.escape(name)}==(\S+)", re.IGNORECASE | re.MULTILINE)
    found = pattern.search((REPO_ROOT / "requirements.txt").read_text(encoding="utf-8"))
    return found.group(1) if found else importlib.metadata.version(name)


def download_wheels(folder: Path, python_version: str) -> None:
    folder.mkdir(parents=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    specs = [f"{name}=={pinned_version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "--platform", "any",
                    "--dest", str(folder), *specs], check=True)


def run_bench(*args: str) -> None:
    """Run a bench at a tiny model size: what it builds first is the cache the kit carries."""
    subprocess.run([sys.executable, *args], check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)


def build_caches(folder: Path, tunes: Path | None) -> None:
    run_bench("benchmarks/bench_train.py", "--device", "cpu", "--configs", "small", "--variants", "m3", "--steps", "1",
              "--warmup", "0", "--data", str(folder / "clamp2_bench_train"))
    run_bench("benchmarks/bench_extract.py", "--device", "cpu", "--files", str(EXTRACT_FILES), "--batch_sizes", "64",
              "--reference_files", "0", "--patch_length", "64", "--layers", "1", "--data",
              str(folder / "clamp2_bench_music"))
    shutil.rmtree(folder / "clamp2_bench_music" / "mert_clamp3", ignore_errors=True)  # random arrays: made there
    if tunes is None:
        run_bench("benchmarks/bench_abc_corpus.py", "--out", str(folder / "abc_tunes_build"))
        tunes = folder / "abc_tunes_build" / "interleaved"
    shutil.copytree(tunes, folder / "abc_tunes" / "interleaved", ignore=shutil.ignore_patterns("*.log"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tunes is not None and not any(args.tunes.rglob("*.abc")):
        print(f"gpu_kit: error: no .abc files under {args.tunes} (give bench_abc_corpus.py --out DIR's DIR/interleaved)",
              file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    try:
        if not args.no_wheels:
            download_wheels(args.out / "wheels", args.python_version)
        if not args.no_data:
            with tempfile.TemporaryDirectory() as scratch:
                build_caches(Path(scratch), args.tunes)
                with tarfile.open(args.out / "data.tgz.tmp", "w:gz") as archive:
                    for name in ("clamp2_bench_train", "clamp2_bench_music", "abc_tunes"):
                        archive.add(Path(scratch) / name, arcname=name)
                (args.out / "data.tgz.tmp").rename(args.out / "data.tgz")
    except subprocess.CalledProcessError as error:
        # The step printed its own reason above (pip: no network or no such wheel; a bench: music21 missing).
        print(f"gpu_kit: error: {' '.join(map(str, error.cmd[1:4]))} ... failed (exit {error.returncode}); "
              f"the kit in {args.out} is incomplete", file=sys.stderr)
        return 1
    files = [path for path in args.out.rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    print(f"gpu_kit: {len(files)} files, {size / 2**20:.1f} MiB in {args.out}; on the GPU machine: "
          f"bash benchmarks/gpu_table.sh (KIT={args.out} if it lies elsewhere)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

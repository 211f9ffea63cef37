"""Throughput of the Python API on a folder of raw MusicXML: first run (convert + encode) vs cached run.

    python benchmarks/bench_api.py [--files 24] [--device cpu|cuda] [--dtype fp32|bf16] [--num_workers 2]
    python benchmarks/bench_api.py --weights weights_clamp2_....pth --text_model xlm-roberta-base   # published model

Copies --files MusicXML scores of music21's corpus into a folder, then times
``CLaMP2.encode_folder`` twice on it with a fresh feature cache: the first run converts every file
(xml2abc → interleaved ABC) and runs the model, the second only hashes the files and reads the
cache. Without --weights the music encoder has the published size (768 hidden, 12 layers, 512
patches) and random weights (speed does not depend on the values), with the repository's tiny
text model. Also prints the time of ``from clamp2 import CLaMP2`` in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clamp2.cli import ArgumentParser

TINY_TEXT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "vectors" / "tiny_text_model"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=24, help="number of MusicXML scores")
    parser.add_argument("--weights", default=None, help="a CLaMP 2 checkpoint (default: random, published size)")
    parser.add_argument("--text_model", default=str(TINY_TEXT_MODEL), help="text model folder or hub id")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (the latter two on CUDA)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass (16)")
    parser.add_argument("--num_workers", type=int, default=0, help="conversion worker processes")
    return parser.parse_args(argv)


def import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from clamp2 import CLaMP2"], check=True)
    return time.perf_counter() - start


def random_checkpoint(folder: Path, text_model: str) -> Path:
    import torch

    from clamp2.checkpoint import save_checkpoint
    from clamp2.models.clamp2 import CLaMP2Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import load_text_model

    torch.manual_seed(0)
    model = CLaMP2Model(load_text_model(text_model, pretrained=False), M3Dims(), hidden_size=768)
    path = folder / "random_clamp2.pth"
    save_checkpoint(path, model)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"from clamp2 import CLaMP2: {import_seconds():.2f} s (fresh interpreter)")
    from clamp2 import CLaMP2
    from clamp2.quickstart.music21_corpus import corpus_musicxml_paths

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "music"
        folder.mkdir()
        for path in corpus_musicxml_paths()[: args.files]:
            shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
        weights = args.weights or random_checkpoint(tmp, args.text_model)
        model = CLaMP2.from_pretrained(weights, text_model=args.text_model, device=args.device, dtype=args.dtype,
                                       batch_size=args.batch_size, cache=tmp / "cache", num_workers=args.num_workers)
        print(model)
        for run in ("first (convert + encode)", "cached"):
            start = time.perf_counter()
            encoded = model.encode_folder(folder, progress=False)
            seconds = time.perf_counter() - start
            print(f"{run}: {len(encoded)} files in {seconds:.2f} s = {len(encoded) / seconds:.1f} files/s "
                  f"({encoded.computed} encoded, {encoded.cached} cached, {len(encoded.failures)} failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quick start: real scores from music21's corpus through the pipeline's own scripts, end to end.

    python code/quickstart.py --out quickstart_run [--pieces 24] [--m3_weights weights_m3_....pth]

1. copies MusicXML scores of several composers from music21's bundled corpus;
2. converts them with the batch converters: MusicXML → ABC → interleaved ABC
   (process_data/batch_xml2abc.py, batch_interleaved_abc.py), and MIDI rendered by music21 → MTF
   (process_data/batch_midi2mtf.py);
3. pre-trains a small M3 on them for a few epochs with code/train_m3.py (skipped with
   --m3_weights, e.g. the published M3 weights with the default config);
4. extracts per-position M3 features of every file with code/extract_m3.py;
5. prints a summary: the reconstruction loss before and after training, and the features written.

Everything is written under --out; re-running reuses what exists (each step resumes).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from clamp2.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
# A small M3 that trains in minutes on two CPU cores; the published model is the config default.
SMALL_M3 = {"PATCH_LENGTH": "64", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "128",
            "M3_BATCH_SIZE": "8"}
MAX_SCORE_BYTES = 40_000


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("quickstart_run"), help="working folder (default quickstart_run)")
    parser.add_argument("--pieces", type=int, default=24, help="number of corpus scores (default 24)")
    parser.add_argument("--epochs", type=int, default=12, help="M3 training epochs (default 12)")
    parser.add_argument("--m3_weights", type=Path, default=None,
                        help="use these M3 weights instead of training a small model (config.py's sizes apply)")
    parser.add_argument("--workers", type=int, default=None, help="converter processes (default: all cores)")
    return parser.parse_args(argv)


def load(relative: str):
    """A pipeline script as a module, to call its main() in this process."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def pick_scores(count: int):
    """Scores spread over composers (round robin), deterministic."""
    from clamp2.corpus import DEFAULT_COMPOSERS, corpus_musicxml_paths

    # Short scores only (compressed size): music21 takes up to half a minute to render a quartet.
    per_composer = [[p for p in corpus_musicxml_paths([c]) if p.stat().st_size < MAX_SCORE_BYTES]
                    for c in DEFAULT_COMPOSERS]
    picked, i = [], 0
    while len(picked) < count and any(per_composer):
        pool = per_composer[i % len(per_composer)]
        if pool:
            picked.append(pool.pop(0))
        i += 1
    return picked


def render_midi(scores, xml_dir: Path, midi_dir: Path) -> None:
    from music21 import converter
    from clamp2.progress import progress_bar

    from clamp2.files import atomic_path

    for score in progress_bar(iterable=scores, total=len(scores), desc="music21 → MIDI", unit="score"):
        rel = score.relative_to(xml_dir)
        target = midi_dir / rel.parent / (rel.stem + ".mid")
        if target.exists():
            continue
        try:
            parsed = converter.parse(str(score))
            with atomic_path(target) as tmp:
                parsed.write("midi", fp=str(tmp))
        except Exception as exc:  # noqa: BLE001 - a score music21 cannot render is left out
            print(f"skipped {rel}: {type(exc).__name__}: {exc}", file=sys.stderr)


def eval_losses(log_path: Path):
    """The eval losses of the training log (the reference's per-epoch format), first to last."""
    if not log_path.exists():
        return []
    return [float(line.split(":", 1)[1]) for line in log_path.read_text().splitlines() if line.startswith("eval_loss:")]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    data = out / "data"
    started = time.perf_counter()

    t = step(f"1. {args.pieces} scores from music21's corpus")
    scores = pick_scores(args.pieces)
    xml_dir = data / "xml"
    copied = []
    for score in scores:
        target = xml_dir / score.parent.name / score.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(score, target)
        copied.append(target)
    print(f"{len(copied)} scores by {len({c.parent.name for c in copied})} composers in {xml_dir}")

    t = step("2. converting: MusicXML → ABC → interleaved ABC; MusicXML → MIDI → MTF")
    workers = ["--workers", str(args.workers)] if args.workers else []
    statuses = [
        load("process_data/batch_xml2abc.py").main([str(xml_dir), str(data / "abc_standard"), *workers]),
        load("process_data/batch_interleaved_abc.py").main([str(data / "abc_standard"), str(data / "abc"), *workers]),
    ]
    render_midi(copied, xml_dir, data / "midi")
    statuses.append(load("process_data/batch_midi2mtf.py").main([str(data / "midi"), str(data / "mtf"), *workers]))
    if any(s == 2 for s in statuses):
        print("error: a conversion step could not run (see above)", file=sys.stderr)
        return 2
    n_abc, n_mtf = len(list((data / "abc").rglob("*.abc"))), len(list((data / "mtf").rglob("*.mtf")))
    print(f"{n_abc} interleaved ABC and {n_mtf} MTF files ({time.perf_counter() - t:.0f} s)")

    weights = args.m3_weights
    if weights is None:
        t = step(f"3. pre-training a small M3 ({', '.join(f'{k}={v}' for k, v in SMALL_M3.items())}) "
                 f"for {args.epochs} epochs")
        os.environ.update(SMALL_M3)
        os.environ["M3_NUM_EPOCH"] = str(args.epochs)
        weights = out / "weights_m3_small.pth"
        # A higher rate and a short warm-up than the published run: this one has only ~100 steps.
        status = load("code/train_m3.py").main(["--train_folders", str(data / "abc"), str(data / "mtf"),
                                                "--weights", str(weights), "--learning_rate", "5e-4",
                                                "--warmup_steps", "20"])
        if status not in (0, None):
            print("error: M3 training failed (see above)", file=sys.stderr)
            return 1
        print(f"trained in {time.perf_counter() - t:.0f} s → {weights}")
    else:
        step(f"3. using M3 weights {weights}")

    t = step("4. extracting M3 features")
    features = out / "features_m3"
    extract_m3 = load("code/extract_m3.py")
    status = max(extract_m3.main([str(data / kind), str(features / kind), "--weights", str(weights)])
                 for kind in ("abc", "mtf"))
    n_feat = len(list(features.rglob("*.npy")))
    print(f"{n_feat} feature files in {features} ({time.perf_counter() - t:.0f} s)")

    step("5. summary")
    losses = eval_losses(out / "logs_m3_small.txt") if args.m3_weights is None else []
    if len(losses) > 1:
        print(f"M3 masked-patch reconstruction, eval loss: {losses[0]:.3f} after epoch 1 → {losses[-1]:.3f} "
              f"after epoch {len(losses)} (uniform guessing over 128 characters: {np.log(128):.3f})")
    shapes = sorted({np.load(p, mmap_mode="r").shape[2] for p in features.rglob("*.npy")})
    print(f"features: [1, patches, {', '.join(map(str, shapes))}] float32 per file, e.g. "
          f"{next(iter(sorted(features.rglob('*.npy'))), 'none')}")
    print(f"quickstart: {len(copied)} scores, {n_abc} ABC, {n_mtf} MTF, {n_feat} features in "
          f"{time.perf_counter() - started:.0f} s; outputs under {out}")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Quick start: real corpus music → a trained CLaMP 2 → retrieval, zero-shot, probe and FMD, with a report.

    python code/quickstart.py --out quickstart_run                 # 6–12 min of pipeline on 2 CPU cores (README)
    python code/quickstart.py --out qs_tiny --tiny                 # a smoke run of about a minute
    python code/quickstart.py --out qs_published --weights weights_clamp2_....pth --text_model xlm-roberta-base
    python code/quickstart.py --clamp3 --out quickstart_clamp3     # CLaMP 3 on audio, 5–10 min of pipeline (README)
    python code/quickstart.py --clamp3 --out qs3_tiny --tiny       # its smoke run
    python code/quickstart.py --clamp3 --out qs3_mert --mert MERT-v1-95M   # with the published MERT

Takes six collections of music21's bundled corpus (Bach chorales, German and Chinese folk songs of
the Essen collection, jigs, reels and hornpipes of Ryan's Mammoth Collection), converts them with the
project's converters (MusicXML/ABC → interleaved ABC, music21-rendered MIDI → MTF), describes each
piece from its metadata in English and German/French/Spanish, trains a small M3 and from it a small
CLaMP 2 (through code/train_m3.py and code/train_clamp2.py under torchrun), then evaluates on the
held-out pieces with the project's own tools: text→music and ABC→MTF retrieval
(semantic_search_metrics.py), zero-shot classification by prompt (zero_shot.py), a linear probe
(music_classification/train_cls.py) and FMD between collections (clamp2_fmd.py). Writes
<out>/report.md, <out>/metrics.json and PNG plots under <out>/plots.

--clamp3 runs CLaMP 3 on the same pieces heard as audio: each piece's MIDI rendered with
TinySoundFont (one General MIDI instrument per collection, the first --audio_seconds), MERT features
(process_data/extract_mert.py) from a MERT-architecture model with random weights built locally (no
download; --mert PATH uses the published MERT-v1-95M), CLaMP 3's symbolic then audio stage from the
same small M3 (code/train_clamp3_symbolic.py, code/train_clamp3_audio.py under torchrun), and the
held-out evaluation with CLaMP 3's tools: text→ABC, text→audio, ABC→audio and MTF→audio retrieval,
zero-shot collection of the audio, CLaMP 3's probe on audio features and clamp3_score between
collections.

With --weights (a published CLaMP 2 file or hub id) training is skipped and the published model is
evaluated (config.py's sizes; --text_model must hold XLM-R's tokenizer). Re-running with the same
settings resumes: finished steps are skipped. Exit status: 0 done, 1 a step failed (it says which
and why), 2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import math
import sys
from pathlib import Path

from clamp2.cli import ArgumentParser


def parse_args(argv=None):
    from clamp2.quickstart.pipeline import Clamp3Settings, Settings  # standard library only: --help stays fast

    full, tiny = Settings(), Settings.tiny()
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("quickstart_run"), help="working folder (default quickstart_run)")
    parser.add_argument("--tiny", action="store_true", help="a small, fast run (smoke test)")
    parser.add_argument("--per_collection", type=int, default=None, help=f"pieces per collection (default {full.per_collection}; tiny {tiny.per_collection})")
    parser.add_argument("--m3_epochs", type=int, default=None, help=f"M3 pre-training epochs (default {full.m3_epochs}; tiny {tiny.m3_epochs})")
    parser.add_argument("--clamp2_epochs", type=int, default=None, help=f"CLaMP 2 training epochs (default {full.clamp2_epochs}; tiny {tiny.clamp2_epochs})")
    parser.add_argument("--nproc", type=int, default=None, help=f"training processes of CLaMP 2 and CLaMP 3's stages (torchrun; default {full.nproc})")
    parser.add_argument("--text_dropout", action="store_true",
                        help="train CLaMP 2 with the published text dropout (slower to learn at this size)")
    parser.add_argument("--weights", default=None, help="evaluate this CLaMP 2 checkpoint (file or hub id) instead of training")
    parser.add_argument("--text_model", default=None, help="text model folder or hub id for --weights")
    c3, c3_tiny = Clamp3Settings(), Clamp3Settings.tiny()
    parser.add_argument("--clamp3", action="store_true", help="CLaMP 3 on the corpus rendered to audio (see above)")
    parser.add_argument("--mert", default=None,
                        help="--clamp3: the published MERT-v1-95M folder (or cached hub id) instead of the random one")
    parser.add_argument("--symbolic_epochs", type=int, default=None,
                        help=f"--clamp3: symbolic-stage epochs (default {c3.symbolic_epochs}; tiny {c3_tiny.symbolic_epochs})")
    parser.add_argument("--audio_epochs", type=int, default=None,
                        help=f"--clamp3: audio-stage epochs (default {c3.audio_epochs}; tiny {c3_tiny.audio_epochs})")
    parser.add_argument("--audio_seconds", type=float, default=None,
                        help=f"--clamp3: seconds of each piece rendered (default {c3.audio_seconds:g}; tiny {c3_tiny.audio_seconds:g})")
    parser.add_argument("--seed", type=int, default=0, help="which pieces are drawn (default 0)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from clamp2.quickstart import pipeline
    from clamp2.quickstart.pipeline import Clamp3Settings, Quickstart, Quickstart3, Settings

    pipeline.REPO = Path(__file__).resolve().parents[1]  # this checkout's scripts, wherever clamp2 is installed

    args = parse_args(argv)
    kind = Clamp3Settings if args.clamp3 else Settings
    settings = kind.tiny() if args.tiny else kind()
    clamp3_only = ("mert", "symbolic_epochs", "audio_epochs", "audio_seconds")
    if not args.clamp3 and any(getattr(args, name) is not None for name in clamp3_only):
        given = [f"--{name}" for name in clamp3_only if getattr(args, name) is not None]
        print(f"quickstart.py: error: {', '.join(given)} go with --clamp3", file=sys.stderr)
        return 2
    if args.clamp3 and (args.weights or args.text_model or args.clamp2_epochs is not None or args.text_dropout):
        print("quickstart.py: error: --weights, --text_model, --clamp2_epochs and --text_dropout are CLaMP 2 options; "
              "--clamp3 trains its own model", file=sys.stderr)
        return 2
    names = ("per_collection", "m3_epochs", "clamp2_epochs", "nproc", "weights", "text_model")
    for name in names + (clamp3_only if args.clamp3 else ()):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.seed = args.seed
    settings.text_dropout = args.text_dropout
    for name in ("m3_epochs", "clamp2_epochs", "nproc") + (("symbolic_epochs", "audio_epochs") if args.clamp3 else ()):
        if getattr(settings, name) < 1:
            print(f"quickstart.py: error: --{name} must be at least 1, got {getattr(settings, name)}", file=sys.stderr)
            return 2
    if settings.per_collection < 5:
        print("quickstart.py: error: --per_collection must be at least 5 (one in five pieces is held out)", file=sys.stderr)
        return 2
    if settings.text_model and not settings.weights:
        # Without --weights the run builds its own small text model at this path: it wrote over the folder given.
        print("quickstart.py: error: --text_model goes with --weights (without them the run trains its own small "
              f"text model, and would write it over {settings.text_model})", file=sys.stderr)
        return 2
    if settings.weights and not settings.text_model:
        print("quickstart.py: error: --weights needs --text_model (XLM-R's tokenizer and config, e.g. a folder from "
              "`hf download FacebookAI/xlm-roberta-base --local-dir xlm-roberta-base`)", file=sys.stderr)
        return 2
    if args.clamp3 and not (math.isfinite(settings.audio_seconds) and settings.audio_seconds >= 5):
        print(f"quickstart.py: error: --audio_seconds must be a number of seconds, at least 5 (one MERT window), "
              f"got {settings.audio_seconds:g}", file=sys.stderr)
        return 2
    if not settings.weights and settings.batch_size % settings.nproc:
        per_process = max(1, settings.batch_size // settings.nproc)
        print(f"quickstart.py: note: the batch of {settings.batch_size} does not split into {settings.nproc} "
              f"processes: each takes {per_process}, a global batch of {per_process * settings.nproc} "
              "(the contrastive negatives); results differ from a run whose --nproc divides the batch", file=sys.stderr)
    from clamp2.files import output_problem

    problem = output_problem(args.out, folder=True)
    if problem:
        print(f"quickstart.py: error: {problem}", file=sys.stderr)
        return 2
    pipeline = Quickstart3 if args.clamp3 else Quickstart
    return pipeline(args.out.resolve(), settings, progress=not args.no_progress).run()


if __name__ == "__main__":
    sys.exit(main())

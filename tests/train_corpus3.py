"""A small real CLaMP 3 training corpus (SPEC_CLAMP3 §17 JSONL) built from music21's Essen folk songs.

- Symbolic: folk songs of music21's ``essenFolksong/erk10.abc`` in four meters (2/4, 3/4, 4/4, 6/8),
  one .abc file each (information fields dropped, as SPEC §3), plus the CLaMP 3 vectors' interleaved
  ABC and MTF of Bach's BWV 26.6 and *Banish Misfortune*.
- Audio: the vectors' real MERT features (``expected/mert_mean``: the tiny MERT on FluidSynth
  renderings of those two pieces), and for every folk song an array **derived deterministically from
  its notes**, not rendered audio (no audio renderer was on this branch when the tests were written):
  one 64-wide row per two bars, ``tanh(W · f)`` with a fixed seeded W and f the two bars' durations,
  note counts and note-letter histogram — float32 ``[1, n, 64]`` as ``extract_mert.py`` writes.
- Texts: ``analysis`` names the meter in words ("in three-four time"), so a model that reads the
  music can match held-out pieces to their texts (a learning test's eval loss can fall below
  chance); ``translations`` hold a German version; other metadata (title, region) as the reference's.

Every folk song is a training pair except ``EVAL_PER_METER`` of each meter, held out in the eval
JSONLs; files are relative to the JSONL's folder.
"""

from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR

VECTORS3 = DATA_DIR / "vectors_clamp3"
METERS = {"2/4": ("two-four", "Zweivierteltakt"), "3/4": ("three-four", "Dreivierteltakt"),
          "4/4": ("four-four", "Viervierteltakt"), "6/8": ("six-eight", "Sechsachteltakt")}
PER_METER = 34
EVAL_PER_METER = 4
WIDTH = 64
NOTE = re.compile(r"([_=^]*)([A-Ga-gz])([,']*)(\d*)(/*)(\d*)")


def erk_tunes(per_meter: int):
    """(number, title, meter, abc body) of the first ``per_meter`` tunes of each meter in erk10."""
    from music21 import corpus

    text = corpus.getWork("erk10").read_text(encoding="latin-1")
    counts = {meter: 0 for meter in METERS}
    for chunk in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Z]):\s*(.*)$", chunk, flags=re.M))
        meter = fields.get("M", "").strip()
        if "X" not in fields or meter not in counts or counts[meter] >= per_meter:
            continue
        counts[meter] += 1
        body = "\n".join(line for line in chunk.strip().splitlines() if not re.match(r"^[XTNO]:", line)) + "\n"
        yield fields.get("N", "").strip(), fields.get("T", "untitled").strip(), meter, body


def bar_features(body: str) -> np.ndarray:
    """Per bar: duration in quarter notes, note count, note-letter histogram (9 values), from the ABC body."""
    unit = Fraction(re.search(r"^L:\s*(\d+/\d+)", body, re.M).group(1)) if re.search(r"^L:", body, re.M) \
        else Fraction(1, 8)
    music = "\n".join(line for line in body.splitlines() if not re.match(r"^[A-Za-z]:", line))
    bars = []
    for bar in re.split(r"\|+|:", music):
        notes = NOTE.findall(bar)
        if not notes:
            continue
        duration, letters = Fraction(0), np.zeros(7)
        for _, letter, _, numerator, slashes, denominator in notes:
            length = Fraction(int(numerator or 1), int(denominator or 2 ** len(slashes)) if slashes else 1)
            duration += length
            if letter.lower() != "z":
                letters["abcdefg".index(letter.lower())] += float(length)
        quarters = float(duration * unit * 4)
        bars.append(np.concatenate([[quarters - 3, len(notes) / 4 - 1.5], letters / max(letters.sum(), 1) / 3]))
    return np.array(bars)


def derived_audio(body: str, seed: int = 0) -> np.ndarray:
    """A ``[1, n, 64]`` float32 array from the tune's bars: one row per two bars (see the module docstring)."""
    bars = bar_features(body)
    segments = [bars[i:i + 2].mean(axis=0) for i in range(0, len(bars), 2)]
    weights = np.random.default_rng(seed).normal(size=(WIDTH, bars.shape[1]))
    return np.tanh(np.stack(segments) @ weights.T)[None].astype(np.float32)


def build_corpus3(root: Path) -> Path:
    """``root/{abc,mtf,audio}/`` and ``root/{symbolic,audio}_{train,eval}.jsonl`` (built once, then reused)."""
    if (root / "done").exists():
        return root
    for kind in ("abc", "mtf", "audio"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    lines = {name: [] for name in ("symbolic_train", "symbolic_eval", "audio_train", "audio_eval")}
    seen = {meter: 0 for meter in METERS}
    for index, (number, title, meter, body) in enumerate(erk_tunes(PER_METER)):
        stem = f"erk_{index:03d}"
        (root / f"abc/{stem}.abc").write_text(body, encoding="utf-8")
        np.save(root / f"audio/{stem}.npy", derived_audio(body))
        words, german = METERS[meter]
        item = {"id": stem, "title": title, "region": "Germany", "meter": meter,
                "analysis": f"A German folk song in {words} time.",
                "translations": {"language": "German", "German": f"Ein deutsches Volkslied im {german}."}}
        split = "eval" if seen[meter] < EVAL_PER_METER else "train"
        seen[meter] += 1
        lines[f"symbolic_{split}"].append({**item, "filepaths": [f"abc/{stem}.abc"]})
        lines[f"audio_{split}"].append({**item, "filepaths": [f"audio/{stem}.npy"]})
    # The vectors' real pieces: interleaved ABC / MTF and the tiny MERT's features of their renderings.
    vectors = VECTORS3 / "extract_in"
    for kind in ("abc", "mtf", "audio"):
        for path in sorted((vectors / kind).glob("*")):
            shutil.copy(path, root / kind / path.name)
    texts = {stem: (vectors / "txt" / f"{stem}.txt").read_text(encoding="utf-8").strip()
             for stem in ("bwv26.6", "banish_misfortune")}
    for stem, translation, audio in (("bwv26.6", "Ein vierstimmiger Choral von Bach.",
                                      ["audio/bwv26.6_44k1_stereo_s16.npy", "audio/bwv26.6_16k_stereo_s16.npy"]),
                                     ("banish_misfortune", "Eine irische Gigue.",
                                      ["audio/banish_misfortune_22k05_mono_s16.npy"])):
        item = {"id": stem, "analysis": texts[stem], "translations": {"language": "German", "German": translation}}
        symbolic = [f"abc/{stem}.abc"] + ([f"mtf/{stem}.mtf"] if (root / f"mtf/{stem}.mtf").is_file() else [])
        lines["symbolic_train"].append({**item, "filepaths": symbolic})
        lines["audio_train"].append({**item, "filepaths": audio})
    for name in ("symbolic_eval", "audio_eval"):  # meters round-robin: every eval batch of 8 holds all four
        by_meter = [[item for item in lines[name] if item["meter"] == meter] for meter in METERS]
        lines[name] = [item for group in zip(*by_meter) for item in group]
    for name, items in lines.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items),
                                            encoding="utf-8")
    (root / "done").touch()
    return root


@pytest.fixture(scope="session")
def corpus3(tmp_path_factory) -> Path:
    """The CLaMP 3 corpus, built once per session (import this fixture into a test module to use it)."""
    if not VECTORS3.is_dir():
        pytest.fail(f"CLaMP 3 conformance vectors not found at {VECTORS3}: the checkout is incomplete")
    return build_corpus3(tmp_path_factory.getbasetemp() / "train_corpus3")

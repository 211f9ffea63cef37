"""A labelled, described music collection built from music21's bundled corpus (no downloads).

The quick start trains and evaluates CLaMP 2 on it. Six collections that a listener tells apart:
Bach's four-part chorales (MusicXML), German and Chinese folk songs of the Essen collection, and
jigs, reels and hornpipes of Ryan's Mammoth Collection (ABC). Each piece gets

- its music as it comes (a MusicXML file, or one ABC tune in its own file) and a MIDI rendering
  made by music21, for the project's own converters to turn into interleaved ABC and MTF;
- a metadata JSON in the format of ``process_data/gpt4_summarize.py``'s output: the facts the
  corpus carries (title, collection, composer, origin, key, meter, voices, range) and short
  descriptions written from those facts with fixed templates, in English and in one of German,
  French or Spanish (the templates say only what the facts say: nothing is invented).

File names start with the collection's label and an underscore (``jig_LanigansBallJig``), which is
how the linear probe and zero-shot accuracy read labels, and contain no ``.`` (keys are names up
to the first dot).
"""

from __future__ import annotations

import json
import random
import re
import string
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..convert.abc import split_tunes
from ..files import atomic_path, atomic_write_text, remove_partial_files_of


@dataclass(frozen=True)
class Collection:
    label: str  # file-name prefix and class label
    sources: str  # music21 corpus folder
    pattern: str  # file glob inside it
    kind: str  # "musicxml" or "abc"
    names: Dict[str, str]  # the collection's description per language code
    tune_filter: str = ""  # regex an ABC tune's origin (O:) field must match, for the Essen books


LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}

COLLECTIONS = (
    Collection("chorale", "bach", "*.mxl", "musicxml", {
        "en": "a four-part chorale harmonised by Johann Sebastian Bach",
        "de": "ein vierstimmiger Choral, harmonisiert von Johann Sebastian Bach",
        "fr": "un choral à quatre voix harmonisé par Jean-Sébastien Bach",
        "es": "un coral a cuatro voces armonizado por Johann Sebastian Bach"}),
    Collection("germanfolk", "essenFolksong", "*.abc", "abc", {
        "en": "a German folk song from the Essen folk song collection",
        "de": "ein deutsches Volkslied aus der Essener Volksliedsammlung",
        "fr": "une chanson populaire allemande de la collection d'Essen",
        "es": "una canción popular alemana de la colección de Essen"}, tune_filter=r"Deutschland"),
    Collection("chinesefolk", "essenFolksong", "han*.abc", "abc", {
        "en": "a Chinese folk song from the Essen folk song collection",
        "de": "ein chinesisches Volkslied aus der Essener Volksliedsammlung",
        "fr": "une chanson populaire chinoise de la collection d'Essen",
        "es": "una canción popular china de la colección de Essen"}, tune_filter=r"China"),
    Collection("jig", "ryansMammoth", "*Jig.abc", "abc", {
        "en": "a jig in Ryan's Mammoth Collection of fiddle tunes",
        "de": "ein Jig aus Ryan's Mammoth Collection, einer Sammlung von Fiedelstücken",
        "fr": "une gigue du recueil de musique pour violon Ryan's Mammoth Collection",
        "es": "una giga de Ryan's Mammoth Collection, una colección de piezas para violín"}),
    Collection("reel", "ryansMammoth", "*Reel.abc", "abc", {
        "en": "a reel in Ryan's Mammoth Collection of fiddle tunes",
        "de": "ein Reel aus Ryan's Mammoth Collection, einer Sammlung von Fiedelstücken",
        "fr": "un reel du recueil de musique pour violon Ryan's Mammoth Collection",
        "es": "un reel de Ryan's Mammoth Collection, una colección de piezas para violín"}),
    Collection("hornpipe", "ryansMammoth", "*Hornpipe.abc", "abc", {
        "en": "a hornpipe in Ryan's Mammoth Collection of fiddle tunes",
        "de": "ein Hornpipe aus Ryan's Mammoth Collection, einer Sammlung von Fiedelstücken",
        "fr": "un hornpipe du recueil de musique pour violon Ryan's Mammoth Collection",
        "es": "un hornpipe de Ryan's Mammoth Collection, una colección de piezas para violín"}),
)

# Zero-shot prompts: what a user would type for each collection.
PROMPTS = {"chorale": "a four-part chorale harmonised by Johann Sebastian Bach",
           "germanfolk": "a German folk song", "chinesefolk": "a Chinese folk song",
           "jig": "a jig in 6/8 time", "reel": "a reel", "hornpipe": "a hornpipe"}


# The CLaMP 3 quick start's audio: the General MIDI program (0-based) each collection is rendered with,
# an instrument it is played on, so that timbre tells the collections apart as it does in recordings.
INSTRUMENTS = {"chorale": (19, "church organ"), "germanfolk": (21, "accordion"),
               "chinesefolk": (107, "koto (a plucked zither, like the guzheng)"), "jig": (40, "violin (fiddle)"),
               "reel": (105, "banjo"), "hornpipe": (78, "whistle")}


@dataclass
class Piece:
    name: str  # unique file stem: "<label>_<source>"
    collection: Collection
    source: Path  # the corpus file
    abc_text: Optional[str] = None  # one tune (ABC collections); None for MusicXML
    facts: dict = field(default_factory=dict)
    split: str = "train"  # "train" or "test" (held out)


# -- choosing pieces ------------------------------------------------------------------------------

def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def abc_field(tune: str, name: str) -> Optional[str]:
    match = re.search(rf"^{name}:\s*(.*?)\s*$", tune, flags=re.M)
    return match.group(1) if match else None


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")


def collection_pieces(collection: Collection) -> List[Piece]:
    """Every candidate piece of a collection, in a fixed order."""
    folder = corpus_root() / collection.sources
    pieces: List[Piece] = []
    for path in sorted(folder.glob(collection.pattern)):
        if collection.kind == "musicxml":
            pieces.append(Piece(f"{collection.label}_{safe_stem(path.stem)}", collection, path))
            continue
        tunes = [tune.strip() + "\n" for tune in split_tunes(path.read_text(encoding="latin-1"))]
        for index, tune in enumerate(tunes):
            if collection.tune_filter and not re.search(collection.tune_filter, abc_field(tune, "O") or ""):
                continue
            if abc_field(tune, "K") is None:
                continue
            suffix = f"-{index + 1}" if len(tunes) > 1 else ""
            pieces.append(Piece(f"{collection.label}_{safe_stem(path.stem)}{suffix}", collection, path, tune))
    return pieces


def shuffled_candidates(collection: Collection, seed: int = 0) -> List[Piece]:
    """A collection's pieces in a random order fixed by ``seed``: the first N are the draw of N."""
    candidates = collection_pieces(collection)
    random.Random(f"{seed}-{collection.label}").shuffle(candidates)
    return candidates


# -- facts and descriptions -----------------------------------------------------------------------

NOTE_NAMES = {
    "en": dict(zip("CDEFGAB", "CDEFGAB")),
    "de": dict(zip("CDEFGAB", "CDEFGAH")),
    "fr": dict(zip("CDEFGAB", ["do", "ré", "mi", "fa", "sol", "la", "si"])),
    "es": dict(zip("CDEFGAB", ["do", "re", "mi", "fa", "sol", "la", "si"])),
}
ACCIDENTALS = {"en": {"#": " sharp", "b": " flat"}, "de": {"#": "is", "b": "es"},
               "fr": {"#": " dièse", "b": " bémol"}, "es": {"#": " sostenido", "b": " bemol"}}
MODES = {
    "major": {"en": "major", "de": "Dur", "fr": "majeur", "es": "mayor"},
    "minor": {"en": "minor", "de": "Moll", "fr": "mineur", "es": "menor"},
    "dorian": {"en": "Dorian", "de": "Dorisch", "fr": "dorien", "es": "dórico"},
    "mixolydian": {"en": "Mixolydian", "de": "Mixolydisch", "fr": "mixolydien", "es": "mixolidio"},
    "phrygian": {"en": "Phrygian", "de": "Phrygisch", "fr": "phrygien", "es": "frigio"},
    "lydian": {"en": "Lydian", "de": "Lydisch", "fr": "lydien", "es": "lidio"},
    "aeolian": {"en": "Aeolian", "de": "Äolisch", "fr": "éolien", "es": "eólico"},
}
# First match wins: "mix" before "m" (bare "m" is ABC's minor; "Amix" is A Mixolydian, not A minor).
_MODE_PREFIXES = (("maj", "major"), ("min", "minor"), ("mix", "mixolydian"), ("m", "minor"), ("dor", "dorian"),
                  ("phr", "phrygian"), ("lyd", "lydian"), ("aeo", "aeolian"), ("ion", "major"))


def parse_abc_key(value: str) -> Optional[tuple]:
    """``K:`` value → (tonic letter, accidental '#'/'b'/'', mode name), or None (e.g. ``K:none``)."""
    match = re.match(r"\s*([A-Ga-g])([#b]?)\s*([A-Za-z]*)", value or "")
    if not match:
        return None
    letter, accidental, mode_text = match.group(1).upper(), match.group(2), match.group(3).lower()
    mode = "major"
    for prefix, name in _MODE_PREFIXES:
        if mode_text.startswith(prefix):
            mode = name
            break
    else:
        if mode_text and mode_text not in ("exp",):
            return None
    return letter, accidental, mode


def key_name(key: tuple, language: str) -> str:
    letter, accidental, mode = key
    tonic = NOTE_NAMES[language][letter]
    if language == "de":
        # German: Es, As (not Ees, Aes), B for B flat (H is B natural); minor keys in lower case.
        spelled = {"Eb": "Es", "Ab": "As", "Bb": "B"}.get(letter + accidental,
                                                        tonic + ACCIDENTALS["de"].get(accidental, ""))
        if mode == "minor":
            spelled = spelled.lower()
        return f"{spelled}-{MODES[mode]['de']}"
    tonic += ACCIDENTALS[language].get(accidental, "")
    return f"{tonic} {MODES[mode][language]}"


def piece_facts(piece: Piece, score, abc_header: str) -> dict:
    """What the corpus says about a piece: from its ABC/MusicXML header and the music21 score."""
    facts = {"collection": piece.collection.label}
    title = abc_field(abc_header, "T")
    if piece.collection.kind == "musicxml":
        title = (score.metadata.title if score.metadata and score.metadata.title else None) or title
        facts["composer"] = "Johann Sebastian Bach"
        facts["catalogue"] = piece.source.stem.upper().replace("BWV", "BWV ")
    else:
        origin = abc_field(abc_header, "O")
        place = origin.split(",")[-1].strip(" .") if origin else ""
        if re.search(r"[A-Za-z]{2}", place):
            facts["origin"] = place
    if title and piece.collection.sources == "ryansMammoth":
        # "LANIGAN'S BALL -- JIG" → "Lanigan's Ball" (the dance type is the collection, said elsewhere)
        title = string.capwords(re.sub(r"\s*--.*$", "", title))
    if title and not re.search(r"\.(mxl|xml|musicxml|krn)$", title, flags=re.I):  # music21's file-name fallback
        facts["title"] = title.strip()
    key = parse_abc_key(abc_field(abc_header, "K") or "")
    if key:
        facts["key"] = key
    meter = abc_field(abc_header, "M")
    if meter and re.fullmatch(r"\d+/\d+", meter.strip()):
        facts["meter"] = meter.strip()
    facts["voices"] = len(score.parts) if hasattr(score, "parts") and len(score.parts) else 1
    pitches = [p for p in score.pitches]
    if pitches:
        low, high = min(pitches, key=lambda p: p.ps), max(pitches, key=lambda p: p.ps)
        facts["range"] = (low.nameWithOctave.replace("-", "b"), high.nameWithOctave.replace("-", "b"))
    return facts


TEMPLATES = {
    "en": {"intro": ["This is {collection}.", "Here is {collection}.", "The piece is {collection}."],
           "title": ['It is titled "{title}".', 'Its title is "{title}".'],
           "catalogue": ["It is catalogued as {catalogue}."],
           "origin": ["It was collected in {origin}."],
           "key_meter": ["It is in {key}, in {meter} time.", "Key: {key}; time signature {meter}."],
           "key": ["It is in {key}."], "meter": ["It is in {meter} time."],
           "voices": {1: "It is a single melodic line", "n": "It is written for {voices} voices"},
           "range": [", ranging from {low} to {high}."]},
    "de": {"intro": ["Dies ist {collection}.", "Das Stück ist {collection}."],
           "title": ["Sein Titel lautet „{title}“.", "Es trägt den Titel „{title}“."],
           "catalogue": ["Es ist als {catalogue} verzeichnet."],
           "origin": ["Es wurde in {origin} aufgezeichnet."],
           "key_meter": ["Es steht in {key}, im {meter}-Takt.", "Tonart: {key}; Taktart {meter}."],
           "key": ["Es steht in {key}."], "meter": ["Es steht im {meter}-Takt."],
           "voices": {1: "Es ist eine einzelne Melodielinie", "n": "Es ist für {voices} Stimmen geschrieben"},
           "range": [" und reicht von {low} bis {high}."]},
    "fr": {"intro": ["Cette pièce est {collection}."],  # "pièce" keeps the "elle" that follows right
           "title": ["Elle s'intitule « {title} ».", "Son titre est « {title} »."],
           "catalogue": ["Elle est cataloguée sous le numéro {catalogue}."],
           "origin": ["Elle a été recueillie en {origin}."],
           "key_meter": ["Elle est en {key}, à {meter}.", "Tonalité : {key} ; mesure à {meter}."],
           "key": ["Elle est en {key}."], "meter": ["Elle est à {meter}."],
           "voices": {1: "C'est une seule ligne mélodique", "n": "Elle est écrite pour {voices} voix"},
           "range": [", de {low} à {high}."]},
    "es": {"intro": ["Se trata de {collection}.", "La pieza es {collection}."],
           "title": ["Se titula «{title}».", "Su título es «{title}»."],
           "catalogue": ["Está catalogada como {catalogue}."],
           "origin": ["Fue recogida en {origin}."],
           "key_meter": ["Está en {key}, en compás de {meter}.", "Tonalidad: {key}; compás de {meter}."],
           "key": ["Está en {key}."], "meter": ["Está en compás de {meter}."],
           "voices": {1: "Es una sola línea melódica", "n": "Está escrita para {voices} voces"},
           "range": [", de {low} a {high}."]},
}


def describe(facts: dict, language: str, rng: random.Random, collection: Collection) -> str:
    """A few sentences in ``language`` stating ``facts`` (template wording varies with ``rng``)."""
    t = TEMPLATES[language]
    sentences = [rng.choice(t["intro"]).format(collection=collection.names[language])]
    if "title" in facts:
        sentences.append(rng.choice(t["title"]).format(title=facts["title"]))
    if "catalogue" in facts:
        sentences.append(rng.choice(t["catalogue"]).format(catalogue=facts["catalogue"]))
    if "origin" in facts:
        sentences.append(rng.choice(t["origin"]).format(origin=facts["origin"]))
    key = key_name(facts["key"], language) if "key" in facts else None
    if key and "meter" in facts:
        sentences.append(rng.choice(t["key_meter"]).format(key=key, meter=facts["meter"]))
    elif key:
        sentences.append(rng.choice(t["key"]).format(key=key))
    elif "meter" in facts:
        sentences.append(rng.choice(t["meter"]).format(meter=facts["meter"]))
    voices = t["voices"][1] if facts.get("voices", 1) == 1 else t["voices"]["n"].format(voices=facts["voices"])
    if "range" in facts:
        low, high = facts["range"]
        voices += rng.choice(t["range"]).format(low=low, high=high)
    else:
        voices += "."
    sentences.append(voices)
    return " ".join(sentences)


def piece_record(piece: Piece, seed: int = 0) -> dict:
    """The metadata JSON of a piece, shaped like ``gpt4_summarize.py``'s output (``filepaths`` added later)."""
    rng = random.Random(f"{seed}-{piece.name}")
    other = rng.choice(["de", "fr", "es"])
    facts = piece.facts
    record = {"title": facts.get("title"), "composer": facts.get("composer"),
              "genres": [piece.collection.names["en"].split(" ", 1)[1]],
              "tags": [t for t in (facts.get("origin"), facts.get("meter")) if t]}
    record = {k: v for k, v in record.items() if v}
    record["summary_en"] = describe(facts, "en", rng, piece.collection)
    record["summary_nen"] = {"language": LANGUAGES[other], "summary": describe(facts, other, rng, piece.collection)}
    return record


# -- writing the collection -----------------------------------------------------------------------

def build_demo_corpus(out_dir: str | Path, per_collection: int, seed: int = 0, progress: bool = True,
                      collections: Sequence[Collection] = COLLECTIONS, test_every: int = 5,
                      workers: Optional[int] = None) -> List[Piece]:
    """Write ``xml/``, ``abc_standard/``, ``midi/`` and ``metadata/`` under ``out_dir``; existing files are kept.

    Each folder has ``train/`` and ``test/`` subfolders: every ``test_every``-th piece of each
    collection is held out (a split by piece, stratified by collection). A piece music21 cannot
    parse or render is left out (and said so) and replaced by the collection's next one. Returns
    the pieces written.

    music21's parsing and MIDI rendering run ahead in ``workers`` processes (default: one per CPU,
    none with one CPU); which pieces are chosen, their split and every byte written are decided by
    the same sequential loop either way, so the output does not depend on ``workers``.
    """
    from ..progress import progress_bar, write_line

    out_dir = Path(out_dir)
    written: List[Piece] = []
    queues = {c.label: shuffled_candidates(c, seed) for c in collections}
    counts = {c.label: 0 for c in collections}
    # Rendering ahead: first the pieces needed if none fails, then one more for each failure.
    renders = _RenderAhead(out_dir, workers)
    ahead = {label: list(queue) for label, queue in queues.items()}
    for label in ahead:
        renders.submit(ahead[label][:per_collection])
        del ahead[label][:per_collection]
    bar = progress_bar(total=per_collection * len(collections), desc="corpus", unit="piece", enabled=progress)
    try:
        # Round robin over the collections; a piece that cannot be rendered is replaced by the next one.
        while any(counts[label] < per_collection and queues[label] for label in queues):
            label = min((l for l in queues if counts[l] < per_collection and queues[l]), key=lambda l: counts[l])
            piece = queues[label].pop(0)
            piece.split = "test" if counts[label] % test_every == test_every - 1 else "train"
            if _write_piece(piece, out_dir, seed, write_line, renders.result(piece)):
                counts[label] += 1
                written.append(piece)
                bar.update(1)
            elif ahead[label]:
                renders.submit([ahead[label].pop(0)])
    finally:
        renders.close()
        bar.close()
    return sorted(written, key=lambda p: p.name)


def render_piece(piece: Piece) -> tuple:
    """music21's work for one piece (run in a worker): ``(facts, MIDI bytes)``, or raises."""
    import tempfile

    from music21 import converter

    if piece.abc_text is not None:
        score = converter.parse(piece.abc_text, format="abc")
        header = piece.abc_text
    else:
        score = converter.parse(str(piece.source))
        header = _musicxml_header(piece.source)
    facts = piece_facts(piece, score, header)
    with tempfile.TemporaryDirectory() as folder:
        midi = Path(folder) / "piece.mid"
        score.write("midi", fp=str(midi))
        return facts, midi.read_bytes()


class _RenderAhead:
    """Futures of :func:`render_piece` by piece name; pieces already on disk (a resumed run) are not rendered."""

    def __init__(self, out_dir: Path, workers: Optional[int]):
        import os

        self.out_dir = out_dir
        workers = (os.cpu_count() or 1) if workers is None else workers
        self.pool = None
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            from ..workers import exit_with_parent

            # exit_with_parent: a quick start killed by SIGKILL (or SIGTERM) must not leave idle workers behind
            self.pool = ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent)
        self.futures: Dict[str, object] = {}

    def submit(self, pieces: Sequence[Piece]) -> None:
        if self.pool is None:
            return
        for piece in pieces:
            on_disk = any(all(p.exists() for p in piece_paths(piece, self.out_dir, split)) for split in ("train", "test"))
            if piece.name not in self.futures and not on_disk:
                try:
                    self.futures[piece.name] = self.pool.submit(render_piece, piece)
                except BrokenProcessPool:  # a worker died: render the rest here (result() does so without a future)
                    self.pool.shutdown(wait=False)
                    self.pool = None
                    return

    def result(self, piece: Piece):
        """A callable giving the piece's render (from its worker, else done here), for :func:`_write_piece`."""
        future = self.futures.pop(piece.name, None)
        if future is None:
            return lambda: render_piece(piece)

        def from_worker():
            try:
                return future.result()
            except BrokenProcessPool:  # a worker died (e.g. out of memory): render it here instead
                return render_piece(piece)
        return from_worker

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def piece_paths(piece: Piece, out_dir: Path, split: str) -> tuple:
    """``(metadata, MIDI, music)`` paths of a piece in ``split``."""
    if piece.abc_text is not None:
        music_path = out_dir / "abc_standard" / split / f"{piece.name}.abc"
    else:
        music_path = out_dir / "xml" / split / f"{piece.name}{piece.source.suffix}"
    return out_dir / "metadata" / split / f"{piece.name}.json", out_dir / "midi" / split / f"{piece.name}.mid", music_path


def _write_piece(piece: Piece, out_dir: Path, seed: int, report, render) -> bool:
    """Write one piece's music, MIDI rendering and metadata; False (and a report) if music21 cannot.

    ``render`` returns :func:`render_piece`'s result (from a worker or done here); it is only
    called when the piece is not on disk yet.
    """
    meta_path, midi_path, music_path = piece_paths(piece, out_dir, piece.split)
    if meta_path.exists() and midi_path.exists() and music_path.exists():
        return True
    remove_partial_files_of([meta_path, midi_path, music_path])  # a run killed while writing them left these
    try:
        piece.facts, midi = render()
    except Exception as error:  # noqa: BLE001 - a piece music21 cannot render is left out
        report(f"skipped {piece.name}: {type(error).__name__}: {error}")
        return False
    with atomic_path(midi_path) as tmp:
        tmp.write_bytes(midi)
    if piece.abc_text is not None:
        atomic_write_text(music_path, piece.abc_text)
    else:
        with atomic_path(music_path) as tmp:
            tmp.write_bytes(piece.source.read_bytes())
    atomic_write_text(meta_path, json.dumps(piece_record(piece, seed), indent=4, ensure_ascii=False))
    return True


def _musicxml_header(path: Path) -> str:
    """Key and meter of a MusicXML score as ABC header lines (from abctoolkit's xml2abc)."""
    from ..convert.abc import xml_to_abc

    try:
        return xml_to_abc(path)
    except Exception:  # noqa: BLE001 - facts are optional
        return ""

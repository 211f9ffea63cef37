"""The quick start (``code/quickstart.py``) and the real music it and the benchmarks are built on.

    pipeline         the steps: corpus → convert → M3 → CLaMP 2 → features → evaluation → report
    demo_corpus      six labelled, described collections from music21's bundled corpus
    music21_corpus   plain music files (MusicXML → ABC/MTF) from music21's corpus, for benchmarks
    audio_render     MIDI → WAV with a General MIDI SoundFont (tests, benchmarks, the CLaMP 3 quick start)
    report           ``report.md``, ``metrics.json`` and the PNG plots
"""

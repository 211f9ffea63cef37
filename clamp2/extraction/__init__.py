"""Feature extraction behind ``code/extract_*.py``, ``process_data/extract_mert.py`` and the API (SPEC §8, SPEC_CLAMP3 §15–16).

    core          windows, their combination, and the batched driver that writes ``.npy`` files
    model_inputs  raw MusicXML/MIDI/ABC/MTF/text → what the models read, as the batch pipeline leaves it
    audio         audio files → float32 24 kHz samples (soundfile, the exact sinc resampler), z-score, 5-s windows
    mert          batched MERT features of audio files (process_data/extract_mert.py, the CLaMP3 API)
"""

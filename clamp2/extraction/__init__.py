"""Feature extraction behind ``code/extract_*.py`` and the API (SPEC §8).

    core          windows, their combination, and the batched driver that writes ``.npy`` files
    model_inputs  raw MusicXML/MIDI/ABC/MTF/text → what the models read, as the batch pipeline leaves it
"""

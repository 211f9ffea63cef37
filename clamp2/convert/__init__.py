"""Format converters of the data pipeline (SPEC §2-3), one file at a time.

- :mod:`clamp2.convert.mtf`: MIDI <-> MIDI Text Format (``midi_to_mtf``, ``mtf_to_midi``).
- :mod:`clamp2.convert.abc`: MusicXML -> ABC -> interleaved ABC -> MusicXML through abctoolkit
  (``xml_to_abc``, ``abc_to_interleaved``, ``interleaved_to_xml``); :mod:`clamp2.convert.abc_repair`
  repairs hand-written tunes abctoolkit cannot split into bars.

Each raises on a file it cannot convert (``ValueError`` with a readable reason, or the reading
library's own error); :mod:`clamp2.convert.batch_runner` runs them over folders. abctoolkit is imported on first
use only.
"""

from clamp2.convert.abc import (
    AbcWarning,
    abc_file_to_interleaved,
    abc_to_interleaved,
    interleaved_file_to_xml,
    interleaved_to_xml,
    xml_to_abc,
)
from clamp2.convert.mtf import (
    line_to_message,
    message_to_line,
    midi_file_to_mtf,
    midi_to_mtf,
    mtf_file_to_midi_bytes,
    mtf_to_midi,
)

__all__ = [
    "AbcWarning", "abc_file_to_interleaved", "abc_to_interleaved", "interleaved_file_to_xml",
    "interleaved_to_xml", "xml_to_abc", "line_to_message", "message_to_line", "midi_file_to_mtf",
    "midi_to_mtf", "mtf_file_to_midi_bytes", "mtf_to_midi",
]

"""CLaMP 2 and CLaMP 3: contrastive language-music pre-training, checkpoint-compatible with the published models.

    from clamp2 import CLaMP2, CLaMP3, M3
    model = CLaMP2.from_pretrained("sander-wood/clamp2")     # see clamp2.api and docs/api.md
    model = CLaMP3.from_pretrained("sander-wood/clamp3", variant="saas")   # docs/clamp3.md

Layout (each layer imports only from the layers above it in this list; ``tests/test_layout.py`` checks it):

    Foundations, used by every script:
        configuration  environment overrides for code/config.py
        cli            one-line usage errors, loading code/config.py
        progress       progress bars that also show in log files
        files          file discovery, output-path mirroring and atomic writes
        distributed    torch.distributed setup, rank/device info, teardown
        checkpoint     strict, weights_only loading and atomic saving of checkpoints
        hub            weights from a local file or folder or a Hugging Face hub id
        attention_arguments  the attention choices and the --attention flag, without torch (a fast --help)
        attention      the attention kernel (sdpa or eager) of every transformer the package builds
        patchilizer    M3 patch tokenizer (bars / MIDI messages as 64-character patches)
        text_model     the XLM-R text encoder/tokenizer from a hub id or a local folder
        loss           symmetric contrastive loss with gather-with-gradient across processes
        data/          package data (the 100 summary languages)
        benchmarking   what benchmarks/ shares: devices' peaks for MFU, the exactness line of a fast path
        workers        worker processes (pools, DataLoader workers) that end with their parent
    models/        one module per model family: common (text tower, pooling), m3, clamp2, clamp3, mert, clamp3
    convert/       process_data/: MusicXML/ABC/interleaved ABC, MIDI/MTF, their parallel batch
                   runner (batch_runner), LLM summaries (summarize)
    extraction/    code/extract_*.py, process_data/extract_mert.py: windows and the batched driver
                   (core); the scripts' flags, without torch (arguments); raw files → model inputs
                   (model_inputs); audio decoding and resampling
                   (audio); batched MERT features (mert)
    training/      code/train_*.py: data, M3 corruption, the one training loop, the tasks, CLaMP 3's
                   shared command line (clamp3); the trainers' flags, without torch (arguments)
    cache          content-hash feature cache (``clamp2-cache info|clear``)
    api            CLaMP2 / CLaMP3 / M3: raw music, audio and text in, features out (importing clamp2 loads no torch)
    search/        semantic_search/: feature store and index, retrieval and metrics, FMD,
                   zero-shot, search from raw files, CLaMP 3's one-command tools, BLIP captions;
                   the search tools' shared flags, without torch (arguments)
    probe/         music_classification/: the linear probes (CLaMP 2's and CLaMP 3's); their defaults,
                   without torch (defaults)
    quickstart/    code/quickstart.py: the pipeline, the demo corpus from music21, audio rendering, the report
"""

import gc as _gc
import os as _os
import sys as _sys

# (this process, the process that started it), read before anything slow is imported (the scripts import clamp2
# first): a launcher killed while its ranks still import torch has orphaned them before distributed.setup watches it.
STARTED_BY = (_os.getpid(), _os.getppid())

# Objects in the collector's permanent generation that the interpreter put there itself, not a caller's gc.freeze:
# CPython 3.12 starts with some of its immortal tuples there (375 in 3.12.1; 3.11 and 3.13 start with none), and
# extraction.core.heap_frozen took them for a caller's, so it never froze the heap on 3.12. Read at import, as
# STARTED_BY: on 3.12 a caller's objects frozen before clamp2 was imported are counted here too.
INTERPRETER_FROZEN = _gc.get_freeze_count() if _sys.version_info[:2] == (3, 12) else 0

__version__ = "0.1.0"

# Loaded on first use so that `import clamp2` stays fast (torch and transformers take seconds).
_LAZY = {"CLaMP2": "api", "CLaMP3": "api", "M3": "api", "Encoded": "api", "EncodeError": "api",
         "cosine_similarity": "api", "FeatureCache": "cache"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

"""CLaMP 2: contrastive language-music pre-training, checkpoint-compatible with the published models.

    from clamp2 import CLaMP2, M3
    model = CLaMP2.from_pretrained("sander-wood/clamp2")     # see clamp2.api and docs/api.md

Modules:
    api            CLaMP2 / M3: raw music and text in, features out (lazy: importing clamp2 loads no torch)
    cache          content-hash feature cache (``clamp2-cache info|clear``)
    inputs         raw MusicXML/MIDI/ABC/MTF/text inputs → what the models read, as the batch pipeline does
    hub            weights from a local file or a Hugging Face hub id
    configuration  environment overrides for code/config.py
    patchilizer    M3 patch tokenizer (bars / MIDI messages as 64-character patches)
    models         M3 patch encoder, token decoder, M3 model, CLaMP 2 model, their configs
    loss           symmetric contrastive loss with gather-with-gradient across processes
    checkpoint     strict, weights_only loading and atomic saving of checkpoints
    text_model     loading the XLM-R text encoder/tokenizer from a hub id or a local folder
    files          file discovery, output-path mirroring and atomic writes
"""

__version__ = "0.1.0"

# Loaded on first use so that `import clamp2` stays fast (torch and transformers take seconds).
_LAZY = {"CLaMP2": "api", "M3": "api", "Encoded": "api", "EncodeError": "api", "cosine_similarity": "api",
         "FeatureCache": "cache"}

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

"""CLaMP 2: contrastive language-music pre-training, checkpoint-compatible with the published models.

Modules:
    configuration  environment overrides for code/config.py
    patchilizer    M3 patch tokenizer (bars / MIDI messages as 64-character patches)
    models         M3 patch encoder, token decoder, M3 model, CLaMP 2 model, their configs
    loss           symmetric contrastive loss with gather-with-gradient across processes
    checkpoint     strict, weights_only loading and atomic saving of checkpoints
    text_model     loading the XLM-R text encoder/tokenizer from a hub id or a local folder
    files          file discovery, output-path mirroring and atomic writes
"""

__version__ = "0.1.0"

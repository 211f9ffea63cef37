"""Extract CLaMP 3 features of text (.txt), symbolic music (.abc interleaved ABC, .mtf) and audio (.npy MERT features).

    python code/extract_clamp3.py <input_dir> <output_dir> [--get_global] [--variant saas|c2] [--epoch E]
                                  [--weights PATH] [--text_model NAME_OR_PATH] [--batch_size B]
                                  [--dtype fp32|bf16|fp16] [--device DEVICE] [--batch_tokens N] [--compile]
    accelerate launch code/extract_clamp3.py <input_dir> <output_dir> --get_global   # files split across processes

Audio is read as MERT features: run process_data/extract_mert.py (MERT's layer mean) on the audio
files first (arrays [1, n, AUDIO_HIDDEN_SIZE]); MIDI as MTF in CLaMP 3's mode
(process_data/batch_midi2mtf.py --clamp3); MusicXML as interleaved ABC (batch_xml2abc.py, then
batch_interleaved_abc.py). With --get_global (alias --normalize) each file gets its global feature,
shape [1, CLAMP3_HIDDEN_SIZE]: the weighted mean of its windows' projected features (not
L2-normalised: use cosine similarity). Without it, the per-position last hidden states [1, L, hidden]
of the text, symbolic or audio encoder (see docs/clamp3.md).

The weights default to config.py's CLAMP3_WEIGHTS_PATH for --variant (saas: best for audio, the
default; c2: best for sheet music and MIDI), or its epoch-E copy with --epoch E. The weights are
never downloaded (the text model is fetched from the hub when missing and online): get the
published files with
    hf download sander-wood/clamp3 <file name> --local-dir .
Existing outputs are skipped (a re-run with other weights or flags is refused, naming the difference:
<output_dir>/extraction_settings.json, docs/extraction.md); failures are listed in
<output_dir>/failed_extract_clamp3.log (failed_extract_clamp3_<process>.log per process under a multi-process
launch); exit status 0 when every file succeeded, 1 when some failed or the CLaMP 3 weights file is missing
(checked after the text model loads), 2 for a usage or model error (a missing text model included).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clamp2.cli import ArgumentParser, launched_with_others, load_script_config
from clamp2.configuration import CLAMP3_VARIANTS, clamp3_weights_name, epoch_weights_path
from clamp2.extraction.arguments import add_common_arguments, check_extraction_arguments, folders_problem

if TYPE_CHECKING:  # annotations only: torch loads once the arguments are parsed
    import torch


def kinds():
    """{extension: runner}: text, symbolic or audio."""
    from clamp2.extraction.core import AUDIO_EXTENSIONS, MUSIC_EXTENSIONS, TEXT_EXTENSIONS

    return {**{ext: "text" for ext in TEXT_EXTENSIONS}, **{ext: "symbolic" for ext in MUSIC_EXTENSIONS},
            **{ext: "audio" for ext in AUDIO_EXTENSIONS}}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--get_global", "--normalize", dest="get_global", action="store_true",
                        help="save one global feature per file [1, CLAMP3_HIDDEN_SIZE] instead of per-position states")
    parser.add_argument("--variant", choices=CLAMP3_VARIANTS, default=None,
                        help="published weights: saas (best for audio) or c2 (best for sheet music and MIDI); "
                             "default: config.py's CLAMP3_VARIANT")
    parser.add_argument("--epoch", type=int, default=None,
                        help="load the checkpoint saved at this epoch (the weights name with _E.pth)")
    parser.add_argument("--text_model", default=None,
                        help="text model hub id or local folder for the tokenizer/architecture (default: config TEXT_MODEL_NAME)")
    args = parser.parse_args(argv)
    check_extraction_arguments(parser, args)
    if args.weights is not None and (args.variant is not None or args.epoch is not None):
        parser.error("--weights names the file itself: it cannot be combined with --variant or --epoch")
    return args


def weights_path(cfg, args) -> Path:
    """The checkpoint to load: --weights, else config.py's name for --variant, or its --epoch copy."""
    if args.weights is not None:
        return args.weights
    if args.variant is None and args.epoch is None:
        name = cfg.CLAMP3_WEIGHTS_PATH  # honours a CLAMP3_WEIGHTS_PATH override
    else:
        name = clamp3_weights_name(cfg, args.variant)
    return Path(epoch_weights_path(name, args.epoch) if args.epoch is not None else name)


def missing_epoch_message(path: Path) -> str:
    return (f"weights file not found: {path}\n  Epoch checkpoints are written by code/train_clamp3_*.py every "
            "SAVE_EVERY epochs (they are not published); drop --epoch to load the published weights.")


def build_clamp3(cfg, weights: Path, text_model_name: str, device: torch.device, epoch=None):
    """CLaMP 3 at config.py's sizes with its weights (the text model is built from its config alone)."""
    from clamp2.checkpoint import load_clamp3_weights, without_random_init
    from clamp2.models.clamp3 import AudioDims, CLaMP3Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import load_text_model, load_tokenizer

    tokenizer = load_tokenizer(text_model_name)
    with without_random_init():  # the strict load below fills every weight
        model = CLaMP3Model(load_text_model(text_model_name, pretrained=False), M3Dims.from_config(cfg),
                            AudioDims.from_config(cfg), hidden_size=cfg.CLAMP3_HIDDEN_SIZE)
    checkpoint = load_clamp3_weights(model, weights, missing_epoch_message(weights) if epoch is not None else None)
    return model.eval().to(device), tokenizer, checkpoint


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = folders_problem(args.input_dir, args.output_dir)
    if problem and not launched_with_others():  # else said once all the launch's processes have met
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import torch

    from clamp2 import attention
    from clamp2.checkpoint import CheckpointNotFound, loaded_message
    from clamp2.extraction import core
    from clamp2.extraction.core import (AudioEncoder, KindRunner, MusicEncoder, TextEncoder, autocast_context,
                                        run_extraction)
    from clamp2.cache import extraction_settings
    from clamp2.patchilizer import PAD_TOKEN_ID, M3Patchilizer

    cfg = load_script_config(__file__)
    weights = weights_path(cfg, args)
    try:
        state, device = core.process_state(args.device)
        problem = core.agreed_problem(problem)  # a node's own folder problem stops every process
        if problem:
            raise ValueError(problem)
        model, tokenizer, checkpoint = build_clamp3(cfg, weights, args.text_model or cfg.TEXT_MODEL_NAME, device,
                                                    args.epoch)
        attention.set_attention(model, args.attention)
        precision = autocast_context(device, args.dtype)
    except CheckpointNotFound as exc:  # as CLaMP 3's reference: a missing CLaMP 3 checkpoint is exit status 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state.process_index == 0:
        print(loaded_message(checkpoint), flush=True)

    def forward(states, global_):
        def run(inputs, masks):
            with precision:
                return global_(inputs, masks) if args.get_global else states(inputs, masks)
        return run

    runners = {
        "text": KindRunner(TextEncoder(tokenizer), forward(model.text_states, model.text_global),
                           cfg.MAX_TEXT_LENGTH, tokenizer.pad_token_id),
        # CLaMP 3 removes every "L:1/8\n", from ABC and MTF alike (docs/clamp3.md).
        "symbolic": KindRunner(MusicEncoder(M3Patchilizer(cfg.PATCH_SIZE, cfg.PATCH_LENGTH), remove_unit_length=True,
                                            also_mtf=True),
                               forward(model.symbolic_states, model.symbolic_global), cfg.PATCH_LENGTH, PAD_TOKEN_ID),
        "audio": KindRunner(AudioEncoder(cfg.AUDIO_HIDDEN_SIZE), forward(model.audio_states, model.audio_global),
                            cfg.MAX_AUDIO_LENGTH, 0.0, dtype=torch.float32),
    }
    def settings():
        return extraction_settings("extract_clamp3", weights, args.get_global, args.dtype,
                                   [cfg.PATCH_SIZE, cfg.PATCH_LENGTH, cfg.MAX_TEXT_LENGTH, cfg.MAX_AUDIO_LENGTH],
                                   tokenizer, model.text_model.config)

    return run_extraction(args, runners, per_position=not args.get_global, include_text=True, device=device,
                          process_index=state.process_index, num_processes=state.num_processes, tool="extract_clamp3",
                          kinds=kinds(), record_settings=settings)


if __name__ == "__main__":
    sys.exit(main())

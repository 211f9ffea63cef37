"""Extract CLaMP 2 features of text (.txt) and music (.abc interleaved ABC, .mtf) files to .npy.

    python code/extract_clamp2.py <input_dir> <output_dir> [--normalize] [--weights PATH]
                                  [--text_model NAME_OR_PATH] [--batch_size B] [--dtype fp32|bf16|fp16]
                                  [--batch_tokens N] [--compile]
    accelerate launch code/extract_clamp2.py <input_dir> <output_dir> --normalize   # files split across processes

With --normalize each file gets its global feature, shape [1, CLAMP2_HIDDEN_SIZE] (the weighted mean
of its windows' projected features; not L2-normalised: use cosine similarity). Without it, the
per-position last hidden states [1, L, hidden] of the text or music encoder (docs/extraction.md).
The weights default to config.py's CLAMP2_WEIGHTS_PATH (download it from the Hugging Face repo
sander-wood/clamp2). Existing outputs are skipped (a re-run with other weights or flags is refused,
naming the difference: <output_dir>/extraction_settings.json, docs/extraction.md); failures are listed in
<output_dir>/failed_extract_clamp2.log (failed_extract_clamp2_<process>.log per process under a multi-process
launch); exit status 0 when every file succeeded, 1 when some failed, 2 for a usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clamp2.cli import ArgumentParser, launched_with_others, load_script_config
from clamp2.extraction.arguments import add_common_arguments, check_extraction_arguments, folders_problem

if TYPE_CHECKING:  # annotations only: torch loads once the arguments are parsed
    import torch


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--normalize", action="store_true",
                        help="save one global feature per file [1, CLAMP2_HIDDEN_SIZE] instead of per-position states")
    parser.add_argument("--text_model", default=None,
                        help="text model hub id or local folder for the tokenizer/architecture (default: config TEXT_MODEL_NAME)")
    args = parser.parse_args(argv)
    check_extraction_arguments(parser, args)
    return args


def build_clamp2(cfg, weights: Path, text_model_name: str, device: torch.device):
    """CLaMP 2 with its weights, its tokenizer and the checkpoint dict; the text model is built from its config
    (the checkpoint holds its weights)."""
    from clamp2.checkpoint import load_model_weights, without_random_init
    from clamp2.models.clamp2 import CLaMP2Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import check_max_text_length, load_text_model, load_tokenizer

    check_max_text_length(text_model_name, cfg.MAX_TEXT_LENGTH)
    tokenizer = load_tokenizer(text_model_name)
    with without_random_init():  # the strict load below fills every weight
        model = CLaMP2Model(load_text_model(text_model_name, pretrained=False), M3Dims.from_config(cfg),
                            hidden_size=cfg.CLAMP2_HIDDEN_SIZE)
    checkpoint = load_model_weights(model, weights)
    return model.eval().to(device), tokenizer, checkpoint


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = folders_problem(args.input_dir, args.output_dir)
    if problem and not launched_with_others():  # else said once all the launch's processes have met
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from clamp2.checkpoint import loaded_message
    from clamp2 import attention
    from clamp2.extraction import core
    from clamp2.extraction.core import KindRunner, MusicEncoder, TextEncoder, autocast_context, run_extraction
    from clamp2.cache import extraction_settings
    from clamp2.patchilizer import PAD_TOKEN_ID, M3Patchilizer

    cfg = load_script_config(__file__)
    weights = args.weights or Path(cfg.CLAMP2_WEIGHTS_PATH)
    try:
        state, device = core.process_state(args.device)
        problem = core.agreed_problem(problem)  # a node's own folder problem stops every process
        if problem:
            raise ValueError(problem)
        model, tokenizer, checkpoint = build_clamp2(cfg, weights, args.text_model or cfg.TEXT_MODEL_NAME, device)
        attention.set_attention(model, args.attention)
        precision = autocast_context(device, args.dtype)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state.process_index == 0:  # the reference's line (it prints it before the strict load)
        print(loaded_message(checkpoint, "CLaMP 2"), flush=True)

    def forward(states, global_):
        def run(ids, masks):
            with precision:
                return global_(ids, masks) if args.normalize else states(ids, masks)
        return run

    runners = {
        "text": KindRunner(TextEncoder(tokenizer), forward(model.text_states, model.text_global),
                           cfg.MAX_TEXT_LENGTH, tokenizer.pad_token_id),
        "music": KindRunner(MusicEncoder(M3Patchilizer(cfg.PATCH_SIZE, cfg.PATCH_LENGTH)),
                            forward(model.music_states, model.music_global), cfg.PATCH_LENGTH, PAD_TOKEN_ID),
    }
    def settings():
        return extraction_settings("extract_clamp2", weights, args.normalize, args.dtype,
                                   [cfg.PATCH_SIZE, cfg.PATCH_LENGTH, cfg.MAX_TEXT_LENGTH], tokenizer,
                                   model.text_model.config)

    return run_extraction(args, runners, per_position=not args.normalize, include_text=True, device=device,
                          process_index=state.process_index, num_processes=state.num_processes, tool="extract_clamp2",
                          record_settings=settings)


if __name__ == "__main__":
    sys.exit(main())

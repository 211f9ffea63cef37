"""Extract M3 per-position features of music files (.abc interleaved ABC, .mtf) to .npy.

    python code/extract_m3.py <input_dir> <output_dir> [--weights PATH] [--batch_size B] [--dtype fp32|bf16|fp16]
                              [--batch_tokens N] [--compile]
    accelerate launch code/extract_m3.py <input_dir> <output_dir>   # files split across processes

Each file gets the last hidden states of the M3 patch encoder, shape [1, L, M3_HIDDEN_SIZE], one row
per patch (special patches included; `L:1/8` lines are removed from ABC first, as the reference
does). The weights default to config.py's M3_WEIGHTS_PATH (download it from the Hugging Face repo
sander-wood/clamp2). Existing outputs are skipped (a re-run with other weights or flags is refused,
naming the difference: <output_dir>/extraction_settings.json, docs/extraction.md); failures are listed in
<output_dir>/failed_extract_m3.log (failed_extract_m3_<process>.log per process under a multi-process
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
    args = parser.parse_args(argv)
    check_extraction_arguments(parser, args)
    return args


def build_m3_encoder(cfg, weights: Path, device: torch.device):
    """The M3 patch encoder, loaded strictly from the ``encoder.*`` entries of an M3 checkpoint, and the
    checkpoint dict."""
    from clamp2.checkpoint import load_model_weights, without_random_init
    from clamp2.models.m3 import M3Dims, M3PatchEncoder

    with without_random_init():  # the strict load below fills every weight
        encoder = M3PatchEncoder(M3Dims.from_config(cfg))
    checkpoint = load_model_weights(encoder, weights, prefix="encoder.")
    return encoder.eval().to(device), checkpoint


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = folders_problem(args.input_dir, args.output_dir)
    if problem and not launched_with_others():  # else said once all the launch's processes have met
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from clamp2.checkpoint import loaded_message
    from clamp2 import attention
    from clamp2.extraction import core
    from clamp2.extraction.core import KindRunner, MusicEncoder, autocast_context, run_extraction
    from clamp2.cache import extraction_settings
    from clamp2.patchilizer import PAD_TOKEN_ID, M3Patchilizer

    cfg = load_script_config(__file__)
    try:
        state, device = core.process_state(args.device)
        problem = core.agreed_problem(problem)  # a node's own folder problem stops every process
        if problem:
            raise ValueError(problem)
        weights = args.weights or Path(cfg.M3_WEIGHTS_PATH)
        encoder, checkpoint = build_m3_encoder(cfg, weights, device)
        attention.set_attention(encoder, args.attention)
        precision = autocast_context(device, args.dtype)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state.process_index == 0:  # the reference's line (its extract_m3.py names no family)
        print(loaded_message(checkpoint, ""), flush=True)

    def forward(ids, masks):
        with precision:
            return encoder(ids, masks)

    patchilizer = M3Patchilizer(cfg.PATCH_SIZE, cfg.PATCH_LENGTH)
    runners = {"music": KindRunner(MusicEncoder(patchilizer, remove_unit_length=True), forward,
                                   cfg.PATCH_LENGTH, PAD_TOKEN_ID)}
    def settings():
        return extraction_settings("extract_m3", weights, False, args.dtype, [cfg.PATCH_SIZE, cfg.PATCH_LENGTH])

    return run_extraction(args, runners, per_position=True, include_text=False, device=device,
                          process_index=state.process_index, num_processes=state.num_processes, tool="extract_m3",
                          record_settings=settings)


if __name__ == "__main__":
    sys.exit(main())

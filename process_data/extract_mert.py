"""Extract MERT-v1-95M features of audio files (.wav .flac .ogg .mp3) to .npy, CLaMP 3's audio input.

    python process_data/extract_mert.py <input_dir> <output_dir> [--model PATH_OR_HUB_ID] [--batch_size B]
                                         [--device DEV] [--dtype fp32|bf16|fp16] [--all_layers]
    accelerate launch process_data/extract_mert.py <input_dir> <output_dir>   # files split across processes

Each file is decoded (libsndfile; MP3 through its mpg123 decoder), its channels averaged, resampled
to 24 kHz, z-scored over the whole track and cut into 5-second windows (a last window under 1 s is
dropped); each window gives the mean over frames and over MERT's 13 hidden states: a [1, n, 768]
float32 array, one row per 5 s (docs/audio.md). --all_layers writes the 13 states, [13, n, 768], for
other uses: CLaMP 3 cannot read that form.

--model is a MERT folder (config.json + pytorch_model.bin or model.safetensors) or a Hugging Face
hub id resolved in the local cache only (default m-a-p/MERT-v1-95M; fetch it once with
`hf download m-a-p/MERT-v1-95M`). MERT-v1-95M is licensed CC-BY-NC-4.0.

Output: <output_dir>/<relative folder>/<stem>.npy; existing outputs are skipped (a re-run resumes;
a re-run with other weights, --all_layers or --dtype is refused: <output_dir>/extraction_settings.json).
Failures (undecodable, empty, shorter than 1 s, NaN or infinite samples, samples too large to z-score
in float32, two inputs for one output) are listed in
<output_dir>/failed_extract_mert.log (failed_extract_mert_<process>.log per process under a
multi-process launch). Exit status: 0 all extracted, 1 some failed, 2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys
from pathlib import Path


def parse_args(argv=None):
    from clamp2.attention_arguments import add_attention_argument
    from clamp2.cli import ArgumentParser
    from clamp2.extraction.arguments import check_extraction_arguments, default_workers

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path, help="folder searched recursively for audio files")
    parser.add_argument("output_dir", type=Path, help="features are written here as <relative folder>/<stem>.npy")
    parser.add_argument("--model", default="m-a-p/MERT-v1-95M",
                        help="MERT folder or Hugging Face hub id, never downloaded (default m-a-p/MERT-v1-95M)")
    parser.add_argument("--batch_size", type=int, default=8, help="5-s windows per forward pass (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: the accelerate process's device)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="compute precision; bf16/fp16 need CUDA (default fp32, exact)")
    parser.add_argument("--all_layers", action="store_true",
                        help="write [13, n, 768] (every hidden state) instead of the layer mean; CLaMP 3 cannot read it")
    parser.add_argument("--num_workers", type=int, default=default_workers(),
                        help="processes that decode and resample files ahead of the model (default: min(4, CPU "
                             "cores - 1); 0: in the main process)")
    parser.add_argument("--resample_on_device", action="store_true",
                        help="workers only decode; resampling to 24 kHz and the z-score run on --device (for a GPU "
                             "whose host cannot decode and resample fast enough; same features up to ~1e-6)")
    add_attention_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="recompute features that already exist")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_extraction_arguments(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.attention import set_attention
    from clamp2.checkpoint import CheckpointError
    from clamp2.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, launched_with_others
    from clamp2.distributed import wait_for_all_processes
    from clamp2.extraction.arguments import folders_problem
    from clamp2.extraction.core import agreed_problem, extract_share, plan_digest, planned_outputs_of, process_state
    from clamp2.extraction.mert import MertFeatureExtractor, extract_folder, plan_audio_jobs, print_summary
    from clamp2.cache import sha256_of_file, user_weights_fingerprint
    from clamp2.extraction.record import RECORD_NAME, begin_record, drop_stale_features, finish_record
    from clamp2.files import finished_output
    from clamp2.models.mert import load_mert, resolve_mert_folder, weights_file

    problem = folders_problem(args.input_dir, args.output_dir)
    plan = None
    if not problem:
        plan = plan_audio_jobs(args.input_dir, args.output_dir)
        if not plan.jobs and not plan.failures:
            problem = f"no audio files (.wav, .flac, .ogg, .mp3) under {args.input_dir}"
    if problem and not launched_with_others():  # else said once all the launch's processes have met
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Every process shards its own listing: they must agree on it (and on a problem), or stop together.
        state, device = process_state(args.device)
        problem = agreed_problem(problem, plan_digest(plan, args.input_dir) if plan else None, args.output_dir)
        if problem:
            raise ValueError(problem)
        model = set_attention(load_mert(args.model, device), args.attention)
        extractor = MertFeatureExtractor(model, device, args.dtype, args.batch_size, all_layers=args.all_layers,
                                         resample_on_device=args.resample_on_device)
    except (OSError, RuntimeError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    def settings():  # what the features depend on (--resample_on_device: the same up to ~1e-6)
        folder = resolve_mert_folder(args.model)
        return {"tool": "extract_mert", "weights_sha256": user_weights_fingerprint(weights_file(folder)),
                "config_sha256": sha256_of_file(folder / "config.json"),
                "features": "every layer" if args.all_layers else "layer mean", "dtype": args.dtype}

    record = begin_record(args.output_dir, settings, args.overwrite,
                          lambda: any(finished_output(job.output) for job in plan.jobs), state.process_index)
    if record.problem:
        if state.process_index == 0:
            print(f"error: {record.problem}", file=sys.stderr)
        return EXIT_USAGE
    run = extract_share(lambda: extract_folder(extractor, args.input_dir, args.output_dir, overwrite=args.overwrite,
                                               num_workers=args.num_workers, process_index=state.process_index,
                                               num_processes=state.num_processes, progress=not args.no_progress,
                                               plan=plan),
                        "extract_mert", state.process_index, state.num_processes)
    if run is None:  # a full disk, said
        wait_for_all_processes(done=False)
        return EXIT_SOME_FAILED
    outputs = {job.path: job.output for job in plan.jobs}
    drop_stale_features(record, (outputs[path] for path, _ in run.failures if path in outputs))
    if state.process_index == 0:  # inputs sharing one output: its feature is of the old settings
        drop_stale_features(record, planned_outputs_of(plan.failures, args.input_dir, args.output_dir))
    print_summary(run, process_index=state.process_index, num_processes=state.num_processes)
    # A process that exits 1 first must not make torchrun stop the others.
    every_share_done = wait_for_all_processes()
    try:
        finish_record(record, args.output_dir, every_share_done, state.process_index)
    except OSError as exc:
        print(f"error: cannot write {args.output_dir / RECORD_NAME}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_SOME_FAILED if run.failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

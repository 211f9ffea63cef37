"""The search tools' shared flags, without torch: ``semantic_search/*.py`` define their options from here,
so ``--help`` and usage errors answer before torch loads.
"""

from __future__ import annotations


def add_compute_arguments(parser) -> None:
    """``--device``, ``--memory_mb`` and ``--no_progress``; ``--device`` is None until
    :func:`resolve_compute_arguments` gives it its default after parsing (torch is needed to see a GPU)."""
    parser.add_argument("--device", default=None,
                        help="where the matrix products run: cpu or cuda (default: cuda when available); "
                             "results are identical")
    parser.add_argument("--memory_mb", type=float, default=None,
                        help="memory for one block of scores (default: 256 on CPU, 4096 on CUDA)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (shown only for long runs)")


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu`` (the numbers are the same on both)."""
    import torch  # only when called: defining the flags needs no torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_arguments(args):
    """``args`` with ``--device`` defaulted to :func:`default_device`; call it once the arguments are parsed
    (defining the flags needs no torch, choosing the device does)."""
    if args.device is None:
        args.device = default_device()
    return args

"""The attention choice of every transformer the package builds and the ``--attention`` flag, without torch.

Scripts and models import these names from here so that ``--help`` and usage errors never load torch;
:mod:`clamp2.attention` applies the choice (:func:`~clamp2.attention.set_attention`).
"""

from __future__ import annotations

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# What every constructor and loader of the package passes to transformers.
ATTN_IMPLEMENTATION = "sdpa"


def check_attention(implementation: str) -> str:
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    return implementation


def add_attention_argument(parser) -> None:
    """``--attention sdpa|eager`` of the extraction scripts (applied with :func:`clamp2.attention.set_attention`)."""
    parser.add_argument("--attention", choices=ATTN_IMPLEMENTATIONS, default=ATTN_IMPLEMENTATION,
                        help="attention kernel: sdpa (PyTorch's fused kernels, default) or eager (the original's "
                             "written-out softmax; same features in fp32 up to ~5e-7)")

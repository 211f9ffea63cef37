"""The model families, one module each, with the published checkpoints' state-dict layouts.

    common   pooling (masked mean), parameter counts, layer counts read from a state dict
    m3       M3: patch encoder + token decoder (SPEC §5); the patch encoder is shared by CLaMP 2 and 3
    clamp2   CLaMP 2: XLM-R + M3 patch encoder, each projected into the joint space (SPEC §6)
"""

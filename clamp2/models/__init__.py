"""The model families, one module each, with the published checkpoints' state-dict layouts.

    common   the text tower and pooling shared by CLaMP 2 and 3 (JointSpaceModel), parameter and layer counts
    m3       M3: patch encoder + token decoder (SPEC §5); the patch encoder is shared by CLaMP 2 and 3
    clamp2   CLaMP 2: XLM-R + M3 patch encoder, each projected into the joint space (SPEC §6)
    clamp3   CLaMP 3: XLM-R + M3 patch encoder + an audio BERT over MERT features (SPEC_CLAMP3 §13)
    mert     MERT-v1-95M as transformers' HubertModel: config, loading (legacy weight-norm names), FLOPs
"""

"""What the benchmarks share: the devices' peaks for MFU, and the exactness line of a fast path.

Model FLOPs are counted where the models live (``clamp2.models.common.transformer_flops``,
``clamp2.models.mert.forward_flops``); this module turns them into an MFU and compares features.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch

# Dense tensor-core peaks in TFLOP/s by device name (bf16/fp16), and fp32 without TF32; NVIDIA's
# datasheets, whose bf16 figures are with sparsity (twice these). The first key found in the device's
# name wins, so the PCIe and NVL cards (lower clocks and power) come before the SXM ones.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def device_peak_tflops(device: torch.device, dtype: str, given: Optional[float] = None) -> Optional[float]:
    """The peak an MFU is measured against: ``given`` (``--peak_tflops``), else the table's by CUDA device
    name; None on the CPU or an unknown device (the benches then print TFLOP/s alone)."""
    if given or torch.device(device).type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def deviation(pairs: Iterable[Tuple[np.ndarray, np.ndarray]]) -> str:
    """Largest |difference| and smallest cosine over pairs of features (reference, candidate), each pair
    compared as one flat vector in float64."""
    worst, cosine = 0.0, 1.0
    for reference, candidate in pairs:
        a = np.asarray(reference, dtype=np.float64).ravel()
        b = np.asarray(candidate, dtype=np.float64).ravel()
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
        cosine = min(cosine, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return f"max |Δ| {worst:.2e}, cosine ≥ {cosine:.6f}"

"""clamp2.benchmarking: the MFU peaks and the exactness line every bench prints."""

import numpy as np
import torch

from clamp2.benchmarking import PEAK_TFLOPS, device_peak_tflops, deviation


def test_deviation_is_the_largest_difference_and_the_smallest_cosine_over_all_pairs():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    same = deviation([(a, a.copy())])
    assert same == "max |Δ| 0.00e+00, cosine ≥ 1.000000"
    turned = np.array([1.0, 1.0], dtype=np.float32)  # 45° from [1, 0]: cosine 0.707107, |Δ| 1
    line = deviation([(a, a + 0.25), (np.array([1.0, 0.0]), turned)])
    assert line == "max |Δ| 1.00e+00, cosine ≥ 0.707107"


def test_peak_is_the_given_one_else_none_on_the_cpu():
    assert device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "fp32", given=12.5) == 12.5
    # bf16 and fp16 share the tensor-core peak; fp32 (no TF32) is far below it.
    for peaks in PEAK_TFLOPS.values():
        assert peaks["bf16"] == peaks["fp16"] > peaks["fp32"]

"""Shared by the op tests: devices to run on and the dtype -> tolerance table."""

import pytest
import torch

CUDA = torch.cuda.is_available()

# Devices every op test runs on; CUDA cases carry the `cuda` marker and are skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")])]

# Relative tolerance per dtype for kernels that compute in float32 (float64 for float64) and round
# once on output: about 4 ulps of the output dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_rel(actual, expected, dtype, what="", rtol=None):
    """|actual - expected| <= rtol * (|expected| + max|expected|): relative per element, with an absolute floor
    scaled to the tensor's magnitude, because outputs are rounded to `dtype` once. `rtol` overrides RTOL[dtype]
    for ops whose documented error is larger (e.g. chained GEMMs)."""
    rtol = RTOL[dtype] if rtol is None else rtol
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-300, msg=lambda m: f"{what}: {m}")

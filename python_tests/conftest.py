import pytest
import torch

import raphael_ext  # noqa: F401  (registers the ops)

CUDA = torch.cuda.is_available()

# Devices every op test runs on; CUDA cases carry the `cuda` marker and are skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")])]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")

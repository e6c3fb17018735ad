import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET when it defines its
# own @jit functions, i.e. the first time anything imports triton (diffusers does, through torch._dynamo), so it is
# set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import raphael_ext  # noqa: E402,F401  (loads the extension and registers the ops before any test)

# Under pytest-xdist (`make test`) the workers share the cores instead of oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")

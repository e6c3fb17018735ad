"""Focal loss forward+backward: raphael_ext vs torchvision eager vs torch.compile of torchvision (docs/kernels.md).

Goals (read from the table, not asserted): CPU at 16.8 M fp32 >= 1.5x torch.compile; GPU >= 85 % of the
device-to-device copy bandwidth over the bytes the op must move (the `copy (same bytes)` row), >= 5x eager,
>= 1.2x torch.compile.
"""

import pytest
import torch

from raphael_ext.ops import sigmoid_focal_loss

torchvision_ops = pytest.importorskip("torchvision.ops")

CUDA = torch.cuda.is_available()
SIZES = [262_144, 16_777_216]
CASES = [("cpu", torch.float32)]
if CUDA:
    CASES += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
PROVIDERS = ["raphael_ext", "torchvision", "torchvision+torch.compile", "copy (same bytes)"]

_compiled = {}


def torchvision_compiled():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(torchvision_ops.sigmoid_focal_loss, dynamic=False)
    return _compiled["fn"]


def bytes_moved(n: int, dtype: torch.dtype) -> int:
    """Forward reads logits and targets and writes dloss; backward reads dloss and writes the gradient."""
    return 5 * n * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_focal_loss_forward_backward(run, benchmark, device, dtype, n, provider):
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, device=device, dtype=dtype, generator=generator).requires_grad_()
    targets = (torch.rand(n, device=device, generator=generator) > 0.9).to(dtype)
    moved = bytes_moved(n, dtype)

    if provider == "copy (same bytes)":
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)

        def step():
            dst.copy_(src)
    else:
        loss_fn = {
            "raphael_ext": sigmoid_focal_loss,
            "torchvision": torchvision_ops.sigmoid_focal_loss,
            "torchvision+torch.compile": torchvision_compiled(),
        }[provider]

        def step():
            loss = loss_fn(logits, targets, 0.5, 2.0, "mean")
            torch.autograd.grad(loss, logits)

    benchmark.group = f"focal_loss fwd+bwd {device} {str(dtype).replace('torch.', '')} n={n}"
    benchmark.extra_info.update(group=benchmark.group, provider=provider, bytes=moved, n=n, device=device)
    benchmark.extra_info["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    slow = device == "cpu" and n > 1_000_000
    run(step, device, rounds=3 if slow else 20, warmup=1 if slow else 3)

"""time_moe (docs/kernels.md) against a float64 loop over samples."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raphael_ext.ops import time_moe

from helpers import DEVICES, assert_close_rel
from moe_helpers import make_experts, moe_rtol, naive_time_moe, randn, to_reference

OP = torch.ops.raphael_ext.time_moe.default
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, N, C, F_, E, dtype, device, seed=0, route=None):
    g = torch.Generator().manual_seed(seed)
    x = randn((B, N, C), dtype, device, g)
    route = torch.randint(0, E, (B,), generator=g) if route is None else torch.tensor(route)
    return x, route.to(device), *make_experts(E, C, F_, dtype, device, seed + 1)


def check(inputs, recompute=False):
    x, route, *weights = inputs
    dtype, device = x.dtype, x.device
    rtol = moe_rtol(dtype, device)
    ours = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    out = time_moe(ours[0], route, *ours[1:], recompute=recompute)
    ref = to_reference(x, *weights)
    expected = naive_time_moe(ref[0], route.cpu(), *ref[1:])
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, expected, dtype, "y", rtol=rtol)
    grad = randn(x.shape, dtype, "cpu", torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, ours, grad.to(device))
    want = torch.autograd.grad(expected, ref, grad.double(), allow_unused=True)
    for name, g_, w in zip(("x", "w1", "b1", "w2", "b2"), got, want):
        assert_close_rel(g_, torch.zeros_like(g_, dtype=torch.float64) if w is None else w, dtype, f"d{name}", rtol=rtol)


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_per_sample_loop(device, dtype, recompute):
    check(make_inputs(5, 17, 16, 24, 4, dtype, device, route=[3, 0, 3, 1, 0]), recompute)  # expert 2 unused


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_recomputes_the_first_gemm_only_when_asked(device, recompute):
    """Saving, the backward reads the first GEMM's output from the forward; recomputing, it runs that GEMM again. On
    the GPU the backward's grouped GEMMs are counted (2 against 3); on the CPU, where time_moe is space_moe with one
    text token per sample, the pre-activations space_moe's backward is handed (the forward's, or none). Both modes
    give the same gradients."""
    x, route, *weights = make_inputs(4, 6, 8, 12, 3, torch.float64, device, route=[2, 0, 2, 1])
    args = [t.clone().requires_grad_() for t in (x, *weights)]
    out = time_moe(args[0], route, *args[1:], recompute=recompute)
    with OpCalls() as calls:
        grads = torch.autograd.grad(out, args, torch.ones_like(out))
    if device == "cpu":
        (backward_args,) = calls[torch.ops.raphael_ext.space_moe_backward.default]
        hidden = backward_args[-1]
        assert hidden is None if recompute else hidden.shape == (4 * 6, 12)
    else:
        assert len(calls[torch.ops.raphael_ext.grouped_gemm.default]) == (3 if recompute else 2)
    reference = [t.clone().requires_grad_() for t in (x, *weights)]
    expected = torch.autograd.grad(time_moe(reference[0], route, *reference[1:], recompute=not recompute), reference,
                                   torch.ones_like(out))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


class OpCalls(TorchDispatchMode):
    """The arguments of every op call that reaches the dispatcher's kernels, by op."""

    def __enter__(self):
        self.calls = collections.defaultdict(list)
        super().__enter__()
        return self.calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func].append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [dict(B=1, N=1, E=1), dict(B=3, N=4, E=6), dict(B=0, N=4, E=2), dict(B=2, N=0, E=2)])
def test_edge_cases(device, case):
    check(make_inputs(case["B"], case["N"], 8, 12, case["E"], torch.float64, device))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, route, w1, b1, w2, b2 = make_inputs(4, 9, 8, 16, 3, torch.float32, device, route=[2, 2, 0, 1])
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    w2_nc = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_nc.is_contiguous() and not w2_nc.is_contiguous()
    check((x_nc, route.int(), w1, b1, w2_nc, b2))


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_gradcheck_float64(recompute):
    x, route, *weights = make_inputs(3, 4, 3, 5, 3, torch.float64, "cpu", route=[1, 1, 0])
    args = [t.clone().requires_grad_() for t in (x, *weights)]
    assert torch.autograd.gradcheck(lambda x, *w: time_moe(x, route, *w, recompute=recompute), args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, route, *weights = make_inputs(3, 5, 8, 8, 2, torch.float32, device)
    torch.library.opcheck(OP, (x, route, *weights))
    for recompute in (False, True):
        torch.library.opcheck(OP, (x.requires_grad_(), route, *[w.requires_grad_() for w in weights], recompute))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, route, *weights = make_inputs(4, 6, 8, 8, 3, torch.float32, device)

    def step(x, *w):
        return time_moe(x, route, *w).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_args = [t.clone().requires_grad_() for t in (x, *weights)]
    compiled_args = [t.clone().requires_grad_() for t in (x, *weights)]
    eager, out = step(*eager_args), compiled(*compiled_args)
    eager.backward()
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(compiled_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_arguments_name_the_argument():
    x, route, w1, b1, w2, b2 = make_inputs(3, 4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"route must hold expert indices in \[0, E = 2\)"):
        time_moe(x, torch.tensor([0, 2, 1]), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"route must hold expert indices in \[0, E = 2\)"):
        time_moe(x, torch.tensor([0, -1, 1]), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"route must have shape \[B\]"):
        time_moe(x, route[:2], w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="route must be int32 or int64"):
        time_moe(x, route.float(), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"w1 must have shape \[E, C, F\]"):
        time_moe(x, route, w1[:, :7], b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"b2 must have shape \[E, C\]"):
        time_moe(x, route, w1, b1, w2, b2[:1])
    with pytest.raises(RuntimeError, match="w2 must have the dtype of x"):
        time_moe(x, route, w1, b1, w2.double(), b2)
    with pytest.raises(RuntimeError, match="x must have 3 dimensions"):
        time_moe(x[0], route, w1, b1, w2, b2)

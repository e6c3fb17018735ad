"""sigmoid_focal_loss (docs/kernels.md) against an independent float64 implementation of torchvision's formula."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import raphael_ext
from raphael_ext.nn import EdgeFocalLoss
from raphael_ext.ops import sigmoid_focal_loss

from helpers import CUDA, DEVICES, RTOL, assert_close_rel

OP = torch.ops.raphael_ext.sigmoid_focal_loss.default

DTYPES_CPU = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def reference(logits, targets, alpha=0.5, gamma=2.0, reduction="mean", sample_mask=None):
    """torchvision.ops.sigmoid_focal_loss, rewritten here in float64, plus the sample_mask contract."""
    x, t = logits.double(), targets.double()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    counted = loss.numel()
    if sample_mask is not None:
        keep = sample_mask.to(loss.device).view(-1, *[1] * (loss.dim() - 1))
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        counted = int(sample_mask.sum()) * (loss[0].numel() if loss.shape[0] else 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted if counted else loss.sum() * 0


def make_inputs(shape, dtype, device, scale=4.0, seed=0, hard=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.rand(shape, generator=g, dtype=torch.float64)
    targets = (targets > 0.7).to(dtype) if hard else targets.to(dtype)
    return logits.to(device), targets.to(device)


def check_against_reference(logits, targets, alpha, gamma, reduction, sample_mask=None, grad_scale=1.0):
    """Loss and gradient against the float64 reference. grad_scale multiplies the output gradient, as an AMP loss
    scale does: a 'mean' over N elements has gradients of order 1/N, which in float16 are subnormal (steps of
    6e-8) from N ~ 2^14 on, so no implementation can meet a relative tolerance there without one."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    loss = sigmoid_focal_loss(x, targets, alpha, gamma, reduction, sample_mask)
    x_ref = logits.detach().double().cpu().requires_grad_()
    mask_ref = None if sample_mask is None else sample_mask.cpu()
    loss_ref = reference(x_ref, targets.cpu(), alpha, gamma, reduction, mask_ref)
    assert loss.dtype == dtype and loss.shape == loss_ref.shape
    assert_close_rel(loss, loss_ref, dtype, "loss")
    grad_out = torch.randn(loss_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * grad_scale
    grad_out = grad_out.to(dtype).double()  # what the kernel sees, so only the kernel's rounding is measured
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(dtype).to(logits.device))
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref, grad_out)
    assert grad.dtype == dtype
    assert_close_rel(grad, grad_ref, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,gamma", [(0.5, 2.0), (0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 1.0), (0.5, 1.5), (0.5, 3.7)])
def test_matches_reference(device, dtype, reduction, alpha, gamma):
    logits, targets = make_inputs((3, 5, 67), dtype, device)  # 1005 elements: vector body and scalar tail
    check_against_reference(logits, targets, alpha, gamma, reduction)


def test_same_value_as_torchvision():
    torchvision_ops = pytest.importorskip("torchvision.ops")
    logits, targets = make_inputs((4, 333), torch.float64, "cpu", hard=True)
    for reduction in ("none", "mean", "sum"):
        for alpha in (0.25, -1):
            expected = torchvision_ops.sigmoid_focal_loss(logits, targets, alpha, 2.0, reduction)
            torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, 2.0, reduction), expected)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 37), min_size=1, max_size=3),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    alpha=st.sampled_from([-1.0, 0.0, 0.3, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5]),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(device, shape, reduction, alpha, gamma, use_mask, seed):
    logits, targets = make_inputs(tuple(shape), torch.float32, device, seed=seed)
    mask = None
    if use_mask:
        mask = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) > 0.5
        mask = mask.to(device)
    check_against_reference(logits, targets, alpha, gamma, reduction, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_extreme_logits_are_finite(device, dtype, gamma):
    big = 1e4
    logits = torch.tensor([-big, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, big] * 3, dtype=dtype, device=device)
    targets = torch.tensor([0.0] * 9 + [1.0] * 9 + [0.5] * 9, dtype=dtype, device=device)
    x = logits.clone().requires_grad_()
    loss = sigmoid_focal_loss(x, targets, 0.5, gamma, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert_close_rel(loss, reference(logits, targets, 0.5, gamma, "none"), dtype, "loss")
    # A confidently correct prediction costs (almost) nothing; a confidently wrong one costs ~alpha * |x|.
    assert 0.0 <= loss[0].item() < 1e-30 and 0.0 <= loss[17].item() < 1e-30
    assert loss[8].item() == pytest.approx(0.5 * big, rel=RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gamma_zero_is_weighted_bce(device):
    logits, targets = make_inputs((7, 129), torch.float32, device)
    weights = 0.3 * targets + 0.7 * (1 - targets)
    expected = (weights * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")).mean()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.3, 0.0), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 4)])
def test_empty_input(device, shape):
    logits = torch.zeros(shape, device=device, requires_grad=True)
    targets = torch.zeros(shape, device=device)
    for reduction in ("mean", "sum"):
        loss = sigmoid_focal_loss(logits, targets, reduction=reduction)
        assert loss.shape == () and loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.shape == shape
    assert sigmoid_focal_loss(logits, targets, reduction="none").shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_mask_drops_whole_samples(device, dtype):
    logits, targets = make_inputs((6, 3, 11), dtype, device)
    mask = torch.tensor([True, False, True, True, False, False], device=device)
    kept = mask.nonzero().squeeze(1)
    for reduction in ("mean", "sum"):
        expected = sigmoid_focal_loss(logits[kept], targets[kept], reduction=reduction)
        assert_close_rel(sigmoid_focal_loss(logits, targets, reduction=reduction, sample_mask=mask), expected, dtype)
    x = logits.clone().requires_grad_()
    sigmoid_focal_loss(x, targets, sample_mask=mask).backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()
    loss_none = sigmoid_focal_loss(logits, targets, reduction="none", sample_mask=mask)
    assert (loss_none[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample_shape", [(1,), (3,), (8,), (9,), (2, 17)])
def test_sample_mask_boundaries(device, per_sample_shape):
    """Samples smaller than, equal to and larger than a vector of 8 elements (the kernels' packet sizes)."""
    batch = 13
    logits, targets = make_inputs((batch, *per_sample_shape), torch.float32, device, seed=3)
    mask = torch.arange(batch, device=device) % 3 != 1
    check_against_reference(logits, targets, 0.5, 2.0, "none", mask)
    check_against_reference(logits, targets, 0.5, 2.0, "mean", mask)


@pytest.mark.parametrize("device", DEVICES)
def test_all_samples_masked(device):
    logits, targets = make_inputs((4, 50), torch.float32, device)
    x = logits.clone().requires_grad_()
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    loss = sigmoid_focal_loss(x, targets, sample_mask=mask)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    logits, targets = make_inputs((40, 30), torch.float32, device)
    x_view, t_view = logits.t(), targets[:, ::1].t()  # transposed
    x_step, t_step = logits[::2, 1::3], targets[::2, 1::3]  # strided, offset
    for x, t in ((x_view, t_view), (x_step, t_step), (logits[1:], targets[1:])):
        assert not x.is_contiguous() or x.storage_offset() > 0
        check_against_reference(x, t, 0.5, 2.0, "none")
        check_against_reference(x, t, 0.5, 2.0, "mean")


@pytest.mark.parametrize("device", DEVICES)
def test_targets_of_another_dtype_are_cast(device):
    logits, targets = make_inputs((5, 20), torch.float32, device, hard=True)
    expected = sigmoid_focal_loss(logits, targets)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets.bool()), expected)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets.double()), expected)


def test_many_chunks_and_thread_independence():
    """More elements than one parallel chunk: the result is the same, bit for bit, for 1 or more threads."""
    logits, targets = make_inputs((3, 100_003), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sigmoid_focal_loss(logits, targets)
        torch.set_num_threads(max(2, threads))
        multi = sigmoid_focal_loss(logits, targets)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)
    assert_close_rel(single, reference(logits, targets), torch.float32)


def test_gradcheck_float64():
    logits, targets = make_inputs((3, 7), torch.float64, "cpu")
    mask = torch.tensor([True, False, True])
    for reduction in ("none", "mean", "sum"):
        for gamma in (2.0, 1.5, 0.0):
            for sample_mask in (None, mask):
                x = logits.clone().requires_grad_()
                assert torch.autograd.gradcheck(
                    lambda x: sigmoid_focal_loss(x, targets, 0.25, gamma, reduction, sample_mask), (x,)
                )


def test_double_backward_is_refused():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.rand(5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_backward_twice_with_retain_graph():
    x = torch.randn(6, requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.rand(6))
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulates_into_leaf(device):
    """loss.backward() over two forwards adds the gradients."""
    logits, targets = make_inputs((3, 50), torch.float32, device)
    x = logits.clone().requires_grad_()
    sigmoid_focal_loss(x, targets).backward()
    once = x.grad.clone()
    sigmoid_focal_loss(x, targets).backward()
    torch.testing.assert_close(x.grad, 2 * once)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, targets = make_inputs((4, 6, 5), torch.float32, device)
    mask = torch.tensor([True, False, True, True], device=device)
    cases = [
        (logits, targets, 0.5, 2.0, "mean", None),
        (logits, targets, -1.0, 1.5, "none", None),
        (logits.requires_grad_(), targets, 0.25, 2.0, "sum", mask),
        (logits[:, ::2].detach().requires_grad_(), targets[:, ::2], 0.5, 0.0, "mean", mask),
    ]
    for args in cases:
        torch.library.opcheck(OP, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    logits, targets = make_inputs((4, 200), torch.float32, device)
    mask = torch.tensor([True, True, False, True], device=device)

    def step(x, t, m):
        return sigmoid_focal_loss(x, t, 0.25, 2.0, "mean", m) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x_eager, x_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = step(x_eager, targets, mask)
    out = compiled(x_compiled, targets, mask)
    eager.backward()
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_torch_compile_inductor_cpu():
    """Inductor on CPU (C++ codegen) treats the op as an extern kernel; checked once as it compiles slowly."""
    torch._dynamo.reset()
    logits, targets = make_inputs((2, 64), torch.float32, "cpu")
    compiled = torch.compile(lambda x, t: sigmoid_focal_loss(x, t, reduction="sum"), fullgraph=True)
    torch.testing.assert_close(compiled(logits, targets), sigmoid_focal_loss(logits, targets, reduction="sum"))


def test_meta_tensors():
    logits = torch.empty(3, 4, device="meta")
    loss, dloss, norm = OP(logits, torch.empty(3, 4, device="meta"), 0.5, 2.0, "none", None)
    assert loss.shape == (3, 4) and dloss.shape == (3, 4) and norm.shape == () and norm.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_the_argument(device):
    logits, targets = make_inputs((4, 5), torch.float32, device)
    with pytest.raises(RuntimeError, match="targets must have the shape of logits"):
        sigmoid_focal_loss(logits, targets[:, :4])
    with pytest.raises(RuntimeError, match="logits must be float32"):
        sigmoid_focal_loss(logits.int(), targets.int())
    with pytest.raises(ValueError, match="reduction must be"):
        sigmoid_focal_loss(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be"):
        sigmoid_focal_loss(logits, targets, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        sigmoid_focal_loss(logits, targets, alpha=1.5)
    with pytest.raises(RuntimeError, match="sample_mask must have shape"):
        sigmoid_focal_loss(logits, targets, sample_mask=torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="sample_mask must be Bool"):
        sigmoid_focal_loss(logits, targets, sample_mask=torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="sample_mask needs logits with a batch dimension"):
        sigmoid_focal_loss(logits[0, 0], targets[0, 0], sample_mask=torch.ones(1, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="targets must have the dtype of logits"):
        OP(logits, targets.double(), 0.5, 2.0, "mean", None)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_device_mismatch():
    logits, targets = make_inputs((4, 5), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="targets must be on the device of logits"):
        sigmoid_focal_loss(logits, targets.cpu())
    with pytest.raises(RuntimeError, match="sample_mask must be on the device of logits"):
        sigmoid_focal_loss(logits, targets, sample_mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_large_and_misaligned(device, dtype, offset):
    """2^20 + 5 elements (many blocks, packet tail), starting at an offset that breaks 16-byte alignment. 'mean'
    takes a loss scale of 2^16 (AMP's default), which keeps its ~1/N gradients out of float16's subnormals."""
    logits, targets = make_inputs((2 ** 20 + 5 + offset,), dtype, device, seed=5)
    logits, targets = logits[offset:], targets[offset:]
    check_against_reference(logits, targets, 0.5, 2.0, "mean", grad_scale=2.0 ** 16)
    check_against_reference(logits, targets, 0.5, 2.0, "none")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_deterministic_and_graph_capturable():
    logits, targets = make_inputs((64, 4096), torch.float32, "cuda")
    mask = torch.arange(64, device="cuda") % 2 == 0
    first = sigmoid_focal_loss(logits, targets, sample_mask=mask)
    assert torch.equal(first, sigmoid_focal_loss(logits, targets, sample_mask=mask))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sigmoid_focal_loss(logits, targets, sample_mask=mask)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


def test_pybind11_entry_point_keeps_autograd():
    logits, targets = make_inputs((3, 40), torch.float64, "cpu")
    x = logits.clone().requires_grad_()
    loss = raphael_ext._C.sigmoid_focal_loss(x, targets, alpha=0.25, reduction="sum")
    loss.backward()
    x_ref = logits.clone().requires_grad_()
    sigmoid_focal_loss(x_ref, targets, alpha=0.25, reduction="sum").backward()
    torch.testing.assert_close(loss, sigmoid_focal_loss(logits, targets, alpha=0.25, reduction="sum"))
    torch.testing.assert_close(x.grad, x_ref.grad)


class TestEdgeFocalLoss:
    def test_gate_keeps_only_early_timesteps(self):
        logits, targets = make_inputs((4, 1, 16, 16), torch.float32, "cpu")
        timesteps = torch.tensor([10, 500, 501, 999])
        loss = EdgeFocalLoss(t_cutoff=500)(logits, targets, timesteps)
        torch.testing.assert_close(loss, sigmoid_focal_loss(logits[:2], targets[:2], 0.5, 2.0))

    def test_no_early_sample_gives_zero_and_no_gradient(self):
        logits, targets = make_inputs((2, 1, 8, 8), torch.float32, "cpu")
        x = logits.clone().requires_grad_()
        loss = EdgeFocalLoss()(x, targets, torch.tensor([700, 999]))
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all()

    def test_timesteps_shape_is_checked(self):
        logits, targets = make_inputs((2, 4), torch.float32, "cpu")
        with pytest.raises(ValueError, match="timesteps must have shape"):
            EdgeFocalLoss()(logits, targets, torch.tensor([1, 2, 3]))


def test_build_info():
    info = raphael_ext.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert isinstance(info["cpu_avx2"], bool) and isinstance(info["cpu_avx512"], bool)
    assert info["cpu_avx2"] or not info["cpu_avx512"]
    if info["cuda"] is not None:
        assert info["cuda_archs"], "a CUDA build must list the archs it holds"
        assert all(arch.isdigit() for arch in info["cuda_archs"])
    assert isinstance(info["sm90a_kernels"], bool)
    if info["sm90a_kernels"]:  # sm_90a device code is reported as 900 in __CUDA_ARCH_LIST__
        assert "900" in info["cuda_archs"] and info["cutlass"] is not None
    assert info["runtime"]["cuda_available"] == torch.cuda.is_available()

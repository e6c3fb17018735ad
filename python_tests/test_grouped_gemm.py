"""grouped_gemm (docs/kernels.md) against a float64 loop over groups and torch.nn.functional.grouped_mm."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ext.ops import grouped_gemm

from helpers import CUDA, DEVICES, assert_close_rel
from moe_helpers import MOE_RTOL, TF32_RTOL, grouped_reference, moe_rtol, randn

OP = torch.ops.raphael_ext.grouped_gemm.default
WEIGHT_GRAD_OP = torch.ops.raphael_ext.grouped_gemm_weight_grad.default
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_inputs(sizes, K, N, dtype, device, seed=0, tail=0, bias=True):
    """Groups of the given row counts (0 = empty), then `tail` rows past offsets[-1]."""
    g = torch.Generator().manual_seed(seed)
    T, E = sum(sizes) + tail, len(sizes)
    a = randn((T, K), dtype, device, g)
    b = randn((E, K, N), dtype, device, g, max(K, 1) ** -0.5)
    c = randn((E, N), dtype, device, g) if bias else None
    offsets = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return a, b, offsets, c


def check(a, b, offsets, bias, activation, rtol=None):
    dtype, device = a.dtype, a.device
    out = grouped_gemm(a, b, offsets, bias, activation)
    assert out.dtype == dtype and out.shape == (a.shape[0], b.shape[2])
    expected = grouped_reference(a, b, offsets.cpu(), bias, activation)
    assert_close_rel(out, expected, dtype, "c", rtol=rtol or moe_rtol(dtype, device))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, activation, bias):
    # Empty first, middle and last groups, a one-row group, and rows past offsets[-1].
    a, b, offsets, c = make_inputs([0, 37, 1, 0, 64, 0], 48, 40, dtype, device, tail=5, bias=bias)
    out = check(a, b, offsets, c, activation)
    assert (out[-5:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_as_torch_grouped_mm(device, dtype):
    a, b, offsets, _ = make_inputs([16, 0, 32, 8], 64, 32, dtype, device)
    expected = F.grouped_mm(a, b, offs=offsets)
    assert_close_rel(grouped_gemm(a, b, offsets), expected, dtype, rtol=moe_rtol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    K=st.integers(1, 24),
    N=st.integers(1, 24),
    tail=st.integers(0, 3),
    activation=st.sampled_from([None, "gelu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(device, sizes, K, N, tail, activation, bias, seed):
    check(*make_inputs(sizes, K, N, torch.float32, device, seed, tail, bias), activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_aligned_large_groups(device, dtype):
    """K and N multiples of 8 (the CUTLASS paths on a GPU), groups spanning several 128-row tiles: on Hopper
    more than 128 rows per group on average and N > 128 take the cooperative schedule."""
    a, b, offsets, c = make_inputs([300, 0, 129, 1, 256], 128, 136, dtype, device, seed=4)
    check(a, b, offsets, c, "gelu")
    check(a, b, offsets, None, None)


def leave_garbage(shape, dtype, device):
    """Frees a NaN-filled buffer of the output's size, so an output the op forgets to write is likely to hold it
    (the CUDA caching allocator hands the block back out) rather than zeros by luck."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_and_all_empty(device, dtype):
    a, b, offsets, c = make_inputs([0, 0, 0], 8, 8, dtype, device)
    assert grouped_gemm(a, b, offsets, c, "gelu").shape == (0, 8)
    a, b, offsets, c = make_inputs([0, 0], 8, 8, dtype, device, tail=3)
    leave_garbage((3, 8), dtype, device)
    assert (grouped_gemm(a, b, offsets, c) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_groups(device, dtype):
    """E = 0: no group owns a row, so every row is zero, and the gradients are zero or empty."""
    a = randn((5, 16), dtype, device, torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.empty(0, 16, 8, dtype=dtype, device=device, requires_grad=True)
    offsets = torch.empty(0, dtype=torch.int32, device=device)
    leave_garbage((5, 8), dtype, device)
    out = grouped_gemm(a, b, offsets)
    assert out.shape == (5, 8) and (out == 0).all()
    da, db = torch.autograd.grad(out.sum(), (a, b))
    assert (da == 0).all() and db.shape == (0, 16, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_width_rows_still_give_the_bias_gradient(device, dtype):
    """K = 0: c = act(bias[g]) on each group's rows, and bias.grad holds the column sums of each group."""
    a, b, offsets, c = make_inputs([3, 0, 5], 0, 16, dtype, device, tail=2)
    c.requires_grad_()
    out = grouped_gemm(a, b, offsets, c, "gelu")
    assert_close_rel(out, grouped_reference(a, b, offsets.cpu(), c.detach(), "gelu"), dtype, "c", rtol=moe_rtol(dtype, device))
    grad = randn(out.shape, dtype, device, torch.Generator().manual_seed(3))
    (dbias,) = torch.autograd.grad(out, c, grad)
    ref = c.detach().double().cpu().requires_grad_()
    (expected,) = torch.autograd.grad(grouped_reference(a, b, offsets.cpu(), ref, "gelu"), ref, grad.double().cpu())
    assert_close_rel(dbias, expected, dtype, "dbias", rtol=moe_rtol(dtype, device))
    assert dbias[0].abs().sum() > 0 and (dbias[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    a, b, offsets, c = make_inputs([5, 0, 9], 16, 24, torch.float32, device, tail=2)
    a_t = a.t().contiguous().t()  # column-major
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)
    c_s = torch.stack([c, c], dim=2)[..., 0]  # strided bias
    for args in ((a_t, b, offsets, c), (a, b_t, offsets, c), (a, b, offsets, c_s)):
        assert not all(t.is_contiguous() for t in args)
        check(*args, "gelu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_gradients(device, activation):
    a, b, offsets, c = make_inputs([7, 0, 12, 3], 16, 24, torch.float32, device, tail=4)
    a, b, c = (t.clone().requires_grad_() for t in (a, b, c))
    grad = randn((a.shape[0], 24), torch.float32, device, torch.Generator().manual_seed(9))
    da, db, dc = torch.autograd.grad(grouped_gemm(a, b, offsets, c, activation), (a, b, c), grad)
    ref = [t.detach().double().cpu().requires_grad_() for t in (a, b, c)]
    expected = torch.autograd.grad(grouped_reference(*ref[:2], offsets.cpu(), ref[2], activation), ref, grad.double().cpu())
    for name, got, want in zip(("da", "db", "dbias"), (da, db, dc), expected):
        assert_close_rel(got, want, torch.float32, name, rtol=moe_rtol(torch.float32, device))
    assert (da[-4:] == 0).all() and (db[1] == 0).all() and (dc[1] == 0).all()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_gradcheck_float64(activation):
    a, b, offsets, c = make_inputs([3, 0, 4, 1], 5, 6, torch.float64, "cpu", tail=2)
    args = [t.clone().requires_grad_() for t in (a, b, c)]
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_gemm(a, b, offsets, c, activation), args)
    assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, offsets, None, activation), args[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [5, 40])  # 40: 16-byte rows, the tensor-core path on a GPU; 5: the at::mm loop
def test_weight_grad_op(device, dtype, width):
    a, _, offsets, _ = make_inputs([4, 0, 9, 0, 300], 8, 8, dtype, device, tail=3)
    grad = randn((a.shape[0], width), dtype, device, torch.Generator().manual_seed(2))
    db, dbias = WEIGHT_GRAD_OP(a, grad, offsets)
    ends = offsets.tolist()
    rtol = moe_rtol(dtype, device)
    for g, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
        assert_close_rel(db[g], a[start:end].double().t() @ grad[start:end].double(), dtype, f"db[{g}]", rtol=rtol)
        assert_close_rel(dbias[g], grad[start:end].double().sum(0), dtype, f"dbias[{g}]", rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b, offsets, c = make_inputs([3, 0, 5], 8, 16, torch.float32, device, tail=1)
    for args in (
        (a, b, offsets, c, None),
        (a.requires_grad_(), b.requires_grad_(), offsets, c.requires_grad_(), "gelu"),
        (a.detach()[:, ::2], b.detach()[:, ::2], offsets, None, None),
    ):
        torch.library.opcheck(OP, args)
    torch.library.opcheck(WEIGHT_GRAD_OP, (a.detach(), torch.randn(9, 4, device=device), offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    a, b, offsets, c = make_inputs([6, 0, 10], 16, 8, torch.float32, device)

    def step(a, b, c):
        return grouped_gemm(a, b, offsets, c, "gelu").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_args = [t.clone().requires_grad_() for t in (a, b, c)]
    compiled_args = [t.clone().requires_grad_() for t in (a, b, c)]
    eager, out = step(*eager_args), compiled(*compiled_args)
    eager.backward()
    out.backward()
    torch.testing.assert_close(out, eager)
    for x, y in zip(compiled_args, eager_args):
        torch.testing.assert_close(x.grad, y.grad)


def test_meta_tensors():
    out = OP(torch.empty(7, 4, device="meta"), torch.empty(3, 4, 5, device="meta"), torch.empty(3, dtype=torch.int32, device="meta"))
    assert out.shape == (7, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_the_argument(device):
    a, b, offsets, c = make_inputs([3, 4], 8, 6, torch.float32, device)
    cases = [
        ((a, b, offsets.long(), c), RuntimeError, "offsets must be Int"),
        ((a, b, offsets[:1], c), RuntimeError, r"offsets must have shape \[E\]"),
        ((a[:, :5], b, offsets, c), RuntimeError, r"b must have shape \[E, K, N\] with K = a.size\(1\) = 5"),
        ((a, b, offsets, c[:, :5]), RuntimeError, r"bias must have shape \[E, N\]"),
        ((a, b.double(), offsets, c), RuntimeError, "b must have the dtype of a"),
        ((a.int(), b.int(), offsets, None), RuntimeError, "a must be float32"),
        ((a[0], b, offsets, c), RuntimeError, "a must have 2 dimensions"),
    ]
    if device == "cpu":  # reading offsets on the GPU would synchronise; there a device-side assert guards them
        cases += [
            ((a, b, torch.tensor([4, 3], dtype=torch.int32), c), RuntimeError, "offsets must be non-decreasing"),
            ((a, b, torch.tensor([3, 8], dtype=torch.int32), c), RuntimeError, r"row ends in \[0, 7\]"),
            ((a, b, torch.tensor([-1, 3], dtype=torch.int32), c), RuntimeError, "offsets must be non-decreasing"),
        ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            grouped_gemm(*args)
    with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
        grouped_gemm(a, b, offsets, c, "relu")
    with pytest.raises(RuntimeError, match="grad must have as many rows as a"):
        WEIGHT_GRAD_OP(a, a[:3], offsets)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_misaligned_shapes_fall_back(dtype):
    """K or N not a multiple of 16 bytes, or a contiguous operand starting off 16-byte alignment: the at::mm
    loop, same results."""
    for K, N in ((30, 40), (32, 34)):  # K, then N, off 16 bytes for every dtype
        check(*make_inputs([20, 0, 33], K, N, dtype, "cuda"), "gelu")
    a, b, offsets, c = make_inputs([20, 0, 33], 32, 40, dtype, "cuda")
    shifted = torch.empty(a.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(a).copy_(a)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    check(shifted, b, offsets, c, "gelu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_graph_capture():
    a, b, offsets, c = make_inputs([100, 0, 28], 64, 64, torch.bfloat16, "cuda")
    first = grouped_gemm(a, b, offsets, c, "gelu")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grouped_gemm(a, b, offsets, c, "gelu")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_float32_follows_the_tf32_flag():
    """float32 is computed in full precision unless PyTorch's flags allow TF32 matmuls (its default is full
    precision); then the CUTLASS path uses TF32 tensor cores, like cuBLAS."""
    a, b, offsets, c = make_inputs([300, 0, 200], 256, 128, torch.float32, "cuda", seed=5)
    expected = grouped_reference(a, b, offsets.cpu(), c, None)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        full = grouped_gemm(a, b, offsets, c)
        assert_close_rel(full, expected, torch.float32, "float32", rtol=MOE_RTOL[torch.float32])
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = grouped_gemm(a, b, offsets, c)
        assert_close_rel(tf32, expected, torch.float32, "tf32", rtol=TF32_RTOL)
        assert not torch.equal(tf32, full), "allow_tf32 = True should run the TF32 tensor-core kernel"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

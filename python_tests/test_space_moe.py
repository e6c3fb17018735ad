"""space_moe (docs/kernels.md) against the naive formula in float64: a loop over text tokens, each token's expert
applied to the image features masked by that token's region."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import raphael_ext
from raphael_ext.ops import empty_cpu_cache, space_moe, space_moe_plan

from helpers import CUDA, DEVICES, assert_close_rel
from moe_helpers import make_space_inputs, moe_rtol, naive_space_moe, to_reference

OP = torch.ops.raphael_ext.space_moe.default
PLAN_OP = torch.ops.raphael_ext.space_moe_plan.default
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NAMES = ("x", "mask", "route", "gate", "w1", "b1", "w2", "b2", "text_lengths")
GRAD_NAMES = ("x", "gate", "w1", "b1", "w2", "b2")


MODES = [pytest.param(False, id="save"), pytest.param(True, id="recompute")]


def check_against_reference(inputs, grads=True, recompute=False):
    x = inputs[0]
    dtype, device = x.dtype, x.device
    rtol = moe_rtol(dtype, device)
    ours = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = space_moe(*ours, recompute=recompute)
    ref = to_reference(*inputs)
    expected = naive_space_moe(*ref)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, expected, dtype, "y", rtol=rtol)
    if not grads:
        return
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    wrt = [t for t in ours if t is not None and t.requires_grad]
    wrt_ref = [t for t in ref if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, wrt, grad_out.to(device))
    want = torch.autograd.grad(expected, wrt_ref, grad_out.double(), allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(wrt_ref, want)]  # unused: zero gradient
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close_rel(g, w, dtype, f"d{name}", rtol=rtol)


@pytest.mark.parametrize("recompute", MODES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_naive_formula(device, dtype, recompute):
    check_against_reference(make_space_inputs(2, 33, 7, 16, 24, 4, dtype, device, lengths=[7, 4]), recompute=recompute)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_hidden_are_the_pre_activations(device):
    """save_hidden returns x_j w1[k] + b1[k] at each pair's row (rows past the pairs zero); without it, nothing."""
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 11, 5, 8, 12, 3, torch.float64, device,
                                                                      density=0.5, lengths=[5, 3])
    saved = OP(x, mask, route, gate, w1, b1, w2, b2, lengths, True)
    plain = OP(x, mask, route, gate, w1, b1, w2, b2, lengths, False)
    for a, b in zip(saved[:6], plain[:6]):
        assert torch.equal(a, b)
    assert plain[6].shape == (0, 12)
    hidden, pair_index, offsets = saved[6].cpu(), saved[3].cpu(), saved[2].cpu()
    assert hidden.shape == (2 * 11 * 3, 12)
    tokens = x.reshape(-1, 8).cpu()
    for j, k in (pair_index >= 0).nonzero().tolist():
        expected = tokens[j] @ w1[k].cpu() + b1[k].cpu()
        torch.testing.assert_close(hidden[pair_index[j, k]], expected)
    assert not hidden[int(offsets[-1]):].any()


@pytest.mark.parametrize("recompute", MODES)
def test_backward_keeps_hidden_only_when_saving(recompute):
    """What autograd keeps between the passes: the [T, F] pre-activations when saving, nothing of that width when
    recomputing; under no_grad the op is asked for none."""
    x, mask, route, gate, w1, b1, w2, b2, _ = make_space_inputs(2, 16, 5, 8, 40, 3, torch.float32, density=0.5)
    x.requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        out = space_moe(x, mask, route, gate, w1, b1, w2, b2, recompute=recompute)
    assert ((2 * 16 * 3, 40) in kept) == (not recompute)  # [B * N_x * min(E, N_y), F]
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("recompute", MODES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [
        dict(B=1, N_x=1, N_y=1, E=1),  # one image token, one text token, one expert
        dict(B=2, N_x=5, N_y=3, E=6),  # more experts than text tokens: some experts always empty
        dict(B=3, N_x=9, N_y=6, E=2, lengths=[0, 6, 1]),  # a sample without text: y = 0
        dict(B=2, N_x=8, N_y=5, E=3, density=0.0),  # all masked: only the constant e_k(0) terms
        dict(B=2, N_x=8, N_y=5, E=3, density=1.0),  # nothing masked
        dict(B=0, N_x=4, N_y=3, E=2),
        dict(B=2, N_x=0, N_y=3, E=2),
        dict(B=2, N_x=4, N_y=0, E=2),
    ],
)
def test_edge_cases(device, case, recompute):
    case = dict(case)
    inputs = make_space_inputs(
        case.pop("B"), case.pop("N_x"), case.pop("N_y"), 8, 12, case.pop("E"), torch.float64, device, **case
    )
    check_against_reference(inputs, recompute=recompute)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    N_x=st.integers(1, 20),
    N_y=st.integers(1, 9),
    C=st.integers(1, 12),
    F_=st.integers(1, 12),
    E=st.integers(1, 7),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
    recompute=st.booleans(),
)
def test_random_shapes(device, B, N_x, N_y, C, F_, E, density, use_lengths, seed, recompute):
    # float64: shapes are the point here (F = 1 or C = 1 make gradients sums with heavy cancellation, which a
    # float32 comparison per element cannot judge); the other dtypes are covered at fixed shapes above.
    lengths = [(seed + 3 * b) % (N_y + 1) for b in range(B)] if use_lengths else None
    check_against_reference(make_space_inputs(B, N_x, N_y, C, F_, E, torch.float64, device, seed, density, lengths),
                            recompute=recompute)


@pytest.mark.parametrize("device", DEVICES)
def test_each_token_visits_at_most_min_experts_text(device):
    B, N_x, N_y, E = 3, 40, 5, 6
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(
        B, N_x, N_y, 8, 8, E, torch.float32, device, density=0.7, lengths=[5, 2, 0]
    )
    _, expert_out, offsets, pair_index, weight, z, _ = OP(x, mask, route, gate, w1, b1, w2, b2, lengths)
    assert expert_out.shape[0] == B * N_x * min(E, N_y)  # capacity, fixed without reading the device
    visits = (pair_index >= 0).sum(1).view(B, N_x).cpu()
    for b, n_y in enumerate([5, 2, 0]):
        assert visits[b].max() <= min(E, n_y)
        # Exactly the experts of the valid text tokens whose region covers the image token.
        for j in range(N_x):
            covering = {int(route[b, i]) for i in range(n_y) if mask[b, j, i]}
            assert set((pair_index[b * N_x + j] >= 0).nonzero().flatten().tolist()) == covering
    # The CSR: expert k's pairs are rows offsets[k-1]..offsets[k], each used once.
    counts = (pair_index >= 0).sum(0).cpu()
    assert torch.equal(offsets.cpu().long(), counts.cumsum(0))
    rows = pair_index[pair_index >= 0].sort().values.cpu()
    assert torch.equal(rows, torch.arange(int(counts.sum())))
    for k in range(E):
        start = 0 if k == 0 else int(offsets[k - 1])
        in_k = pair_index[:, k][pair_index[:, k] >= 0].cpu()
        assert ((in_k >= start) & (in_k < int(offsets[k]))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_plan_op(device):
    """space_moe_plan is the forward's plan, and w/z are the per-token sums of docs/kernels.md."""
    B, N_x, N_y, E = 2, 9, 6, 4
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(B, N_x, N_y, 4, 4, E, torch.float32, device,
                                                                      density=0.5, lengths=[6, 3])
    plan = space_moe_plan(mask, route, gate, E, lengths)
    for got, want in zip(plan, OP(x, mask, route, gate, w1, b1, w2, b2, lengths)[2:]):
        assert torch.equal(got, want)
    weight, z = torch.zeros(B * N_x, E), torch.zeros(B * N_x, E)
    for b, n_y in enumerate([6, 3]):
        for j in range(N_x):
            for i in range(n_y):
                target = weight if mask[b, j, i] else z
                target[b * N_x + j, int(route[b, i])] += float(gate[b, i]) / n_y
    torch.testing.assert_close(plan[2].cpu(), weight)
    torch.testing.assert_close(plan[3].cpu(), z)
    torch.library.opcheck(PLAN_OP, (mask, route, gate, lengths, E))
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        space_moe_plan(mask, route, gate, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 12, 5, 8, 10, 3, torch.float32, device)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    route_nc = torch.stack([route.int(), route.int()], -1)[..., 1]
    w1_nc = w1.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = (x_nc, mask_nc, route_nc, gate[:, :], w1_nc, b1, w2, b2[:, :], lengths)
    assert not any(t.is_contiguous() for t in (x_nc, mask_nc, route_nc, w1_nc))
    check_against_reference(inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_routes_are_not_read(device):
    x, mask, route, gate, w1, b1, w2, b2, _ = make_space_inputs(2, 6, 4, 8, 8, 3, torch.float64, device)
    lengths = torch.tensor([2, 4], device=device)
    bad = route.clone()
    bad[0, 2:] = 99  # padding tokens of sample 0
    torch.testing.assert_close(
        space_moe(x, mask, bad, gate, w1, b1, w2, b2, lengths), space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths)
    )


@pytest.mark.parametrize("recompute", MODES)
def test_gradcheck_float64(recompute):
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 5, 4, 3, 4, 3, lengths=[4, 2], density=0.5)
    args = [t.clone().requires_grad_() for t in (x, gate, w1, b1, w2, b2)]

    def fn(x, gate, w1, b1, w2, b2):
        return space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths, recompute=recompute)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_thread_count_does_not_change_the_result(recompute):
    """With experts of several row blocks each (about 840 rows): the output and the gradients the kernel reduces itself
    are the same bits; the weight gradients are single BLAS GEMMs, whose summation order is the BLAS's (MKL's differs
    in the last bits between one thread and a parallel region)."""
    x, mask, route, gate, *rest = make_space_inputs(2, 700, 9, 16, 16, 5, torch.float32, density=0.5)
    params = [t.requires_grad_() for t in (x, gate, *rest[:4])]

    def run():
        out = space_moe(params[0], mask, route, params[1], *params[2:], rest[4], recompute=recompute)
        return out, *torch.autograd.grad(out, params, torch.ones_like(out))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    out, dx, dgate, dw1, db1, dw2, db2 = range(7)
    for i in (out, dx, dgate, db1, db2):
        assert torch.equal(single[i], multi[i]), i
    for i in (dw1, dw2):
        torch.testing.assert_close(single[i], multi[i], rtol=1e-5, atol=1e-5 * single[i].abs().max().item())


def test_float32_wide_channels():
    """C = 40: the CPU's vectorised combine in blocks of 32 channels and then of 8, with constant terms present."""
    check_against_reference(make_space_inputs(2, 33, 7, 40, 24, 4, torch.float32, lengths=[7, 4]))


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_float32_gelu_epilogue_widths(recompute):
    """F = 48 takes the AVX-512 epilogues where the CPU and ATEN_CPU_CAPABILITY allow them, F = 24 the AVX2 ones."""
    for F_ in (48, 24):
        check_against_reference(make_space_inputs(2, 33, 7, 16, F_, 3, torch.float32, lengths=[7, 4]),
                                recompute=recompute)


@pytest.mark.skipif(not raphael_ext.build_info()["cpu_avx512"], reason="the CPU kernels run without AVX-512 here")
def test_avx512_and_avx2_epilogues_agree_bit_for_bit(tmp_path):
    """The same forward and backward in a process held at AVX2 (ATEN_CPU_CAPABILITY=avx2, as PyTorch honours it)."""
    code = ("import sys, torch, raphael_ext; sys.path.insert(0, sys.argv[1]); from safetensors.torch import save_file\n"
            "from test_space_moe import epilogue_outputs\n"
            "assert not raphael_ext.build_info()['cpu_avx512']\n"
            "save_file(epilogue_outputs(), sys.argv[2])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, "-P", "-c", code, os.path.dirname(__file__), str(tmp_path / "avx2.safetensors")],
                   env=env, check=True, capture_output=True, timeout=120)
    avx2 = load_file(tmp_path / "avx2.safetensors")
    for name, value in epilogue_outputs().items():
        assert torch.equal(value, avx2[name]), name


def epilogue_outputs():
    """Output and gradients of a float32 space_moe whose F (64) takes the widest epilogues the process allows."""
    x, mask, route, gate, w1, b1, w2, b2, _ = make_space_inputs(2, 40, 5, 16, 64, 3, torch.float32, density=0.6)
    params = [t.requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
    out = space_moe(params[0], mask, route, params[1], *params[2:], recompute=False)
    grads = torch.autograd.grad(out, params, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return {"out": out.detach(), **{f"grad{i}": g for i, g in enumerate(grads)}}


def large_hidden_inputs(density):
    """Inputs whose saved pre-activations (768 x 1024 float32, 3 MiB) are large enough for the CPU buffer cache."""
    return make_space_inputs(1, 256, 6, 8, 1024, 3, torch.float32, density=density)


needs_cache = pytest.mark.skipif("RAPHAEL_EXT_CPU_CACHE_MIB" in os.environ, reason="the CPU buffer cache is configured")


@needs_cache
def test_cpu_buffers_are_recycled_never_shared_and_their_tails_zeroed():
    empty_cpu_cache()  # nothing idle from earlier tests in this process: the freed buffer is the only candidate
    dense, sparse = large_hidden_inputs(0.9), large_hidden_inputs(0.05)
    first = OP(*dense, True)
    used = int(first[2][-1])
    assert first[6][:used].abs().sum() > 0
    second = OP(*sparse, True)
    assert second[6].data_ptr() != first[6].data_ptr()  # a live output's buffer is never handed out again
    buffer = first[6].data_ptr()
    del first
    third = OP(*sparse, True)
    assert third[6].data_ptr() == buffer  # the freed one is
    assert int(third[2][-1]) < used  # and its rows past the pairs, written by the dense call, are zero again
    assert torch.equal(third[6], second[6]) and not third[6][int(third[2][-1]):].any()
    del second, third
    empty_cpu_cache()
    assert torch.equal(OP(*sparse, True)[0], space_moe(*sparse))


@needs_cache
def test_profiler_sees_the_cached_buffers():
    """The cache reports what it hands out and takes back, the same size both ways, so memory profiles still show
    what the op holds."""
    from torch.profiler._memory_profiler import Action

    inputs = large_hidden_inputs(0.9)
    OP(*inputs, True)  # the buffer now sits idle in the cache
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        saved = OP(*inputs, True)[6]
        nbytes = saved.numel() * saved.element_size()
        del saved
    sizes = {action: [size for _, a, _, size in prof._memory_profile().timeline if a == action]
             for action in (Action.CREATE, Action.DESTROY)}
    assert nbytes in sizes[Action.CREATE] and nbytes in sizes[Action.DESTROY]


def test_bad_cache_size_is_a_clear_error():
    code = ("import torch, raphael_ext, sys; sys.path.insert(0, sys.argv[1]); from moe_helpers import make_space_inputs\n"
            "inputs = make_space_inputs(1, 256, 6, 8, 1024, 3, torch.float32, density=0.9)\n"
            "try:\n    torch.ops.raphael_ext.space_moe(*inputs, True)\nexcept RuntimeError as e:\n    print(e)")
    env = {**os.environ, "RAPHAEL_EXT_CPU_CACHE_MIB": "lots"}
    result = subprocess.run([sys.executable, "-P", "-c", code, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "RAPHAEL_EXT_CPU_CACHE_MIB must be a number of MiB >= 0, got 'lots'" in result.stdout, result.stderr[-2000:]


def test_double_backward_is_refused():
    x, mask, route, gate, w1, b1, w2, b2, _ = make_space_inputs(1, 3, 2, 4, 4, 2)
    x.requires_grad_()
    out = space_moe(x, mask, route, gate, w1, b1, w2, b2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 6, 4, 8, 8, 3, torch.float32, device,
                                                                      lengths=[4, 1], density=0.5)
    grads = [t.clone().requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
    for args in (
        (x, mask, route, gate, w1, b1, w2, b2, lengths),
        (grads[0], mask, route.int(), grads[1], *grads[2:], None),
        (grads[0], mask, route, grads[1], *grads[2:], lengths, True),
        (grads[0], mask, route, grads[1], *grads[2:], None, False),
    ):
        torch.library.opcheck(OP, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 10, 4, 8, 8, 3, torch.float32, device,
                                                                      lengths=[4, 3], density=0.5)

    def step(x, gate, w1, b1, w2, b2):
        return space_moe(x * 2, mask, route, gate, w1, b1, w2, b2, lengths).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_args = [t.clone().requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
    compiled_args = [t.clone().requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
    eager, out = step(*eager_args), compiled(*compiled_args)
    eager.backward()
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(compiled_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_meta_tensors():
    meta = dict(device="meta")
    outs = OP(torch.empty(2, 5, 8, **meta), torch.empty(2, 5, 3, dtype=torch.bool, **meta),
              torch.empty(2, 3, dtype=torch.long, **meta), torch.empty(2, 3, **meta), torch.empty(4, 8, 6, **meta),
              torch.empty(4, 6, **meta), torch.empty(4, 6, 8, **meta), torch.empty(4, 8, **meta))
    assert [tuple(t.shape) for t in outs] == [(2, 5, 8), (30, 8), (4,), (10, 4), (10, 4), (10, 4), (0, 6)]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_the_argument(device):
    x, mask, route, gate, w1, b1, w2, b2, _ = make_space_inputs(2, 6, 4, 8, 10, 3, torch.float32, device)
    good = dict(zip(NAMES, (x, mask, route, gate, w1, b1, w2, b2, None)))
    cases = [
        (dict(mask=mask.float()), "mask must be Bool"),
        (dict(mask=mask[:, :, :3]), r"route must have shape \[B, N_y\]"),
        (dict(route=route.float()), "route must be int32 or int64"),
        (dict(gate=gate[:, :3]), r"gate must have shape \[B, N_y\]"),
        (dict(gate=gate.double()), "gate must have the dtype of x"),
        (dict(w1=w1[:, :7]), r"w1 must have shape \[E, C, F\]"),
        (dict(b1=b1[:2]), r"b1 must have shape \[E, F\]"),
        (dict(w2=w2.transpose(1, 2)), r"w2 must have shape \[E, F, C\]"),
        (dict(b2=b2[:, :1]), r"b2 must have shape \[E, C\]"),
        (dict(x=x[0]), "x must have 3 dimensions"),
        (dict(w1=w1[:0], b1=b1[:0], w2=w2[:0], b2=b2[:0]), "w1 must hold at least one expert"),
        (dict(text_lengths=torch.tensor([1, 2, 3], device=device)), r"text_lengths must have shape \[B\]"),
        (dict(text_lengths=torch.tensor([1.0, 2.0], device=device)), "text_lengths must be int32 or int64"),
    ]
    if device == "cpu":  # value checks; on the GPU they are device-side asserts (no host synchronisation)
        bad_route = route.clone()
        bad_route[1, 2] = 3
        cases += [
            (dict(route=bad_route), r"route must be an expert index in \[0, E = 3\).*got 3 at \[1, 2\]"),
            (dict(route=-route - 1), r"route must be an expert index in \[0, E = 3\)"),
            (dict(text_lengths=torch.tensor([1, 5], device=device)), r"text_lengths must be in \[0, N_y = 4\]"),
            (dict(text_lengths=torch.tensor([-1, 2], device=device)), r"text_lengths must be in \[0, N_y = 4\]"),
        ]
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            space_moe(**{**good, **change})


@pytest.mark.parametrize("device", DEVICES)
def test_routed_rows_beyond_int32_are_refused(device):
    """B * N_x * min(E, N_y) > 2^31 - 1 pairs cannot be addressed by the grouped GEMMs' int32 offsets: the op and the
    plan alone refuse it before allocating anything (the mask is a stride-0 view of one element)."""
    B, N_x, N_y, E = 2, 2**29, 4, 4
    mask = torch.ones(1, 1, 1, dtype=torch.bool, device=device).expand(B, N_x, N_y)
    route = torch.zeros(B, N_y, dtype=torch.int64, device=device)
    gate = torch.ones(B, N_y, device=device)
    with pytest.raises(RuntimeError, match="routed rows exceed the int32 offsets"):
        space_moe_plan(mask, route, gate, E)
    x = torch.zeros(1, 1, 8, device=device).expand(B, N_x, 8)
    _, _, _, _, w1, b1, w2, b2, _ = make_space_inputs(1, 1, N_y, 8, 8, E, torch.float32, device)
    with pytest.raises(RuntimeError, match="routed rows exceed the int32 offsets"):
        space_moe(x, mask, route, gate, w1, b1, w2, b2)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_aligned_sizes(dtype):
    """C and F multiples of 8: the CUTLASS grouped GEMMs, with forward and backward against the reference."""
    check_against_reference(make_space_inputs(2, 200, 12, 64, 128, 6, dtype, "cuda", density=0.4, lengths=[12, 5]))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_deterministic_and_graph_capturable():
    inputs = make_space_inputs(2, 256, 16, 64, 128, 6, torch.bfloat16, "cuda", density=0.4)
    first = space_moe(*inputs)
    assert torch.equal(first, space_moe(*inputs))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = space_moe(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)

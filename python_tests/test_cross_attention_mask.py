"""cross_attention_mask (docs/kernels.md) against eager float64 attention, FlashAttention's error rule, the mask
contract, autograd, opcheck, torch.compile and argument errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ext.ops import cross_attention_mask

from attention_reference import assert_within_torch_error, eager_attention, threshold_mask, valid_keys
from helpers import CUDA, DEVICES

OP = torch.ops.raphael_ext.cross_attention_mask.default
BACKWARD_OP = torch.ops.raphael_ext.cross_attention_mask_backward.default
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_qkv(batch, heads, queries, keys, head_dim, dtype, device, seed=0, layout="bnhd"):
    """q, k, v as a model makes them: projections viewed as [B, N, H, D] and transposed (layout 'bnhd'),
    or contiguous [B, H, N, D] ('bhnd')."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        if layout == "bnhd":
            t = torch.randn(batch, n, heads, head_dim, generator=g, dtype=torch.float64).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, n, head_dim, generator=g, dtype=torch.float64)
        return t.to(dtype).to(device)

    return make(queries), make(keys), make(keys)


def lengths_tensor(lengths, device):
    return None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)


def check_mask_contract(attn_map, mask, alpha, text_lengths):
    """The mask is the threshold of the returned map, padding is zero/False and each column's argmax is in."""
    assert mask.dtype == torch.bool and mask.shape == attn_map.shape
    assert torch.equal(mask.cpu(), threshold_mask(attn_map, alpha, text_lengths).cpu())
    valid = valid_keys(attn_map.shape[0], attn_map.shape[2], text_lengths, attn_map.device)
    padding = ~valid[:, None, :].expand_as(attn_map)
    assert torch.all(attn_map[padding] == 0) and not torch.any(mask[padding])
    if attn_map.shape[1] and 0 <= alpha <= 1:
        argmax = attn_map.float().argmax(dim=1, keepdim=True)  # [B, 1, N_y]
        at_argmax = mask.gather(1, argmax).squeeze(1)
        assert torch.all(at_argmax[valid])
    # Each head's probabilities sum to 1 over the valid keys, so their mean does too.
    rows_with_keys = valid.any(dim=1)
    if attn_map.shape[1] and rows_with_keys.any():
        sums = attn_map[rows_with_keys].double().sum(dim=-1)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(attn_map.dtype, 3e-2)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=tol)


def check_forward(q, k, v, alpha=0.2, text_lengths=None, scale=None):
    dtype = q.dtype
    out, attn_map, mask = cross_attention_mask(q, k, v, alpha, text_lengths, scale)
    B, H, Nx, D = q.shape
    assert out.shape == q.shape and out.dtype == dtype and attn_map.shape == (B, Nx, k.shape[2])
    assert attn_map.dtype == dtype
    ref_out, ref_map = eager_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                       None if text_lengths is None else text_lengths.cpu(), scale)
    torch_out, torch_map = eager_attention(q, k, v, text_lengths, scale)
    assert_within_torch_error(out, torch_out, ref_out, dtype, "out")
    assert_within_torch_error(attn_map, torch_map, ref_map, dtype, "attn_map")
    check_mask_contract(attn_map, mask, alpha, text_lengths)
    return out, attn_map, mask


def check_backward(q, k, v, text_lengths=None, scale=None, use_out=True, use_map=True, seed=1):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed)
    B, H, Nx, D = q.shape
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype).to(q.device)
    grad_map = torch.randn(B, Nx, k.shape[2], generator=g, dtype=torch.float64).to(dtype).to(q.device)

    def grads(fn, q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, attn_map = fn(q, k, v)[:2]
        loss = 0
        if use_out:
            loss = loss + (out * grad_out.to(out)).sum()
        if use_map:
            loss = loss + (attn_map * grad_map.to(attn_map)).sum()
        return torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True)

    ours = grads(lambda q, k, v: cross_attention_mask(q, k, v, 0.2, text_lengths, scale), q, k, v)
    lengths_cpu = None if text_lengths is None else text_lengths.cpu()
    ref = grads(lambda q, k, v: eager_attention(q, k, v, lengths_cpu, scale),
                q.double().cpu(), k.double().cpu(), v.double().cpu())
    same = grads(lambda q, k, v: eager_attention(q, k, v, text_lengths, scale), q, k, v)
    for name, o, s, r in zip(("dq", "dk", "dv"), ours, same, ref):
        assert o.shape == r.shape and o.dtype == dtype
        assert_within_torch_error(o, s, r, dtype, name)


SHAPES = [
    # batch, heads, queries, keys, head_dim, text_lengths
    (2, 3, 37, 7, 32, None),
    (2, 2, 65, 77, 64, [40, 77]),
    (1, 4, 33, 128, 128, None),
    (3, 1, 1, 1, 32, [1, 0, 1]),
    (2, 2, 70, 77, 64, [0, 1]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-L{s[5]}")
def test_forward_and_backward_match_reference(device, dtype, shape):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    B, H, Nx, Ny, D, lengths = shape
    q, k, v = make_qkv(B, H, Nx, Ny, D, dtype, device)
    text_lengths = lengths_tensor(lengths, device)
    check_forward(q, k, v, 0.2, text_lengths)
    check_backward(q, k, v, text_lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_out,use_map", [(True, False), (False, True)])
def test_gradient_from_one_output(device, use_out, use_map):
    q, k, v = make_qkv(2, 3, 41, 9, 32, torch.float32, device)
    check_backward(q, k, v, lengths_tensor([9, 4], device), use_out=use_out, use_map=use_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0, 1.5])
def test_mask_threshold(device, alpha):
    q, k, v = make_qkv(2, 2, 50, 11, 32, torch.float32, device, seed=3)
    _, attn_map, mask = check_forward(q, k, v, alpha, lengths_tensor([11, 6], device))
    if alpha == 0.0:
        assert torch.equal(mask.cpu(), (valid_keys(2, 11, torch.tensor([11, 6]), "cpu")[:, None, :]).expand(2, 50, 11))
    if alpha > 1:
        assert not mask.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bnhd", "bhnd", "strided"])
def test_non_contiguous_inputs(device, layout):
    if layout == "strided":  # every other query, head-dim not contiguous (a copy is made inside)
        q, k, v = make_qkv(2, 2, 80, 12, 64, torch.float32, device, layout="bhnd")
        q = q[:, :, ::2]
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not q.is_contiguous() and k.stride(-1) != 1
    else:
        q, k, v = make_qkv(2, 2, 40, 12, 64, torch.float32, device, layout=layout)
    check_forward(q, k, v, 0.2, lengths_tensor([12, 5], device))
    check_backward(q, k, v, lengths_tensor([12, 5], device))


@pytest.mark.parametrize("device", DEVICES)
def test_output_layout_merges_heads_for_free(device):
    q, k, v = make_qkv(2, 4, 9, 5, 32, torch.float32, device)
    out, _, _ = cross_attention_mask(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    assert merged.reshape(2, 9, 4 * 32).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for B, Nx in [(0, 5), (2, 0)]:
        q, k, v = make_qkv(B, 2, Nx, 4, 32, torch.float32, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, attn_map, mask = cross_attention_mask(q, k, v)
        assert out.shape == (B, 2, Nx, 32) and attn_map.shape == (B, Nx, 4) and mask.shape == (B, Nx, 4)
        (out.sum() + attn_map.sum()).backward()
        assert torch.all(k.grad == 0) and torch.all(v.grad == 0) and q.grad.shape == q.shape


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale(device):
    q, k, v = make_qkv(1, 2, 30, 10, 32, torch.float32, device)
    check_forward(q, k, v, 0.2, None, scale=0.37)
    check_backward(q, k, v, None, scale=0.37)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 3),
    heads=st.integers(1, 4),
    queries=st.integers(0, 70),
    keys=st.integers(1, 128),
    head_dim=st.sampled_from([32, 64, 128]),
    layout=st.sampled_from(["bnhd", "bhnd"]),
    with_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_cpu(batch, heads, queries, keys, head_dim, layout, with_lengths, seed):
    q, k, v = make_qkv(batch, heads, queries, keys, head_dim, torch.float32, "cpu", seed=seed, layout=layout)
    text_lengths = None
    if with_lengths:
        text_lengths = torch.randint(0, keys + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    check_forward(q, k, v, 0.2, text_lengths)
    if batch * queries:
        check_backward(q, k, v, text_lengths)


@pytest.mark.parametrize("lengths", [None, [5, 0], [1, 3]])
def test_gradcheck_float64(lengths):
    q, k, v = make_qkv(2, 2, 6, 5, 32, torch.float64, "cpu", seed=4)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    text_lengths = lengths_tensor(lengths, "cpu")
    fn = lambda q, k, v: cross_attention_mask(q, k, v, 0.2, text_lengths)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_raises():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 4, 3, 32, torch.float64, "cpu"))
    out, _, _ = cross_attention_mask(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    cases = [
        (make_qkv(2, 2, 9, 5, 32, dtype, device), None, None),
        (make_qkv(2, 3, 17, 7, 64, dtype, device, layout="bhnd"), lengths_tensor([7, 2], device), 0.3),
        (make_qkv(2, 1, 5, 4, 32, dtype, device), lengths_tensor([0, 4], device), None),
    ]
    for (q, k, v), lengths, scale in cases:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        torch.library.opcheck(OP, (q, k, v, 0.2, lengths, scale))
        q0, k0, v0 = (t.detach() for t in (q, k, v))
        _, _, _, lse = OP(q0, k0, v0, 0.2, lengths, scale)
        grad_out, grad_map = torch.randn_like(q0), torch.randn(q.shape[0], q.shape[2], k.shape[2], dtype=dtype,
                                                               device=device)
        scale_value = scale if scale is not None else q.shape[-1] ** -0.5
        torch.library.opcheck(BACKWARD_OP, (grad_out, grad_map, q0, k0, v0, lse, lengths, scale_value))
        torch.library.opcheck(BACKWARD_OP, (None, grad_map, q0, k0, v0, lse, lengths, scale_value))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    q, k, v = make_qkv(2, 2, 20, 6, 32, torch.float32, "cpu")
    text_lengths = lengths_tensor([6, 3], "cpu")

    def step(q, k, v):
        out, attn_map, mask = cross_attention_mask(q, k, v, 0.2, text_lengths)
        return out.square().sum() + (attn_map * mask).sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for fn in (step, compiled):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        loss = fn(qq, kk, vv)
        loss.backward()
        if fn is step:
            expected = (loss.detach(), qq.grad, kk.grad, vv.grad)
    torch.testing.assert_close(loss.detach(), expected[0])
    for got, want in zip((qq.grad, kk.grad, vv.grad), expected[1:]):
        torch.testing.assert_close(got, want)


def test_cpu_result_does_not_depend_on_thread_count():
    q, k, v = make_qkv(2, 4, 200, 77, 64, torch.float32, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out, attn_map, mask = cross_attention_mask(q, k, v)
            grads = torch.autograd.grad(out.sum() + attn_map.square().sum(), (q, k, v))
            results.append((out, attn_map, mask, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    q, k, v = make_qkv(2, 2, 8, 5, 32, torch.float32, device)
    cases = [
        ((q[0], k, v), RuntimeError, "q must have 4 dimensions"),
        ((q, k, v[:, :, :4]), RuntimeError, "v must have the shape of k"),
        ((q, k[:1], v[:1]), RuntimeError, "k must have shape"),
        ((q[..., :16], k[..., :16], v[..., :16]), RuntimeError, "head dimension"),
        ((q, k.half(), v), RuntimeError, "k must have the dtype of q"),
        ((q.int(), k.int(), v.int()), RuntimeError, "q must be float32"),
        ((q, k[:, :, :0], v[:, :, :0]), RuntimeError, "1 to 128 text tokens"),
        ((q[:, :0], k[:, :0], v[:, :0]), RuntimeError, "at least one head"),
    ]
    keys129 = torch.zeros(2, 2, 129, 32, device=device)
    cases.append(((q, keys129, keys129), RuntimeError, "1 to 128 text tokens"))
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            cross_attention_mask(*args)
    with pytest.raises(RuntimeError, match="text_lengths must have shape"):
        cross_attention_mask(q, k, v, 0.2, lengths_tensor([5], device))
    with pytest.raises(RuntimeError, match="text_lengths must be int32 or int64"):
        cross_attention_mask(q, k, v, 0.2, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="alpha must be finite"):
        cross_attention_mask(q, k, v, float("nan"))
    if device == "cpu":
        for bad in ([6, 1], [2**32, 1], [-1, 2]):  # 2**32 must not wrap to 0 on the way to int32
            with pytest.raises(ValueError, match=r"text_lengths must lie in \[0, N_y\]"):
                cross_attention_mask(q, k, v, 0.2, lengths_tensor(bad, device))
        with pytest.raises(RuntimeError, match="text_lengths must be on the device of q"):
            cross_attention_mask(q, k, v, 0.2, lengths_tensor([5, 1], "meta"))
    else:
        with pytest.raises(RuntimeError, match="float64 runs on CPU only"):
            cross_attention_mask(q.double(), k.double(), v.double())


def test_meta_tensors():
    q, k, v = make_qkv(2, 3, 10, 7, 64, torch.float16, "meta")
    out, attn_map, mask = cross_attention_mask(q, k, v)
    assert out.shape == (2, 3, 10, 64) and out.transpose(1, 2).is_contiguous()
    assert attn_map.shape == (2, 10, 7) and mask.dtype == torch.bool


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_never_allocates_per_head_probabilities():
    # N_y = 4 D, so one bf16 copy of the per-head probabilities (33.5 MB) outweighs everything the op must
    # allocate: out and dq (8.4 MB each), map, mask, lse and the dK/dV slice workspace (about 7 MB).
    B, H, Nx, Ny, D = 1, 16, 8192, 128, 32
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, Nx, Ny, D, torch.bfloat16, "cuda"))
    grad_out = torch.randn(B, H, Nx, D, dtype=torch.bfloat16, device="cuda")
    grad_map = torch.randn(B, Nx, Ny, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, attn_map, _ = cross_attention_mask(q, k, v)
    torch.autograd.backward((out, attn_map), (grad_out, grad_map))
    torch.cuda.synchronize()
    per_head_probs = B * H * Nx * Ny * 2
    assert torch.cuda.max_memory_allocated() - base < per_head_probs


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_deterministic_and_clamps_lengths():
    q, k, v = make_qkv(2, 8, 1000, 77, 64, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    runs = []
    for _ in range(2):
        out, attn_map, mask = cross_attention_mask(q, k, v, 0.2, lengths_tensor([40, 77], "cuda"))
        runs.append((out, attn_map, mask, *torch.autograd.grad(out.float().sum() + attn_map.float().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    clamped = cross_attention_mask(q, k, v, 0.2, lengths_tensor([2**32 + 5, -3], "cuda"))
    expected = cross_attention_mask(q, k, v, 0.2, lengths_tensor([77, 0], "cuda"))
    for a, b in zip(clamped, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_65535_sample_head_pairs(device):
    """B * H = 65538: the CUDA grids put (sample, head) pairs on x, which takes 2^31 - 1 blocks (y takes 65535)."""
    q, k, v = make_qkv(3, 21846, 2, 3, 32, torch.float32, device)
    text_lengths = lengths_tensor([3, 1, 2], device)
    check_forward(q, k, v, 0.2, text_lengths)
    check_backward(q, k, v, text_lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_unaligned_views_take_scalar_loads(dtype):
    """q, k, v starting one element past a 16-byte boundary: the kernels' element-wise loads."""
    B, H, Nx, Ny, D = 2, 3, 45, 77, 64

    def shifted(t):
        storage = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
        view = storage[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    q, k, v = (shifted(t.contiguous()) for t in make_qkv(B, H, Nx, Ny, D, dtype, "cuda"))
    text_lengths = lengths_tensor([77, 30], "cuda")
    check_forward(q, k, v, 0.2, text_lengths)
    check_backward(q, k, v, text_lengths)


# Per-block shared memory (opt-in) of GPUs with less than Hopper's 227 KiB.
A100_SMEM, SM86_SMEM = 166912, 101376


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_forward_fits_an_a100(monkeypatch):
    """float32, D = 128, N_y = 128 needs 182 KB per block with 8 rows per warp; under an A100's limit the forward
    takes 4 rows per warp, with the same results (the backward needs 138 KB and fits as it is)."""
    monkeypatch.setenv("RAPHAEL_EXT_MAX_SMEM_PER_BLOCK", str(A100_SMEM))
    q, k, v = make_qkv(1, 4, 33, 128, 128, torch.float32, "cuda")
    check_forward(q, k, v)
    check_backward(q, k, v)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_shared_memory_limits(monkeypatch):
    """Under an sm_86 limit a float16 forward at D = N_y = 128 leaves the tensor cores (150 KB) for SIMT rows (85
    KB); where nothing fits, the error names the bytes needed."""
    q, k, v = make_qkv(2, 2, 40, 128, 128, torch.float16, "cuda")
    monkeypatch.setenv("RAPHAEL_EXT_MAX_SMEM_PER_BLOCK", str(SM86_SMEM))
    check_forward(q, k, v)
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        check_backward(q, k, v)  # dQ holds K and V of a head in float32: 138 KB
    monkeypatch.setenv("RAPHAEL_EXT_MAX_SMEM_PER_BLOCK", "16384")
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        cross_attention_mask(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_cross_attention_module(device):
    from raphael_ext.nn import MaskedCrossAttention

    torch.manual_seed(0)
    layer = MaskedCrossAttention(dim=128, text_dim=48, heads=4, alpha=0.2).to(device).double()
    x = torch.randn(2, 30, 128, dtype=torch.float64, device=device)
    y = torch.randn(2, 9, 48, dtype=torch.float64, device=device)
    text_lengths = lengths_tensor([9, 5], device)
    out, attn_map, mask = layer(x, y, text_lengths)
    # Reference: the same projections with eager attention.
    q = layer.to_q(x).view(2, 30, 4, 32).transpose(1, 2)
    k = layer.to_k(y).view(2, 9, 4, 32).transpose(1, 2)
    v = layer.to_v(y).view(2, 9, 4, 32).transpose(1, 2)
    ref_out, ref_map = eager_attention(q, k, v, text_lengths)
    ref_out = layer.to_out[0](ref_out.transpose(1, 2).reshape(2, 30, 128))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(attn_map, ref_map)
    assert torch.equal(mask, threshold_mask(ref_map, 0.2, text_lengths))
    (out.square().mean() + attn_map.square().sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert set(layer.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    with pytest.raises(ValueError, match="head size of 32, 64 or 128"):
        MaskedCrossAttention(dim=96, text_dim=48, heads=4)

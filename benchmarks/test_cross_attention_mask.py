"""Cross-attention with map and mask, forward and forward+backward: raphael_ext vs the unfused ways (docs/kernels.md).

Peers, on the same inputs in the same run:
- `sdpa + map pass`: F.scaled_dot_product_attention (flash/efficient backends) for the output, then the map
  and mask from a separate softmax over the scores (the best unfused way: the map needs the probabilities).
- `eager`: softmax attention with materialised probabilities, as prompt-to-prompt-style code does.
- `triton` (GPU, forward only): raphael_ext.triton_kernels, the second implementation.
- `copy (same bytes)` (GPU, forward): a device copy of the bytes the forward must move (q, k, v read;
  out, attn_map, mask written): the memory roofline.
extra_info carries `peak_bytes` (CUDA: peak allocated memory of one call above the inputs).

Goals (read from the table, not asserted): GPU forward >= 80 % of the copy bandwidth, >= 1.5x sdpa + map
pass, >= 5x eager, memory O(N_x) not O(N_x·N_y·H); CPU forward+backward >= 2x eager.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from raphael_ext.ops import cross_attention_mask

CUDA = torch.cuda.is_available()
ALPHA = 0.2
# (device, dtype, B, H, N_x, N_y, D)
CASES = [("cpu", torch.float32, 2, 8, 1024, 77, 64)]
if CUDA:
    CASES += [("cuda", torch.bfloat16, 4, 16, 4096, 77, 64)]
PROVIDERS = ["raphael_ext", "sdpa + map pass", "eager", "triton", "copy (same bytes)"]


def threshold(attn_map):
    column_max = attn_map.amax(dim=1, keepdim=True)
    return attn_map.float() >= ALPHA * column_max.float()


def eager(q, k, v):
    probs = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
    attn_map = probs.mean(dim=1)
    return probs @ v, attn_map, threshold(attn_map)


def sdpa_with_map_pass(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    attn_map = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1).mean(dim=1)
    return out, attn_map, threshold(attn_map)


def forward_bytes(B, H, Nx, Ny, D, dtype):
    size = torch.tensor([], dtype=dtype).element_size()
    return (2 * B * H * Nx * D + 2 * B * H * Ny * D + B * Nx * Ny) * size + B * Nx * Ny  # + bool mask


def provider_fn(provider, device):
    if provider == "raphael_ext":
        return lambda q, k, v: cross_attention_mask(q, k, v, ALPHA)
    if provider == "sdpa + map pass":
        return sdpa_with_map_pass
    if provider == "eager":
        return eager
    if provider == "triton":
        if device != "cuda":
            pytest.skip("the Triton peer is timed on GPU only (on CPU it runs in the interpreter)")
        from raphael_ext.triton_kernels import cross_attention_mask_forward

        return lambda q, k, v: cross_attention_mask_forward(q, k, v, ALPHA)
    raise AssertionError(provider)


def make_inputs(device, dtype, B, H, Nx, Ny, D, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    # Projections viewed as [B, N, H, D] and transposed, as a model makes them.
    q = torch.randn(B, Nx, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(B, Ny, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(B, Ny, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def record(benchmark, group, provider, device, nbytes=None):
    benchmark.group = group
    benchmark.extra_info.update(group=group, provider=provider, device=device)
    if nbytes:
        benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"


def peak_bytes(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def case_id(case):
    device, dtype, B, H, Nx, Ny, D = case
    return f"{device}-{str(dtype).replace('torch.', '')}-B{B}H{H}Nx{Nx}Ny{Ny}D{D}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cross_attention_mask_forward(run, benchmark, case, provider):
    device, dtype, B, H, Nx, Ny, D = case
    group = f"cross_attention_mask fwd {case_id(case)}"
    nbytes = forward_bytes(B, H, Nx, Ny, D, dtype)
    if provider == "copy (same bytes)":
        if device != "cuda":
            pytest.skip("the copy roofline is a GPU figure")
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        record(benchmark, group, provider, device, nbytes)
        run(lambda: dst.copy_(src), device, rounds=50, warmup=5)
        return
    fn = provider_fn(provider, device)
    q, k, v = make_inputs(device, dtype, B, H, Nx, Ny, D, requires_grad=False)
    record(benchmark, group, provider, device, nbytes)
    benchmark.extra_info["peak_bytes"] = peak_bytes(lambda: fn(q, k, v), device)
    run(lambda: fn(q, k, v), device, rounds=20, warmup=2)


@pytest.mark.parametrize("provider", ["raphael_ext", "sdpa + map pass", "eager"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cross_attention_mask_forward_backward(run, benchmark, case, provider):
    device, dtype, B, H, Nx, Ny, D = case
    fn = provider_fn(provider, device)
    q, k, v = make_inputs(device, dtype, B, H, Nx, Ny, D, requires_grad=True)
    g = torch.Generator(device=device).manual_seed(1)
    grad_out = torch.randn(B, H, Nx, D, device=device, dtype=dtype, generator=g)
    grad_map = torch.randn(B, Nx, Ny, device=device, dtype=dtype, generator=g) / math.sqrt(Nx)

    def step():
        out, attn_map, _ = fn(q, k, v)
        torch.autograd.backward((out, attn_map), (grad_out, grad_map))
        q.grad = k.grad = v.grad = None

    record(benchmark, f"cross_attention_mask fwd+bwd {case_id(case)}", provider, device)
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
    run(step, device, rounds=10, warmup=2)

"""Shared by the expert-op tests: independent float64 references (docs/kernels.md written as loops) and inputs."""

import torch
import torch.nn.functional as F

# Relative tolerance of the expert ops vs the float64 references: two chained GEMMs whose float32 sums
# are rounded to the dtype in between (the hidden activations), so a few ulps more than RTOL; on CUDA,
# float32 runs on TF32 tensor cores (10-bit mantissa) where PyTorch's flags allow TF32 matmuls.
MOE_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TF32_RTOL = 4e-3


def moe_rtol(dtype, device):
    tf32 = dtype == torch.float32 and str(device).startswith("cuda") and torch.backends.cuda.matmul.allow_tf32
    return TF32_RTOL if tf32 else MOE_RTOL[dtype]


def randn(shape, dtype, device, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)


def make_experts(E, C, F_, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        randn((E, C, F_), dtype, device, g, C**-0.5),
        randn((E, F_), dtype, device, g, 0.5),
        randn((E, F_, C), dtype, device, g, F_**-0.5),
        randn((E, C), dtype, device, g, 0.5),
    )


def grouped_reference(a, b, offsets, bias=None, activation=None):
    """Loop over groups in float64; rows past offsets[-1] are zero."""
    a, b = a.double().cpu(), b.double().cpu()
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        rows = a[start:end] @ b[g]
        if bias is not None:
            rows = rows + bias[g].double().cpu()
        out[start:end] = F.gelu(rows) if activation == "gelu" else rows
        start = end
    return out


def expert(h, w1, b1, w2, b2, k):
    return F.gelu(h @ w1[k] + b1[k]) @ w2[k] + b2[k]


def naive_space_moe(x, mask, route, gate, w1, b1, w2, b2, text_lengths=None):
    """Space-MoE as written: loop over text tokens, the chosen expert applied to the masked features. Keeps
    autograd (used for reference gradients); call with float64 CPU tensors."""
    B, _, N_y = mask.shape
    out = x * 0  # keeps a graph even when no text token contributes
    for b in range(B):
        n_y = N_y if text_lengths is None else int(text_lengths[b])
        for i in range(n_y):
            k = int(route[b, i])
            masked = x[b] * mask[b, :, i, None].to(x.dtype)
            out[b] = out[b] + gate[b, i] * expert(masked, w1, b1, w2, b2, k) / n_y
    return out


def naive_time_moe(x, route, w1, b1, w2, b2):
    return torch.stack([expert(x[b], w1, b1, w2, b2, int(route[b])) for b in range(x.shape[0])]) if len(x) else x * 0


def make_space_inputs(B, N_x, N_y, C, F_, E, dtype=torch.float64, device="cpu", seed=0, density=0.3, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = randn((B, N_x, C), dtype, device, g)
    mask = (torch.rand((B, N_x, N_y), generator=g) < density).to(device)
    route = torch.randint(0, E, (B, N_y), generator=g).to(device)
    gate = (0.5 + torch.rand((B, N_y), generator=g, dtype=torch.float64)).to(dtype).to(device)
    text_lengths = None if lengths is None else torch.tensor(lengths, device=device)
    return x, mask, route, gate, *make_experts(E, C, F_, dtype, device, seed + 1), text_lengths


def to_reference(*tensors):
    """float64 CPU copies that require grad where the original is floating point."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(None if t is None else t.cpu())
        else:
            out.append(t.detach().double().cpu().requires_grad_())
    return out

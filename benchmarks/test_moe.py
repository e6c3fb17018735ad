"""Expert GEMMs (docs/kernels.md): raphael_ext vs its peers, side by side on the same inputs.

- grouped_gemm: vs dense torch.mm of equal FLOPs (the ceiling), torch.nn.functional.grouped_mm, a loop of torch.mm.
- routing plan alone: vs the same plan in PyTorch (one-hot bmm, nonzero per expert).
- space_moe forward at N_y = 40: vs the naive formula (every text token's expert on its masked image) and vs
  the same plan in pure PyTorch (one-hot weights, per-expert mm on gathered rows, index_add).
- space_moe forward + backward, saving the hidden activations and recomputing them, each vs the PyTorch plan
  and vs its GEMMs alone (the ceiling),
  with the peak memory of each (extra_info: peak_mib during forward + backward, kept_mib between the passes).
- time_moe forward + backward, keeping or recomputing the first GEMM: vs a loop over samples and F.grouped_mm on
  the samples sorted by expert.
Goals (read from the table, not asserted): GPU grouped_gemm >= 85 % of dense and >= 1.1x F.grouped_mm at
T = 16 384, C = 1024, F = 4096, E = 6 (bf16), plan <= 20 us, space_moe >= 10x naive; CPU (B=2, N_x=1024, N_y=40,
C=256, F=1024, E=6, fp32) space_moe >= 10x naive and >= 1.5x the pure-PyTorch plan, forward + backward >= 1.25x
the plan when saving and >= 1.0x when recomputing. Masks are Bernoulli with density 0.2 (each image token is
covered by ~8 of the 40 text tokens).
"""

import functools
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch.profiler._memory_profiler import Action

from raphael_ext.ops import grouped_gemm, space_moe, space_moe_plan, time_moe

CUDA = torch.cuda.is_available()
DENSITY = 0.2

GEMM_CASES = [("cpu", torch.float32, 6144, 256, 1024)]
SPACE_CASES = [("cpu", torch.float32, 2, 1024, 256, 1024)]
if CUDA:
    GEMM_CASES += [pytest.param("cuda", torch.bfloat16, 16384, 1024, 4096, marks=pytest.mark.cuda)]
    SPACE_CASES += [pytest.param("cuda", torch.bfloat16, 8, 4096, 1024, 4096, marks=pytest.mark.cuda)]
EXPERTS, TEXT = 6, 40


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _split_rows(total, groups, generator):
    """Uneven group sizes summing to total (as routing gives), offsets int32."""
    weights = torch.rand(groups, generator=generator) + 0.5
    sizes = (weights / weights.sum() * total).floor().long()
    sizes[-1] += total - sizes.sum()
    return sizes


@pytest.mark.parametrize("provider", ["raphael_ext", "torch.mm (dense, same FLOPs)", "F.grouped_mm", "loop of torch.mm"])
@pytest.mark.parametrize("device,dtype,T,C,F_", GEMM_CASES, ids=lambda c: _name(c) if isinstance(c, torch.dtype) else str(c))
def test_grouped_gemm(run, benchmark, device, dtype, T, C, F_, provider):
    g = torch.Generator().manual_seed(0)
    sizes = _split_rows(T, EXPERTS, g)
    a = torch.randn(T, C, generator=g).to(device, dtype)
    b = (torch.randn(EXPERTS, C, F_, generator=g) * C**-0.5).to(device, dtype)
    offsets = sizes.cumsum(0).to(torch.int32).to(device)
    ends = offsets.tolist()
    if provider == "raphael_ext":
        def step():
            grouped_gemm(a, b, offsets)
    elif provider == "torch.mm (dense, same FLOPs)":
        b0 = b[0]

        def step():
            torch.mm(a, b0)
    elif provider == "F.grouped_mm":
        def step():
            F.grouped_mm(a, b, offs=offsets)
    else:
        def step():
            start = 0
            for k, end in enumerate(ends):
                torch.mm(a[start:end], b[k])
                start = end

    benchmark.group = f"grouped_gemm {device} {_name(dtype)} T={T} K={C} N={F_} E={EXPERTS}"
    benchmark.extra_info.update(group=benchmark.group, provider=provider, flops=2 * T * C * F_, device=device)
    run(step, device, rounds=5 if device == "cpu" else 50, warmup=1 if device == "cpu" else 5)


def space_inputs(device, dtype, B, N_x, C, F_, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_x, C, generator=g).to(device, dtype)
    mask = (torch.rand(B, N_x, TEXT, generator=g) < DENSITY).to(device)
    route = torch.randint(0, EXPERTS, (B, TEXT), generator=g).to(device)
    gate = torch.ones(B, TEXT, device=device, dtype=dtype)
    w1 = (torch.randn(EXPERTS, C, F_, generator=g) * C**-0.5).to(device, dtype)
    b1 = (torch.randn(EXPERTS, F_, generator=g) * 0.1).to(device, dtype)
    w2 = (torch.randn(EXPERTS, F_, C, generator=g) * F_**-0.5).to(device, dtype)
    b2 = (torch.randn(EXPERTS, C, generator=g) * 0.1).to(device, dtype)
    return x, mask, route, gate, w1, b1, w2, b2


def naive_space_moe(x, mask, route, gate, w1, b1, w2, b2):
    """Space-MoE as written: for every text token, its expert on the whole masked image (all N_y valid)."""
    out = torch.zeros_like(x)
    n_y = mask.shape[2]
    for b in range(x.shape[0]):
        for i in range(n_y):
            k = int(route[b, i])
            h = x[b] * mask[b, :, i, None].to(x.dtype)
            out[b] += gate[b, i] / n_y * (F.gelu(h @ w1[k] + b1[k]) @ w2[k] + b2[k])
    return out


def torch_plan(mask, route, gate, num_experts):
    """The routing plan in PyTorch: one-hot weights by bmm, pairs where some covering token chose the expert."""
    onehot = F.one_hot(route, num_experts).to(gate.dtype)
    scaled = onehot * (gate / mask.shape[2]).unsqueeze(-1)
    m = mask.to(gate.dtype)
    weight = torch.bmm(m, scaled).flatten(0, 1)
    z = torch.bmm(1 - m, scaled).flatten(0, 1)
    present = torch.bmm(m, onehot).flatten(0, 1) > 0
    return weight, z, present


def torch_plan_space_moe(x, mask, route, gate, w1, b1, w2, b2):
    """The same plan as raphael_ext in pure PyTorch: per-expert mm on gathered rows, index_add back."""
    B, N_x, C = x.shape
    weight, z, present = torch_plan(mask, route, gate, w1.shape[0])
    c = torch.baddbmm(b2.unsqueeze(1), F.gelu(b1).unsqueeze(1), w2).squeeze(1)
    y = z @ c
    tokens = x.reshape(-1, C)
    for k in range(w1.shape[0]):
        idx = present[:, k].nonzero().squeeze(1)
        h = F.gelu(torch.addmm(b1[k], tokens[idx], w1[k]))
        y.index_add_(0, idx, torch.addmm(b2[k], h, w2[k]) * weight[idx, k, None])
    return y.view(B, N_x, C)


@pytest.mark.parametrize("provider", ["raphael_ext", "pure-PyTorch plan"])
@pytest.mark.parametrize("device,dtype,B,N_x,C,F_", SPACE_CASES, ids=lambda c: _name(c) if isinstance(c, torch.dtype) else str(c))
def test_routing_plan(run, benchmark, device, dtype, B, N_x, C, F_, provider):
    _, mask, route, gate, *_ = space_inputs(device, dtype, B, N_x, C, F_)
    if provider == "raphael_ext":
        def step():
            space_moe_plan(mask, route, gate, EXPERTS)
    else:
        def step():
            _, _, present = torch_plan(mask, route, gate, EXPERTS)
            present.int().cumsum(0)  # rows of the pairs, as the counting sort gives them

    benchmark.group = f"routing plan {device} B={B} N_x={N_x} N_y={TEXT} E={EXPERTS}"
    benchmark.extra_info.update(group=benchmark.group, provider=provider, device=device)
    run(step, device, rounds=20 if device == "cpu" else 200, warmup=3 if device == "cpu" else 20)


@pytest.mark.parametrize("provider", ["raphael_ext", "pure-PyTorch plan", "naive formula"])
@pytest.mark.parametrize("device,dtype,B,N_x,C,F_", SPACE_CASES, ids=lambda c: _name(c) if isinstance(c, torch.dtype) else str(c))
def test_space_moe_forward(run, benchmark, device, dtype, B, N_x, C, F_, provider):
    inputs = space_inputs(device, dtype, B, N_x, C, F_)
    fn = {"raphael_ext": space_moe, "pure-PyTorch plan": torch_plan_space_moe, "naive formula": naive_space_moe}[provider]

    def step():
        with torch.no_grad():
            fn(*inputs)

    benchmark.group = f"space_moe fwd {device} {_name(dtype)} B={B} N_x={N_x} N_y={TEXT} C={C} F={F_} E={EXPERTS}"
    benchmark.extra_info.update(group=benchmark.group, provider=provider, device=device)
    slow = provider == "naive formula"
    run(step, device, rounds=3 if slow else (10 if device == "cpu" else 30), warmup=1 if slow else 2)


def memory_mib(step):
    """(peak, kept) MiB that step allocates on the CPU, from torch.profiler's memory timeline (every allocation
    and free of the allocator, in order): peak is the most held at once, kept what is still held when it returns.
    The kernels' per-thread scratch blocks inside parallel regions are not seen (under 4 MiB per thread)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        result = step()
    held = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        held += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, held)
    del result
    return peak / 2**20, held / 2**20


MODES = {"save": False, "recompute": True}


def gemm_ceiling(params, mask, route, gate, recompute):
    """The expert GEMMs of forward + backward alone (6, or 7 when recomputing), one mm per expert on rows and
    outputs allocated beforehand: what the op would cost with nothing around its GEMMs."""
    x, _, w1, _, w2, _ = [t.detach() for t in params]
    offsets = space_moe_plan(mask, route, gate, w1.shape[0])[0].tolist()
    buffers = []
    for k, (start, end) in enumerate(zip([0] + offsets[:-1], offsets)):
        rows, C, F_ = end - start, w1.shape[1], w1.shape[2]
        buffers.append((k, x.new_ones(rows, C), x.new_empty(rows, F_), x.new_empty(rows, C), x.new_empty(C, F_),
                        x.new_empty(F_, C)))

    def step():
        for k, a, h, y, dw1, dw2 in buffers:
            for _ in range(2 if recompute else 1):
                torch.mm(a, w1[k], out=h)
            torch.mm(h, w2[k], out=y)
            torch.mm(y, w2[k].t(), out=h)
            torch.mm(h, w1[k].t(), out=y)
            torch.mm(h.t(), y, out=dw2)
            torch.mm(a.t(), h, out=dw1)

    return step


@pytest.mark.parametrize("provider", ["raphael_ext", "pure-PyTorch plan", "GEMMs alone (ceiling)"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("device,dtype,B,N_x,C,F_", SPACE_CASES, ids=lambda c: _name(c) if isinstance(c, torch.dtype) else str(c))
def test_space_moe_forward_backward(run, benchmark, device, dtype, B, N_x, C, F_, mode, provider):
    x, mask, route, gate, *weights = space_inputs(device, dtype, B, N_x, C, F_)
    params = [t.clone().requires_grad_() for t in (x, gate, *weights)]
    if provider == "raphael_ext":
        def forward():
            return space_moe(params[0], mask, route, *params[1:], recompute=MODES[mode])
    else:
        def forward():
            return torch_plan_space_moe(params[0], mask, route, *params[1:])

    def step():
        out = forward()
        return torch.autograd.grad(out, params, torch.ones_like(out))

    if provider == "GEMMs alone (ceiling)":
        step = gemm_ceiling(params, mask, route, gate, MODES[mode])
    benchmark.group = (f"space_moe fwd+bwd ({mode} hidden) {device} {_name(dtype)} B={B} N_x={N_x} N_y={TEXT} C={C} "
                       f"F={F_} E={EXPERTS}")
    benchmark.extra_info.update(group=benchmark.group, provider=provider, device=device)
    if device == "cpu" and provider != "GEMMs alone (ceiling)":
        peak, _ = memory_mib(step)
        _, kept = memory_mib(forward)
        benchmark.extra_info.update(peak_mib=round(peak, 1), kept_mib=round(kept, 1))
        if provider == "raphael_ext" and not benchmark.disabled:
            benchmark.extra_info.update(paired_speedup(step, params, mask, route))
    run(step, device, rounds=5 if device == "cpu" else 20, warmup=1 if device == "cpu" else 3)


def paired_speedup(step, params, mask, route, rounds=15):
    """The PyTorch plan's time over ours with the two alternating round by round, so that load from other
    processes on a shared machine hits both alike, and which goes first alternating too (each leaves the allocator
    and caches to the other): the ratio of the medians and of the fastest rounds."""
    def plan_step():
        out = torch_plan_space_moe(params[0], mask, route, *params[1:])
        torch.autograd.grad(out, params, torch.ones_like(out))

    times = {step: [], plan_step: []}
    for round_ in range(rounds):
        for fn in list(times) if round_ % 2 == 0 else reversed(list(times)):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    ours, plan = times[step], times[plan_step]
    return dict(paired_median_speedup=round(statistics.median(plan) / statistics.median(ours), 3),
                paired_min_speedup=round(min(plan) / min(ours), 3))


TIME_CASES = [("cpu", torch.float32, 8, 1024, 256, 1024)]
if CUDA:
    TIME_CASES += [pytest.param("cuda", torch.bfloat16, 8, 4096, 1024, 4096, marks=pytest.mark.cuda)]
TIME_EXPERTS = 4


def time_moe_loop(x, route, w1, b1, w2, b2):
    """One FFN per sample, each with its expert's weights."""
    return torch.stack([F.gelu(x[b] @ w1[k] + b1[k]) @ w2[k] + b2[k] for b, k in enumerate(route.tolist())])


def time_moe_grouped_mm(x, route, w1, b1, w2, b2):
    """Samples sorted by expert, then two F.grouped_mm with the bias and GELU as separate ops."""
    B, N, C = x.shape
    order = torch.argsort(route, stable=True)
    ends = (torch.bincount(route, minlength=w1.shape[0]).cumsum(0) * N).to(torch.int32)
    rows = x[order].reshape(B * N, C)
    expert_of_row = route[order].repeat_interleave(N)
    hidden = F.gelu(F.grouped_mm(rows, w1, offs=ends) + b1[expert_of_row])
    out = F.grouped_mm(hidden, w2, offs=ends) + b2[expert_of_row]
    return torch.empty_like(x).index_copy_(0, order, out.view(B, N, C))


TIME_PROVIDERS = ["raphael_ext", "raphael_ext, recompute=True", "loop over samples", "F.grouped_mm"]


@pytest.mark.parametrize("provider", TIME_PROVIDERS)
@pytest.mark.parametrize("device,dtype,B,N,C,F_", TIME_CASES, ids=lambda c: _name(c) if isinstance(c, torch.dtype) else str(c))
def test_time_moe_forward_backward(run, benchmark, device, dtype, B, N, C, F_, provider):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g).to(device, dtype)
    route = torch.randint(0, TIME_EXPERTS, (B,), generator=g).to(device)
    w1 = (torch.randn(TIME_EXPERTS, C, F_, generator=g) * C**-0.5).to(device, dtype)
    b1 = (torch.randn(TIME_EXPERTS, F_, generator=g) * 0.1).to(device, dtype)
    w2 = (torch.randn(TIME_EXPERTS, F_, C, generator=g) * F_**-0.5).to(device, dtype)
    b2 = (torch.randn(TIME_EXPERTS, C, generator=g) * 0.1).to(device, dtype)
    params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    fn = {"raphael_ext": time_moe, "raphael_ext, recompute=True": functools.partial(time_moe, recompute=True),
          "loop over samples": time_moe_loop, "F.grouped_mm": time_moe_grouped_mm}[provider]

    def step():
        out = fn(params[0], route, *params[1:])
        torch.autograd.grad(out, params, torch.ones_like(out))

    benchmark.group = f"time_moe fwd+bwd {device} {_name(dtype)} B={B} N={N} C={C} F={F_} E={TIME_EXPERTS}"
    benchmark.extra_info.update(group=benchmark.group, provider=provider, device=device)
    run(step, device, rounds=5 if device == "cpu" else 20, warmup=1 if device == "cpu" else 3)


def test_peers_agree_with_raphael_ext():
    """The peers compute the same thing (else the comparison means nothing); small CPU case."""
    inputs = space_inputs("cpu", torch.float64, 2, 64, 16, 32)
    expected = space_moe(*inputs)
    torch.testing.assert_close(naive_space_moe(*inputs), expected)
    torch.testing.assert_close(torch_plan_space_moe(*inputs), expected)
    x = torch.randn(5, 6, 8)  # float32: F.grouped_mm takes no float64
    route = torch.tensor([2, 0, 2, 3, 0])
    experts = [torch.randn(shape) for shape in ((4, 8, 12), (4, 12), (4, 12, 8), (4, 8))]
    expected = time_moe(x, route, *experts)
    torch.testing.assert_close(time_moe_loop(x, route, *experts), expected)
    torch.testing.assert_close(time_moe_grouped_mm(x, route, *experts), expected)


def test_memory_measure_sees_allocations():
    """memory_mib counts what a step allocates: 2 + 1 + 1 MiB held at once at the add, its 1 MiB result kept."""
    def step():
        temporary = torch.ones(2 * 2**18)
        return torch.ones(2**18) + temporary[: 2**18]

    peak, kept = memory_mib(step)
    assert (round(peak), round(kept)) == (4, 1)

"""Runtime vs number of space experts (paper Fig. 6c): DDIM steps per second of a full denoising step
(classifier-free guidance: unconditional + conditional batch, then the scheduler step; 40 valid text tokens of 77)
for 0..8 space experts, two implementations side by side:

- `raphael_ext`: the model as shipped (fused cross-attention-mask op, planned space_moe).
- `reference`: the same weights with the two RAPHAEL ops swapped for pure PyTorch: eager attention with
  materialised probabilities, and the naive space-MoE formula (a loop over text tokens, each expert applied to
  its masked features).

extra_info: `experts`, `routed_rows` (expert rows the planned space-MoE runs, summed over blocks: it stops growing
once every expert is in use) and `steps_per_s`. CPU uses the tiny preset (32x32 pixels); GPU the paper preset's
widths in bfloat16 at one of its buckets (640x640, an 80x80 latent). `python benchmarks/plot_runtime_vs_experts.py
results.json` draws the figure. Goals (read, not asserted): raphael_ext at 6 experts >= 0.85x the steps/s of 0
experts on GPU (the paper: 0.76x) and >= 3x the reference at 6 experts; on CPU >= 3x the reference at 6 experts.
"""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

import raphael_ext.nn as rnn
from raphael_ext import RaphaelUNet
from raphael_ext.pipelines.pipeline_raphael import default_scheduler

CUDA = torch.cuda.is_available()
EXPERTS = list(range(9))
VALID_TOKENS = 40
CASES = [("cpu", torch.float32, "tiny")]
if CUDA:
    CASES += [("cuda", torch.bfloat16, "paper")]


def _valid(lengths, keys, device):
    return torch.arange(keys, device=device)[None, :] < lengths[:, None]


def eager_cross_attention_mask(q, k, v, alpha=0.2, text_lengths=None, scale=None):
    """What prompt-to-prompt-style code does: the [B, H, N_x, N_y] probabilities in memory."""
    batch, keys = q.shape[0], k.shape[2]
    lengths = text_lengths if text_lengths is not None else torch.full((batch,), keys, device=q.device)
    valid = _valid(lengths, keys, q.device)
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    probs = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    attn_map = probs.mean(dim=1)
    mask = (attn_map.float() >= alpha * attn_map.float().amax(dim=1, keepdim=True)) & valid[:, None, :]
    return probs @ v, attn_map, mask


def naive_space_moe(x, mask, route, gate, w1, b1, w2, b2, text_lengths=None, recompute=False):
    """Space-MoE as written: for each valid text token, its expert on the features its mask keeps (`recompute`, how
    the op keeps its hidden activations for a backward, does not apply)."""
    out = torch.zeros_like(x)
    lengths = text_lengths.tolist() if text_lengths is not None else [route.shape[1]] * x.shape[0]
    for b, n in enumerate(lengths):
        for i in range(n):
            k = int(route[b, i])
            hidden = F.gelu((x[b] * mask[b, :, i, None].to(x.dtype)) @ w1[k] + b1[k])
            out[b] += gate[b, i] * (hidden @ w2[k] + b2[k]) / n
    return out


@contextlib.contextmanager
def reference_ops():
    saved = rnn.cross_attention_mask, rnn.space_moe
    rnn.cross_attention_mask, rnn.space_moe = eager_cross_attention_mask, naive_space_moe
    try:
        yield
    finally:
        rnn.cross_attention_mask, rnn.space_moe = saved


def routed_rows(out, text_lengths, alpha):
    """Rows the planned space-MoE computes: per image token, the distinct experts of the tokens that cover it."""
    total = 0
    for attn_map, route in zip(out.attn_maps, out.space_routes):
        if route is None:
            continue
        valid = _valid(text_lengths, route.shape[1], route.device)
        mask = (attn_map.float() >= alpha * attn_map.float().amax(dim=1, keepdim=True)) & valid[:, None, :]
        onehot = F.one_hot(route, int(route.max()) + 1).float() * valid[..., None]
        total += int((mask.float() @ onehot).gt(0).sum())
    return total


@functools.lru_cache(maxsize=1)
def denoising_step(case, experts):
    """The model and inputs of one expert count, built once and shared by both providers (the tests of one count
    run back to back; one model at a time stays in memory: the paper preset has 2.98 B parameters)."""
    device, dtype, preset = case
    torch.manual_seed(0)
    with torch.device(device):
        unet = RaphaelUNet.from_preset(preset, space_experts=experts, gradient_checkpointing=False).to(dtype).eval()
    config = unet.config
    scheduler = default_scheduler(unet)
    scheduler.set_timesteps(50, device=device)
    t = scheduler.timesteps[25]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=g).to(device, dtype)
    text = torch.randn(2, config.text_tokens, config.cross_attention_dim, generator=g).to(device, dtype)
    lengths = torch.tensor([2, VALID_TOKENS], device=device)  # unconditional ("" = start + end), conditional

    def ddim_step():
        with torch.no_grad():
            out = unet(torch.cat([x, x]), t.expand(2), text, lengths)
            eps_null, eps_text = out.sample.chunk(2)
            return scheduler.step(eps_null + 4.5 * (eps_text - eps_null), t, x).prev_sample, out

    return ddim_step, routed_rows(ddim_step()[1], lengths, config.alpha)


@pytest.mark.parametrize("provider", ["raphael_ext", "reference"])
@pytest.mark.parametrize("experts", EXPERTS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}")
def test_ddim_step_vs_space_experts(run, benchmark, case, experts, provider):
    device, _, preset = case
    ddim_step, rows = denoising_step(case, experts)
    with reference_ops() if provider == "reference" else contextlib.nullcontext():
        benchmark.group = f"runtime_vs_experts {device} {preset}"
        benchmark.extra_info.update(group=f"{benchmark.group} E={experts}", provider=provider, experts=experts,
                                    routed_rows=rows, device=device, study="runtime_vs_experts")
        run(ddim_step, device, rounds=3 if device == "cpu" else 5, warmup=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (make test runs each case once)
        benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median


def test_each_expert_count_builds_one_model():
    """Both providers of an expert count time the same model, built once (the paper preset takes seconds)."""
    denoising_step.cache_clear()
    for experts in (1, 1, 2, 2):  # the order in which the study's tests run
        denoising_step(CASES[0], experts)
    assert denoising_step.cache_info().misses == 2

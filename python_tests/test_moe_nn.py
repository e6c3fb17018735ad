"""raphael_ext.nn.SpaceMoE and TimeMoE: gates, straight-through weights, noise, balance loss, the off switch."""

import pytest
import torch
import torch.nn.functional as F

from raphael_ext.nn import SpaceMoE, TimeMoE
from raphael_ext.ops import space_moe, time_moe

from moe_helpers import naive_space_moe


def space_inputs(B=2, N_x=12, N_y=5, C=16, d_y=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_x, C, generator=g)
    text = torch.randn(B, N_y, d_y, generator=g)
    mask = torch.rand(B, N_x, N_y, generator=g) < 0.4
    return x, text, mask


@pytest.mark.parametrize("cls,args", [(SpaceMoE, space_inputs()), (TimeMoE, None)])
def test_zero_experts_is_identity(cls, args):
    if cls is SpaceMoE:
        layer = SpaceMoE(16, 8, 0)
        x, text, mask = args
        result = layer(x, text, mask)
    else:
        layer = TimeMoE(16, 8, 0)
        x = torch.randn(3, 4, 16)
        result = layer(x, torch.randn(3, 8))
    assert result.out is x and result.route is None and list(layer.parameters()) == []


def test_space_moe_layer_is_the_formula_with_unit_gates():
    torch.manual_seed(0)
    layer = SpaceMoE(16, 8, 3, hidden_mult=2).eval().double()
    x, text, mask = (t.double() if t.is_floating_point() else t for t in space_inputs())
    lengths = torch.tensor([5, 3])
    result = layer(x, text, mask, lengths)
    expected_route = layer.gate(text).argmax(-1)
    assert torch.equal(result.route, expected_route)
    ones = torch.ones(2, 5, dtype=torch.float64)
    expected = x + naive_space_moe(x, mask, result.route, ones, *layer.experts.parameters(), lengths)
    torch.testing.assert_close(result.out, expected)


def test_space_gate_gets_gradient_through_the_chosen_probability():
    torch.manual_seed(0)
    layer = SpaceMoE(16, 8, 3, hidden_mult=2).eval()
    x, text, mask = space_inputs()
    layer(x, text, mask).out.square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # d out / d logits equals the gradient of the mixture with gate g = p (straight-through), checked by hand:
    layer.zero_grad()
    logits = layer.gate(text)
    probs = torch.softmax(logits, -1)
    route = probs.argmax(-1)
    p = probs.gather(-1, route.unsqueeze(-1)).squeeze(-1)
    manual = (x + space_moe(x, mask, route, p / p.detach(), *layer.experts.parameters())).square().sum()
    (g_manual,) = torch.autograd.grad(manual, layer.gate[2].bias)
    (g_layer,) = torch.autograd.grad(layer(x, text, mask).out.square().sum(), layer.gate[2].bias)
    torch.testing.assert_close(g_layer, g_manual)


def run_both_modes(make_layer, *inputs):
    """The layer built with recompute False and True from one seed: per mode, the shapes autograd keeps between the
    passes; both modes must give the same output and parameter gradients."""
    results, kept = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = make_layer(recompute).eval()
        assert f"recompute={recompute}" in repr(layer)
        kept[recompute] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept[recompute].append(tuple(t.shape)) or t,
                                                      lambda t: t):
            out = layer(*inputs).out
        out.square().sum().backward()
        results[recompute] = (out, [p.grad for p in layer.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b)
    return kept


def test_space_moe_recompute_switch():
    """recompute=True gives the same output and gradients while autograd keeps no [pairs, F] hidden activations."""
    kept = run_both_modes(lambda recompute: SpaceMoE(16, 8, 3, hidden_mult=2, recompute=recompute), *space_inputs())
    hidden = (2 * 12 * 3, 32)  # [B * N_x * min(E, N_y), F]
    assert hidden in kept[False] and hidden not in kept[True]


def test_time_moe_recompute_switch():
    """recompute=True gives the same output and gradients while autograd keeps no [B * N, F] buffer; saving, it
    keeps one (on the CPU, space_moe's pre-activations)."""
    torch.manual_seed(0)
    x, t_emb = torch.randn(5, 6, 16), torch.randn(5, 8)
    kept = run_both_modes(lambda recompute: TimeMoE(16, 8, 3, hidden_mult=2, recompute=recompute), x, t_emb)
    assert kept[False].count((5 * 6, 32)) == 1 and kept[True].count((5 * 6, 32)) == 0


@pytest.mark.parametrize("key,layer", [("space_moe_recompute", SpaceMoE), ("time_moe_recompute", TimeMoE)])
def test_unet_config_sets_the_recompute_switch_of_every_expert_layer(key, layer):
    from raphael_ext import RaphaelUNet

    default = RaphaelUNet.from_preset("tiny")
    recomputing = RaphaelUNet.from_preset("tiny", **{key: True})
    assert recomputing.config[key]
    layers = [m for m in recomputing.modules() if isinstance(m, layer)]
    assert layers and all(m.recompute for m in layers)
    assert not any(m.recompute for m in recomputing.modules() if isinstance(m, (SpaceMoE, TimeMoE)) and m not in layers)
    assert not any(m.recompute for m in default.modules() if isinstance(m, (SpaceMoE, TimeMoE)))


def test_gate_noise_only_in_training():
    torch.manual_seed(0)
    layer = SpaceMoE(16, 8, 6, gate_noise=10.0)
    x, text, mask = space_inputs(N_y=40)
    layer.eval()
    assert torch.equal(layer(x, text, mask).route, layer(x, text, mask).route)
    layer.train()
    routes = [layer(x, text, mask).route for _ in range(3)]
    assert not torch.equal(routes[0], routes[1]) or not torch.equal(routes[1], routes[2])


def test_balance_loss_is_switch_formula():
    torch.manual_seed(0)
    layer = SpaceMoE(16, 8, 4, balance_loss=True).eval()
    x, text, mask = space_inputs()
    lengths = torch.tensor([5, 2])
    result = layer(x, text, mask, lengths)
    probs = torch.softmax(layer.gate(text), -1)
    valid = torch.arange(5) < lengths.unsqueeze(1)
    route, probs = result.route[valid], probs[valid]
    expected = 4 * (F.one_hot(route, 4).float().mean(0) * probs.mean(0)).sum()
    torch.testing.assert_close(result.balance_loss, expected)
    assert SpaceMoE(16, 8, 4).eval()(x, text, mask).balance_loss is None


def test_time_moe_layer():
    torch.manual_seed(0)
    layer = TimeMoE(16, 8, 4, balance_loss=True).eval()
    x, t_emb = torch.randn(5, 6, 16), torch.randn(5, 8)
    result = layer(x, t_emb)
    assert torch.equal(result.route, layer.gate(t_emb).argmax(-1))
    torch.testing.assert_close(result.out, x + time_moe(x, result.route, *layer.experts.parameters()))
    result.out.sum().backward()
    assert layer.gate[0].weight.grad is not None and layer.gate[0].weight.grad.abs().sum() > 0
    assert result.balance_loss.shape == ()


def test_layers_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    space, time = SpaceMoE(16, 8, 3).eval(), TimeMoE(16, 8, 2).eval()
    x, text, mask = space_inputs()
    t_emb = torch.randn(2, 8)

    def block(x):
        h = time(x, t_emb).out
        return space(h, text, mask).out

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_pybind11_entry_points_keep_autograd():
    import raphael_ext

    from moe_helpers import make_space_inputs

    x, mask, route, gate, w1, b1, w2, b2, lengths = make_space_inputs(2, 5, 3, 4, 6, 2, lengths=[3, 1])
    x.requires_grad_()
    out = raphael_ext._C.space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths)
    torch.testing.assert_close(out, space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths).sum(), x)
    torch.testing.assert_close(grad, expected)
    a, offsets = x.detach().reshape(10, 4), torch.tensor([4, 10], dtype=torch.int32)
    torch.testing.assert_close(raphael_ext._C.grouped_gemm(a, w1, offsets, b1, "gelu"),
                               raphael_ext.ops.grouped_gemm(a, w1, offsets, b1, "gelu"))
    torch.testing.assert_close(raphael_ext._C.time_moe(x.detach(), route[:, 0], w1, b1, w2, b2),
                               time_moe(x.detach(), route[:, 0], w1, b1, w2, b2))


@pytest.mark.parametrize("cls", [SpaceMoE, TimeMoE])
def test_experts_run_in_the_autocast_dtype(cls):
    """Under autocast the expert ops get the autocast dtype for their input and weights (as nn.Linear would),
    not LayerNorm's float32; the weights' gradients stay float32 and match the float32 layer's to bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "raphael_ext":
                self.seen.append({t.dtype for t in args if isinstance(t, torch.Tensor) and t.is_floating_point()})
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, text, mask = space_inputs()
    layer = (SpaceMoE(16, 8, 3, pre_norm=True) if cls is SpaceMoE else TimeMoE(16, 8, 3, pre_norm=True)).eval()

    def run():
        layer.zero_grad()
        out = layer(x, text, mask) if cls is SpaceMoE else layer(x, text[:, 0])
        out.out.square().sum().backward()
        return out.out.detach(), [p.grad.clone() for p in layer.experts.parameters()]

    reference, reference_grads = run()
    with OpDtypes() as recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run()
    forward_calls = [dtypes for dtypes in recorder.seen if dtypes]
    assert forward_calls and forward_calls[0] == {torch.bfloat16}, recorder.seen
    assert out.dtype == torch.float32  # the residual stays in x's dtype
    torch.testing.assert_close(out, reference, rtol=5e-2, atol=5e-2)
    for grad, expected in zip(grads, reference_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item())

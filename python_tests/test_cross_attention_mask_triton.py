"""The Triton forward of cross_attention_mask, a second independent implementation: on CPU it runs under
Triton's interpreter, so the GPU-style tiling (masked tails, padded key tile, head loop, atomic column max)
is checked on every CI run; on a GPU it runs compiled."""

import os

import pytest
import torch

from helpers import CUDA

assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 without a GPU"
triton_kernels = pytest.importorskip("raphael_ext.triton_kernels")

from attention_reference import assert_within_torch_error, eager_attention  # noqa: E402
from test_cross_attention_mask import check_mask_contract, lengths_tensor, make_qkv  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Triton's interpreter before 3.8 (e.g. the GPU machine's 3.6) fails inside itself under numpy 2 ("only 0-dimensional
# arrays can be converted to Python scalars"); compiled kernels are unaffected, so only the CPU runs expect it.
_TRITON = tuple(int(part) for part in __import__("triton").__version__.split(".")[:2])
BROKEN_INTERPRETER = not CUDA and _TRITON < (3, 8)
pytestmark = [pytest.mark.cuda] if CUDA else []  # part of scripts/gpu_check.sh's `-m cuda` run on a GPU
if BROKEN_INTERPRETER:
    from triton.runtime.errors import InterpreterError

    pytestmark.append(pytest.mark.xfail(raises=InterpreterError, strict=True,
                                        reason="Triton < 3.8's interpreter breaks under numpy 2 (compiled kernels run)"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 37, 7, 32, [7, 3]), (1, 2, 70, 77, 64, None), (2, 1, 17, 128, 128, [0, 128]), (1, 1, 1, 1, 32, None)],
    ids=lambda s: "x".join(map(str, s[:5])),
)
def test_triton_forward_matches_reference(dtype, shape):
    B, H, Nx, Ny, D, lengths = shape
    q, k, v = make_qkv(B, H, Nx, Ny, D, dtype, DEVICE, seed=5)
    text_lengths = lengths_tensor(lengths, DEVICE)
    out, attn_map, mask = triton_kernels.cross_attention_mask_forward(q, k, v, 0.2, text_lengths, block_m=16)
    lengths_cpu = None if lengths is None else text_lengths.cpu()
    ref_out, ref_map = eager_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), lengths_cpu)
    torch_out, torch_map = eager_attention(q, k, v, text_lengths)
    assert out.shape == q.shape and attn_map.shape == (B, Nx, Ny) and out.dtype == attn_map.dtype == dtype
    assert_within_torch_error(out, torch_out, ref_out, dtype, "out")
    assert_within_torch_error(attn_map, torch_map, ref_map, dtype, "attn_map")
    check_mask_contract(attn_map, mask, 0.2, text_lengths)


def test_triton_agrees_with_the_extension_in_float32():
    q, k, v = make_qkv(2, 2, 50, 13, 64, torch.float32, DEVICE, seed=6)
    text_lengths = lengths_tensor([13, 8], DEVICE)
    ours = torch.ops.raphael_ext.cross_attention_mask(q, k, v, 0.2, text_lengths, None)
    theirs = triton_kernels.cross_attention_mask_forward(q, k, v, 0.2, text_lengths, block_m=32)
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs[1], ours[1], rtol=1e-5, atol=1e-7)

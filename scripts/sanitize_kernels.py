"""Small cases of every raphael_ext kernel, for compute-sanitizer (scripts/gpu_check.sh):

    compute-sanitizer --tool memcheck python -P scripts/sanitize_kernels.py [CASE ...] [--device cuda]

Each case runs its op forward and backward once on shapes that reach every code path of the kernel at the
smallest size that does (tails, padding keys, empty expert groups, unaligned operands), then synchronises,
so an error is reported against the case printed before it. Under a sanitizer the kernels run 10-100x
slower; the shapes are chosen for that. --device cpu runs the same cases on the CPU kernels (a rehearsal
of the script itself)."""

import argparse

import torch

import raphael_ext  # noqa: F401  (registers the ops)
from raphael_ext.ops import cross_attention_mask, grouped_gemm, sigmoid_focal_loss, space_moe, space_moe_plan


def focal(device):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3 * 4099 + 1, device=device, dtype=dtype)[1:].view(3, 4099).requires_grad_()  # misaligned
        t = torch.rand(3, 4099, device=device, dtype=dtype)
        mask = torch.tensor([True, False, True], device=device)
        sigmoid_focal_loss(x, t, sample_mask=mask).backward()


def attention(device):
    for dtype, d, keys in ((torch.bfloat16, 64, 77), (torch.float32, 32, 7), (torch.float16, 128, 128)):
        q = torch.randn(2, 37, 2, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(2, 2, keys, d, device=device, dtype=dtype).requires_grad_()
        v = torch.randn(2, 2, keys, d, device=device, dtype=dtype).requires_grad_()
        lengths = torch.tensor([keys, max(1, keys // 2)], device=device)
        out, attn_map, _ = cross_attention_mask(q, k, v, 0.2, lengths)
        (out.float().square().sum() + attn_map.float().sum()).backward()


def _grouped(device, dtype, rows, k, n, counts, offset=0):
    a = torch.randn(rows * k + offset, device=device, dtype=dtype)[offset:].view(rows, k).requires_grad_()
    b = torch.randn(len(counts), k, n, device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(len(counts), n, device=device, dtype=dtype).requires_grad_()
    offsets = torch.tensor(counts, device=device, dtype=torch.int32).cumsum(0).int()
    grouped_gemm(a, b, offsets, bias, "gelu").float().sum().backward()


def grouped_gemm_sm90(device):
    # bf16/fp16 with 16-byte rows: the CUTLASS 3.x kernels on Hopper (ping-pong and cooperative), empty groups.
    _grouped(device, torch.bfloat16, 200, 64, 128, [70, 0, 100])
    _grouped(device, torch.float16, 1200, 128, 256, [600, 0, 500, 64])


def grouped_gemm_sm80(device):
    # float32 as TF32 takes the CUTLASS 2.x kernel (also on Hopper, which runs no float32 Sm90 kernel).
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _grouped(device, torch.float32, 150, 32, 64, [50, 0, 90])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def grouped_gemm_fallback(device):
    # An unaligned operand and an odd width: the at::mm loop.
    _grouped(device, torch.bfloat16, 40, 24, 36, [10, 0, 25], offset=1)


def space_moe_case(device):
    for dtype in (torch.bfloat16, torch.float32):
        b, nx, ny, c, f, e = 2, 33, 9, 64, 128, 4
        x = torch.randn(b, nx, c, device=device, dtype=dtype).requires_grad_()
        mask = torch.rand(b, nx, ny, device=device) > 0.6
        route = torch.randint(0, e, (b, ny), device=device)
        gate = torch.ones(b, ny, device=device, dtype=dtype).requires_grad_()
        w1 = (torch.randn(e, c, f, device=device, dtype=dtype) * 0.1).requires_grad_()
        b1 = torch.randn(e, f, device=device, dtype=dtype).requires_grad_()
        w2 = (torch.randn(e, f, c, device=device, dtype=dtype) * 0.1).requires_grad_()
        b2 = torch.randn(e, c, device=device, dtype=dtype).requires_grad_()
        lengths = torch.tensor([ny, 4], device=device)
        space_moe_plan(mask, route, gate.detach(), e, lengths)
        space_moe(x, mask, route, gate, w1, b1, w2, b2, lengths).float().sum().backward()


CASES = {
    "focal": focal,
    "attention": attention,
    "grouped_gemm_sm90": grouped_gemm_sm90,
    "grouped_gemm_sm80": grouped_gemm_sm80,
    "grouped_gemm_fallback": grouped_gemm_fallback,
    "space_moe": space_moe_case,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    torch.manual_seed(0)
    for name in args.cases or CASES:
        print(f"sanitize case: {name}", flush=True)
        CASES[name](args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
    print("all cases ran", flush=True)


if __name__ == "__main__":
    main()

"""Triton implementations, kept as independent second implementations and benchmark peers of the C++/CUDA
ops. Importing this package imports Triton; set TRITON_INTERPRET=1 before importing it to run the kernels
on CPU tensors (the tests do)."""

from .cross_attention_mask import cross_attention_mask_forward

__all__ = ["cross_attention_mask_forward"]

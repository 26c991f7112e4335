"""What the kernels share: the block-size rule of the matmuls, the dot precision, and two ``@triton.jit`` helpers for the
small-M matmuls (the RMSNorm statistics of a row block and a normed, dtype-rounded activation tile).

Decode is memory-bound: M (rows = B * T new tokens) is 1..B(γ+1), so every kernel streams its weight once and keeps
the activations, which are tiny, in registers. ``tl.dot`` needs every dimension >= 16 on tensor cores, so row blocks
are padded to 16 and masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fills gaps of triton's CPU interpreter when TRITON_INTERPRET=1)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 activations use IEEE products (tf32 would lose bits and break exact greedy agreement with the
    reference); bf16/fp16 products are exact in fp32 accumulation anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class MatmulBlocks:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def matmul_blocks(m: int, n: int, k: int) -> MatmulBlocks:
    """The one rule for the small-M matmuls (projections, heads).

    BLOCK_M: the rows padded to a power of two, at least 16 (tensor-core minimum), at most 64 (prefill tiles M).
    BLOCK_N: 64 weight rows per program: at batch-1 decode the grid must still cover the SMs (N/64 programs:
    9 for SmolLM2's 576-wide o_proj, 64 for Vicuna's 4096), while each program streams 64*BLOCK_K contiguous weights.
    BLOCK_K: 128 elements = 256 bytes of bf16 per weight row per step, wide vector loads; smaller for tiny K.
    Prefill tiles (BLOCK_M > 16) carry two 64x64 fp32 accumulators (gate/up, the RoPE halves): they take 8 warps
    and BLOCK_K 64, else they spill on sm_80 (tests/test_kernel_compile.py checks this).
    """
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"matmul shape must be positive, got M={m}, N={n}, K={k}")
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    prefill = block_m > 16
    block_k = min(64 if prefill else 128, max(16, triton.next_power_of_2(k)))
    return MatmulBlocks(block_m, block_n, block_k, num_warps=8 if prefill else 4)


def check_rows(name: str, x: torch.Tensor, k: int) -> None:
    """x must be [..., K] with a unit last stride (rows may be strided)."""
    if x.shape[-1] != k:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {k}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs a unit stride in its last dimension, got strides {tuple(x.stride())}")


@triton.jit
def row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) in float32 for the rows ``rows`` [BLOCK_M] of x [M, K]."""
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=row_mask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return tl.rsqrt(sumsq / K + eps)


@triton.jit
def normed_tile(x_ptr, stride_xm, norm_w_ptr, rstd, rows, row_mask, cols, K, HAS_NORM: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile x[rows, cols], RMS-normed as HuggingFace does when HAS_NORM:
    w * (x * rstd rounded to x's dtype), the product in x's dtype. Masked entries are 0."""
    col_mask = cols < K
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                other=0.0)
    if HAS_NORM:
        w = tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = (w[None, :] * (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)).to(x.dtype)
    return x

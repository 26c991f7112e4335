"""What the kernels share: the one block-size rule, dtype names, and two ``@triton.jit`` helpers for the
small-M matmuls (the RMSNorm statistics of a row block and a normed, dtype-rounded activation tile).

Decode is memory-bound: M (rows = B * T new tokens) is 1..B(γ+1), so every kernel streams its weight once and keeps
the activations, which are tiny, in registers. ``tl.dot`` needs every dimension >= 16 on tensor cores, so row blocks
are padded to 16 and masked.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl


def _interpreter_compat() -> None:
    """Two gaps of triton 3.6's CPU interpreter, closed for the interpreter only (the compiled path is untouched).

    1. It turns a scalar into an int with ``int(array_of_shape_1)``, which numpy >= 2.4 refuses
       (triton-lang/triton#9171, fixed upstream by #9172 after 3.6): loops with run-time bounds fail. Upstream's
       fix, squeezing first, is applied where numpy needs it.
    2. It stores bfloat16 as uint16 and ``tl.dot`` multiplies those integers. Here bf16 operands are widened to
       fp32 first, which is exact and is what the tensor cores compute (bf16 products, fp32 accumulation). The
       kernels do every other bf16 operation in fp32 explicitly, as the compiled code does anyway.

    And two costs, not semantics, so that a whole decode runs in the interpreter within a test's time:
    3. Every call of a ``@triton.jit`` helper re-patches triton.language (~2 ms), although the running kernel
       has already patched it; nested calls now reuse the kernel's patch.
    4. Integer overflow sanitizing (a debug check the compiled kernels do not make) is off, as on the GPU.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_kangaroo_compat", False):
        return
    interpreter._kangaroo_compat = True
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        patch_tensor = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = patch_lang_tensor

    patch_lang = interpreter._patch_lang
    active: list = []
    patched: set = set()  # the language modules (triton.language, triton.language.core) the running kernel patched

    def lang_modules(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class KernelScope:
        """The patch scope of the running kernel: device functions it calls find their language modules patched."""

        def __init__(self, scope, modules: set):
            self.scope = scope
            active.append(self)
            patched.update(modules)

        def restore(self):
            active.remove(self)
            patched.clear()
            self.scope.restore()

    def patch_once(fn):
        modules = lang_modules(fn)
        if not active:
            return KernelScope(patch_lang(fn), modules)
        if not modules <= patched:  # a device function seeing another language module (e.g. tl.zeros' core)
            patch_lang(fn)
            patched.update(modules)
        return active[-1]

    interpreter._patch_lang = patch_once
    interpreter.interpreter_builder.options = dataclasses.replace(interpreter.interpreter_builder.options,
                                                                  sanitize_overflow=False)

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data.reshape(handle.data.shape), tl.float32)

    builder.create_dot = lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args)


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()

#: triton's name of each supported activation dtype (for compile signatures)
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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

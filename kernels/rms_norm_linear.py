"""Small-M linear layer with an optional RMSNorm prologue and bias / SiLU·mul / residual epilogues.

    y = epilogue( norm(x) @ W.T )                        x [M, K], W [N, K] (nn.Linear layout)
    norm(x)   = g * (x / sqrt(mean(x^2) + eps))          (HAS_NORM; statistics in fp32, product in x's dtype)
    epilogue  = + bias                                   (HAS_BIAS)
              | silu(x W_gate.T) * (x W_up.T)            (GATE_UP: W is [2N, K], gate rows first, as packed)
              then + residual                            (HAS_RESIDUAL)

One kernel serves the decoder's four matmuls: norm+q/k/v (+bias) when RoPE is not fused, o_proj+residual,
norm+gate/up+SiLU·mul, down+residual. The normed activations never leave the chip; the weight is read once.
The output may alias the residual: each program reads only the residual columns it writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_rows, dot_precision, matmul_blocks, normed_tile, row_rstd


@triton.jit
def _rms_norm_linear_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr, norm_w_ptr, bias_ptr, res_ptr,
    # sizes
    M, N, K, eps,
    # strides (last dimensions are unit-stride)
    stride_xm, stride_wn, stride_om, stride_rm,
    # HAS_*/GATE_UP: compile-time, so a plain linear carries no dead loads or branches
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NORM:
        rstd = row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = normed_tile(x_ptr, stride_xm, norm_w_ptr, rstd, rows, row_mask, ks, K, HAS_NORM)
        w_mask = col_mask[:, None] & (ks[None, :] < K)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GATE_UP:
            w_up = tl.load(w_ptr + (cols + N)[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ty = out_ptr.dtype.element_ty
    y = acc.to(out_ty)
    if GATE_UP:  # as the reference: gate and up rounded to the dtype, silu(gate) rounded, then the product
        gate = y.to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
        y = (silu * acc_up.to(out_ty).to(tl.float32)).to(out_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        y = (res.to(tl.float32) + y.to(tl.float32)).to(out_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y, mask=mask)


def rms_norm_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, norm_weight: torch.Tensor | None = None,
                    eps: float = 1e-6, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    gate_up: bool = False) -> torch.Tensor:
    """out[M, N] = epilogue(norm(x) @ weight.T) for x [M, K] (see the module docstring); returns ``out``.

    weight is [N, K], or [2N, K] with ``gate_up``; out and residual are [M, N]. All in one dtype.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if gate_up else weight.shape[0]
    check_rows("x", x, k)
    check_rows("weight", weight, k)
    if gate_up and weight.shape[0] % 2:
        raise ValueError(f"gate_up weight needs an even number of rows, got {weight.shape[0]}")
    if tuple(out.shape) != (m, n) or out.stride(-1) != 1:
        raise ValueError(f"out must be a unit-stride [{m}, {n}] tensor, got shape {tuple(out.shape)}")
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.stride(-1) != 1):
        raise ValueError(f"residual must be a unit-stride [{m}, {n}] tensor, got shape {tuple(residual.shape)}")
    for name, t in (("norm_weight", norm_weight), ("bias", bias)):
        if t is not None and (t.ndim != 1 or t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous vector, got shape {tuple(t.shape)}")
    blocks = matmul_blocks(m, n, k)
    grid = (triton.cdiv(n, blocks.block_n), triton.cdiv(m, blocks.block_m))
    _rms_norm_linear_kernel[grid](
        x, weight, out, norm_weight if norm_weight is not None else x, bias if bias is not None else x,
        residual if residual is not None else out,
        m, n, k, eps,
        x.stride(0), weight.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        GATE_UP=gate_up, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=blocks.num_warps)
    return out


def rms_norm_linear_reference(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                              eps: float = 1e-6, bias: torch.Tensor | None = None,
                              residual: torch.Tensor | None = None, gate_up: bool = False) -> torch.Tensor:
    """The same maths through the reference backend's ops."""
    from kangaroo_fast.backend.torch_ref import TorchBackend as ops

    h = ops.rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    if gate_up:
        gate, up = ops.linear(h, weight).chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    else:
        y = ops.linear(h, weight, bias)
    return residual + y if residual is not None else y

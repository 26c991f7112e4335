"""Fused q/k/v projection: RMSNorm prologue, bias, RoPE and the KV-cache write in the epilogue.

For the rows m = b * T + t of x [B * T, K] (sequence b, its t-th new token at position p = start[b] + t):

    qkv = norm(x) @ W.T + bias                          W [(Hq + 2 Hkv) D, K], heads side by side (q, then k, v)
    q_h = rope(qkv[h]) -> q_out[b, t, h]                rope(y) = y * cos[p] + rotate_half(y) * sin[p]
    k_h = rope(qkv[Hq + h]) -> k_cache[b, h, p]         rotate_half(y) = (-y[D/2:], y[:D/2])
    v_h = qkv[Hq + Hkv + h] -> v_cache[b, h, p]

One program owns a block of rows and one head (several for small heads) and accumulates each head's two halves side
by side, so the rotation pairs columns d and d + D/2 inside registers: q/k/v never round-trip through memory
before RoPE. Positions come
from the device tensor ``start`` [B] (graph-safe). A position at or beyond the cache length is not written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_rows, dot_precision, matmul_blocks, normed_tile, row_rstd


@triton.jit
def _qkv_rope_cache_kernel(
    # pointers
    x_ptr, w_ptr, norm_w_ptr, bias_ptr, cos_ptr, sin_ptr, start_ptr, q_ptr, k_ptr, v_ptr,
    # sizes
    M, T, K, eps, max_len, num_heads, num_kv_heads,
    # strides (last dimensions are unit-stride)
    stride_xm, stride_wn, stride_cos,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    # HALF = D / 2: the rotation pairs column d with d + HALF; each program owns HEADS consecutive heads, laid
    # side by side as BLOCK_C >= HEADS * HALF columns (column c: head c // HALF, pair c % HALF)
    HALF: tl.constexpr, HEADS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    c = tl.arange(0, BLOCK_C)
    head = pid_h * HEADS + c // HALF
    pair = c % HALF
    c_mask = (c < HEADS * HALF) & (head < num_heads + 2 * num_kv_heads)
    cols1 = head * 2 * HALF + pair
    cols2 = cols1 + HALF
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NORM:
        rstd = row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BLOCK_M, BLOCK_K)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = normed_tile(x_ptr, stride_xm, norm_w_ptr, rstd, rows, row_mask, ks, K, HAS_NORM)
        w_mask = c_mask[:, None] & (ks[None, :] < K)
        w1 = tl.load(w_ptr + cols1[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        w2 = tl.load(w_ptr + cols2[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        acc1 = tl.dot(x, tl.trans(w1), acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(x, tl.trans(w2), acc2, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + cols1, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + cols2, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    dtype = q_ptr.dtype.element_ty
    y1 = acc1.to(dtype).to(tl.float32)  # the projection's output, as the reference holds it
    y2 = acc2.to(dtype).to(tl.float32)

    # RoPE on q and k heads: y * cos + rotate_half(y) * sin, each product and the sum rounded to the dtype as in
    # the reference; rotate_half(y) = (-y2, y1)
    seq = rows // T
    t = rows % T
    pos = tl.load(start_ptr + seq, mask=row_mask, other=0) + t
    mask = (row_mask & (pos < max_len))[:, None] & c_mask[None, :]
    offs = pos[:, None] * stride_cos + pair[None, :]
    cos1 = tl.load(cos_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    rot1 = ((y1 * cos1).to(dtype).to(tl.float32) - (y2 * sin1).to(dtype).to(tl.float32)).to(dtype)
    rot2 = ((y2 * cos2).to(dtype).to(tl.float32) + (y1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    is_q = head < num_heads
    is_v = head >= num_heads + num_kv_heads
    out1 = tl.where(is_v[None, :], y1.to(dtype), rot1)
    out2 = tl.where(is_v[None, :], y2.to(dtype), rot2)

    q_dst = q_ptr + seq[:, None] * stride_qb + t[:, None] * stride_qt + head[None, :] * stride_qh + pair[None, :]
    kv_head = tl.where(is_v, head - num_heads - num_kv_heads, head - num_heads)
    k_dst = k_ptr + seq[:, None] * stride_kb + kv_head[None, :] * stride_kh + pos[:, None] * stride_ks + pair[None, :]
    v_dst = v_ptr + seq[:, None] * stride_vb + kv_head[None, :] * stride_vh + pos[:, None] * stride_vs + pair[None, :]
    q_mask = mask & is_q[None, :]
    k_mask = mask & (~is_q & ~is_v)[None, :]
    v_mask = mask & is_v[None, :]
    tl.store(q_dst, out1, mask=q_mask)
    tl.store(q_dst + HALF, out2, mask=q_mask)
    tl.store(k_dst, out1, mask=k_mask)
    tl.store(k_dst + HALF, out2, mask=k_mask)
    tl.store(v_dst, out1, mask=v_mask)
    tl.store(v_dst + HALF, out2, mask=v_mask)


def heads_per_program(head_dim: int) -> int:
    """The rule: a program owns 32 column pairs (one head of 64, two of 32, ...); one head when D/2 >= 32. Real
    models (D = 64, 128) get one head per program, so the grid has as many programs as heads."""
    return max(1, 32 // (head_dim // 2))


def qkv_rope_cache(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                   eps: float, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor, q_out: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Project x [B, T, K], rotate, write k/v at positions start[b] + t of the caches; returns q_out.

    weight [(Hq + 2 Hkv) D, K]; bias [(Hq + 2 Hkv) D] or None; cos/sin [max_positions, D] tables in the activation
    dtype; start [B] integer device tensor; q_out [B, T, Hq, D]; caches [B, Hkv, S_max, D] (any strides with unit
    last stride).
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, K], got shape {tuple(x.shape)}")
    bsz, t, k = x.shape
    _, _, num_heads, d = q_out.shape
    num_kv_heads = k_cache.shape[1]
    if d % 2:
        raise ValueError(f"head_dim={d} must be even for RoPE")
    if tuple(q_out.shape[:2]) != (bsz, t):
        raise ValueError(f"q_out must be [{bsz}, {t}, Hq, D], got shape {tuple(q_out.shape)}")
    if weight.shape[0] != (num_heads + 2 * num_kv_heads) * d:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected (Hq + 2 Hkv) D = "
                         f"{(num_heads + 2 * num_kv_heads) * d}")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != bsz or k_cache.shape[3] != d:
        raise ValueError(f"caches must both be [{bsz}, Hkv, S, {d}], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if cos.shape != sin.shape or cos.shape[1] != d:
        raise ValueError(f"cos/sin must be [positions, {d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if start.shape != (bsz,) or start.dtype.is_floating_point or start.device != x.device:
        raise ValueError(f"start must be an integer [{bsz}] tensor on {x.device}, got {start.dtype} "
                         f"{tuple(start.shape)} on {start.device}")
    x2 = x.reshape(bsz * t, k)
    check_rows("x", x2, k)
    check_rows("weight", weight, k)
    for name, tensor in (("q_out", q_out), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last stride, got strides {tuple(tensor.stride())}")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must share their strides")
    m = bsz * t
    half = d // 2
    heads = heads_per_program(d)
    blocks = matmul_blocks(m, heads * half, k)
    grid = (triton.cdiv(num_heads + 2 * num_kv_heads, heads), triton.cdiv(m, blocks.block_m))
    _qkv_rope_cache_kernel[grid](
        x2, weight, norm_weight if norm_weight is not None else x2, bias if bias is not None else x2,
        cos, sin, start, q_out, k_cache, v_cache,
        m, t, k, eps, k_cache.shape[2], num_heads, num_kv_heads,
        x2.stride(0), weight.stride(0), cos.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, HEADS=heads, HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=blocks.block_m, BLOCK_C=max(16, triton.next_power_of_2(heads * half)), BLOCK_K=blocks.block_k,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=blocks.num_warps)
    return q_out


def qkv_rope_cache_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                             start: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """The reference backend's norm, linear and rope_cache_write per sequence; returns q as [B, T, Hq, D]."""
    from kangaroo_fast.backend.torch_ref import TorchBackend as ops

    bsz, t, _ = x.shape
    num_kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    num_heads = weight.shape[0] // d - 2 * num_kv_heads
    h = ops.rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    qkv = ops.linear(h, weight, bias)
    qs = []
    for b in range(bsz):
        p = int(start[b])
        qs.append(ops.rope_cache_write(qkv[b:b + 1], cos[p:p + t], sin[p:p + t], k_cache[b:b + 1], v_cache[b:b + 1],
                                       p, num_heads, num_kv_heads))
    return torch.cat(qs).transpose(1, 2)

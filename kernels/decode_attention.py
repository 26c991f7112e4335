"""Attention of the T newest positions of each sequence over the static KV cache (tree-free verification mask).

Query t of sequence b sits at position p = start[b] + t and sees cache positions j with

    j <= p                      (causal: the drafts after it are invisible; no mask tensor, only start[b])
    j >  p - window             (sliding window, when WINDOW > 0)

    out[b, t, h] = softmax_j(q[b, t, h] . k[b, h // G, j] * D^-1/2) @ v[b, h // G, j]      (G = Hq / Hkv: GQA)

Flash-decoding: the key axis [0, S_max) is cut into SPLITS chunks, one program per (sequence, KV head, row block,
chunk), each a streaming softmax over its chunk for all T * G query rows sharing that KV head (the cache is read
once per KV head, not once per query head). A second kernel merges the chunks with their log-sum-exps. The split
count depends on S_max only, so the grid is fixed before launch and the same for every step (graph-safe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import dot_precision


@dataclass(frozen=True)
class AttentionBlocks:
    block_r: int
    block_s: int
    block_d: int
    splits: int
    chunk: int
    num_warps: int


def attention_blocks(rows: int, max_len: int, head_dim: int) -> AttentionBlocks:
    """The rule: query rows (T * G) padded to >= 16 for tensor cores, <= 64 (prefill tiles them); 64 keys per
    step; one chunk per 512 cached positions, at most 16 (enough programs to cover the SMs at batch 1 from a 2k
    cache on; the merge reads SPLITS partial rows per query, so more would cost more than it hides)."""
    block_r = min(64, max(16, triton.next_power_of_2(rows)))
    block_s = 64 if max_len >= 64 else max(16, triton.next_power_of_2(max_len))
    splits = max(1, min(16, triton.cdiv(max_len, 512)))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), block_s) * block_s
    splits = triton.cdiv(max_len, chunk)
    return AttentionBlocks(block_r, block_s, max(16, triton.next_power_of_2(head_dim)), splits, chunk,
                           num_warps=4 if block_r <= 16 else 8)


@triton.jit
def _decode_attention_kernel(
    # pointers: q [B, T, Hq, D], caches [B, Hkv, S, D], start [B]; out [B, T, Hq, D] when SPLITS == 1,
    # else the partial outputs [B, T, Hq, SPLITS, D] and log-sum-exps [B, T, Hq, SPLITS] (fp32)
    q_ptr, k_ptr, v_ptr, start_ptr, out_ptr, part_ptr, lse_ptr,
    # sizes
    T, num_kv_heads, max_len, chunk, scale, window,
    # strides
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_ot, stride_oh,
    # GROUP = Hq / Hkv; HEAD_DIM and the splits are compile-time so the partial layout is fixed
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # row r = t * GROUP + g
    t = r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_mask = t < T
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    start = tl.load(start_ptr + b)
    q_pos = start + t
    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    # keys this program may need: its chunk, cut to what the block's newest query sees (and, with a window, to
    # what its oldest query still sees); never past the cache
    lo = split * chunk
    newest = start + tl.minimum(T - 1, ((pid_r + 1) * BLOCK_R - 1) // GROUP)
    hi = tl.minimum(tl.minimum(lo + chunk, newest + 1), max_len)
    if HAS_WINDOW:
        lo = tl.maximum(lo, start + pid_r * BLOCK_R // GROUP - window + 1)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < hi
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        visible = s_mask[None, :] & (s[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (s[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    else:
        row = (b * T + t) * (num_kv_heads * GROUP) + head  # index of (b, t, head) in [B, T, Hq]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + row * SPLITS + split, lse, mask=row_mask)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(part_ptr + (row * SPLITS + split)[:, None] * HEAD_DIM + d[None, :], out,
                 mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(
    # partial outputs [R, SPLITS, D] and log-sum-exps [R, SPLITS] (R = B * T * Hq rows); out [B, T, Hq, D]
    part_ptr, lse_ptr, out_ptr,
    T, num_heads,
    stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_i exp(lse_i - lse) * out_i with lse = log sum_i exp(lse_i): the chunks' softmaxes merged."""
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * SPLITS + i, mask=i < SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    part = tl.load(part_ptr + (row * SPLITS + i)[:, None] * HEAD_DIM + d[None, :],
                   mask=(i < SPLITS)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    b = row // (T * num_heads)
    t = (row // num_heads) % T
    head = row % num_heads
    tl.store(out_ptr + b * stride_ob + t * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_attention_workspace(q: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fp32 partial buffers the launcher needs for q [B, T, Hq, D] over a cache of ``max_len`` positions
    (None when one chunk covers the cache). Allocate once and pass them to every launch of that shape."""
    bsz, t, num_heads, d = q.shape
    blocks = attention_blocks(t, max_len, d)
    if blocks.splits == 1:
        return None
    rows = bsz * t * num_heads
    return (torch.empty(rows, blocks.splits, d, dtype=torch.float32, device=q.device),
            torch.empty(rows, blocks.splits, dtype=torch.float32, device=q.device))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                     out: torch.Tensor, sliding_window: int | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """out [B, T, Hq, D] = attention of q [B, T, Hq, D] (positions start[b] + t) over the caches
    [B, Hkv, S_max, D], causal from ``start`` [B] (integer device tensor); returns ``out``.

    ``workspace``: from ``decode_attention_workspace`` (allocated here when needed and not given).
    """
    bsz, t, num_heads, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != bsz or k_cache.shape[3] != d:
        raise ValueError(f"caches must both be [{bsz}, Hkv, S, {d}], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if start.shape != (bsz,) or start.dtype.is_floating_point or start.device != q.device:
        raise ValueError(f"start must be an integer [{bsz}] tensor on {q.device}, got {start.dtype} "
                         f"{tuple(start.shape)} on {start.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None)")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last stride, got strides {tuple(tensor.stride())}")
    group = num_heads // num_kv_heads
    blocks = attention_blocks(t * group, max_len, d)
    if blocks.splits > 1 and workspace is None:
        workspace = decode_attention_workspace(q, max_len)
    part, lse = workspace if blocks.splits > 1 else (out, out)
    grid = (bsz * num_kv_heads, triton.cdiv(t * group, blocks.block_r), blocks.splits)
    _decode_attention_kernel[grid](
        q, k_cache, v_cache, start, out, part, lse,
        t, num_kv_heads, max_len, blocks.chunk, d ** -0.5, sliding_window or 0,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, HEAD_DIM=d, SPLITS=blocks.splits, HAS_WINDOW=sliding_window is not None,
        BLOCK_R=blocks.block_r, BLOCK_S=blocks.block_s, BLOCK_D=blocks.block_d, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=blocks.num_warps)
    if blocks.splits > 1:
        _combine_kernel[(bsz * t * num_heads,)](
            part, lse, out, t, num_heads, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=d, SPLITS=blocks.splits, BLOCK_SPLITS=max(2, triton.next_power_of_2(blocks.splits)),
            BLOCK_D=blocks.block_d, num_warps=1)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                               sliding_window: int | None = None) -> torch.Tensor:
    """The reference backend's attention per sequence; q and the result are [B, T, Hq, D]."""
    from kangaroo_fast.backend.torch_ref import TorchBackend as ops

    bsz, t, num_heads, d = q.shape
    outs = [ops.attention(q[b:b + 1].transpose(1, 2), k_cache[b:b + 1], v_cache[b:b + 1], int(start[b]),
                          sliding_window) for b in range(bsz)]
    return torch.cat(outs).view(bsz, t, num_heads, d)

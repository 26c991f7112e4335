"""The streamed LM head both heads share: RMSNorm, logits over vocabulary tiles, and per-chunk statistics.

    logits[m, v] = norm(x)[m] . W[v]        rounded to the activation dtype (as the reference's F.linear output)
    per row m and vocabulary chunk c:  max_c = max_v logits,  sum_c = sum_v exp(logits - max_c),
                                       arg_c = the first v reaching max_c

A vocabulary-sized logits tensor is never written: each program streams its chunk of W [V, K] once, and the
heads' second kernels (``draft_head``, ``verify_head``) merge the chunks on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_rows, dot_precision, normed_tile, row_rstd


@dataclass(frozen=True)
class HeadBlocks:
    block_m: int
    block_v: int
    block_k: int
    splits: int
    tiles_per_split: int
    num_warps: int


def head_blocks(m: int, vocab: int, k: int) -> HeadBlocks:
    """The rule: all rows in one block (M <= 64: a draft step has B rows, verification B(γ+1)); 64 vocabulary
    rows x 128 hidden per step; at most 256 chunks, so the merge reads at most 256 partials per row while the
    grid still covers the SMs (SmolLM2's 49152-word vocabulary: 256 chunks of 3 tiles; Vicuna's 32000: 250 x 2)."""
    if m > 64:
        raise ValueError(f"the LM-head kernels take at most 64 rows per launch, got {m}")
    block_v = 64
    tiles = triton.cdiv(vocab, block_v)
    tiles_per_split = triton.cdiv(tiles, 256)
    return HeadBlocks(max(16, triton.next_power_of_2(m)), block_v, min(128, max(16, triton.next_power_of_2(k))),
                      triton.cdiv(tiles, tiles_per_split), tiles_per_split, num_warps=4)


@triton.jit
def _lm_head_partials_kernel(
    # pointers: x [M, K], final-norm weight [K], head W [V, K]; partials [M, SPLITS] (fp32, fp32, int32)
    x_ptr, norm_w_ptr, w_ptr, max_ptr, sum_ptr, arg_ptr,
    # sizes
    M, V, K, eps,
    # strides
    stride_xm, stride_wv,
    SPLITS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rstd = row_rstd(x_ptr, stride_xm, rows, row_mask, K, eps, BLOCK_M, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    dtype = x_ptr.dtype.element_ty
    for tile in range(TILES_PER_SPLIT):
        vocab = (split * TILES_PER_SPLIT + tile) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = vocab < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = normed_tile(x_ptr, stride_xm, norm_w_ptr, rstd, rows, row_mask, ks, K, True)
            w = tl.load(w_ptr + vocab[:, None] * stride_wv + ks[None, :], mask=v_mask[:, None] & (ks[None, :] < K),
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        logits = tl.where(v_mask[None, :], acc.to(dtype).to(tl.float32), float("-inf"))
        tile_best = tl.max(logits, axis=1)
        # first index reaching the tile's maximum (torch.argmax's tie rule)
        tile_arg = tl.min(tl.where(logits == tile_best[:, None], vocab[None, :], V), axis=1)
        new_best = tl.maximum(best, tile_best)
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # a tile entirely past V
        total = total * tl.exp(best - safe) + tl.sum(tl.exp(logits - safe[:, None]), axis=1)
        arg = tl.where(tile_best > best, tile_arg, arg)  # strictly greater: an earlier tile wins ties
        best = new_best
    out = rows * SPLITS + split
    tl.store(max_ptr + out, best, mask=row_mask)
    tl.store(sum_ptr + out, total, mask=row_mask)
    tl.store(arg_ptr + out, arg, mask=row_mask)


def lm_head_workspace(m: int, vocab: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sum, arg) partial buffers [M, SPLITS] for ``lm_head_partials``; allocate once per shape."""
    splits = head_blocks(m, vocab, k).splits
    return (torch.empty(m, splits, dtype=torch.float32, device=device),
            torch.empty(m, splits, dtype=torch.float32, device=device),
            torch.empty(m, splits, dtype=torch.int32, device=device))


def lm_head_partials(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                     workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> HeadBlocks:
    """Fill ``workspace`` with the per-chunk (max, sum of exp, argmax) of norm(x) [M, K] @ head_weight.T."""
    m, k = x.shape
    vocab = head_weight.shape[0]
    check_rows("x", x, k)
    check_rows("head_weight", head_weight, k)
    blocks = head_blocks(m, vocab, k)
    if any(t.shape != (m, blocks.splits) for t in workspace):
        raise ValueError(f"workspace must be three [{m}, {blocks.splits}] tensors (lm_head_workspace)")
    _lm_head_partials_kernel[(blocks.splits,)](
        x, norm_weight, head_weight, *workspace, m, vocab, k, eps, x.stride(0), head_weight.stride(0),
        SPLITS=blocks.splits, TILES_PER_SPLIT=blocks.tiles_per_split, BLOCK_M=blocks.block_m,
        BLOCK_V=blocks.block_v, BLOCK_K=blocks.block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=blocks.num_warps)
    return blocks

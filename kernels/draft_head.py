"""Draft head with the confidence check on the device.

For the adapter's outputs x [B, K]:

    logits = norm(x) @ W.T                  W [V_draft, K]: the LM head's rows of the draft vocabulary
    index  = argmax_v logits                (first maximum)
    prob   = softmax(logits)[index] = 1 / sum_v exp(logits_v - max)
    token  = vocab_map[index]               (index itself without a draft-vocabulary table)
    keep   = prob >= threshold              ("keep drafting?", decided without a host sync)

The logits stream over vocabulary tiles with an online max / sum-of-exp / argmax (``_lm_head``), then one small
program per row merges the chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lm_head import lm_head_partials, lm_head_workspace


@triton.jit
def _draft_head_kernel(
    # pointers: partials [B, SPLITS]; vocab map [V_draft] (int64); outputs token [B] int64, prob [B] fp32, keep [B]
    max_ptr, sum_ptr, arg_ptr, map_ptr, token_ptr, prob_ptr, keep_ptr,
    threshold,
    SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HAS_MAP: tl.constexpr,
):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_SPLITS)
    mask = i < SPLITS
    part_max = tl.load(max_ptr + row * SPLITS + i, mask=mask, other=float("-inf"))
    part_sum = tl.load(sum_ptr + row * SPLITS + i, mask=mask, other=0.0)
    part_arg = tl.load(arg_ptr + row * SPLITS + i, mask=mask, other=0)
    best = tl.max(part_max, axis=0)
    total = tl.sum(part_sum * tl.exp(part_max - best), axis=0)
    index = tl.min(tl.where(part_max == best, part_arg, 2147483647), axis=0)  # chunks in vocabulary order
    prob = 1.0 / total
    token = index.to(tl.int64)
    if HAS_MAP:
        token = tl.load(map_ptr + index).to(tl.int64)
    tl.store(token_ptr + row, token)
    tl.store(prob_ptr + row, prob)
    tl.store(keep_ptr + row, prob >= threshold)


def draft_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
               vocab_map: torch.Tensor | None, threshold: float, token: torch.Tensor, prob: torch.Tensor,
               keep: torch.Tensor, workspace=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill token [B] int64, prob [B] fp32 and keep [B] bool for x [B, K]; returns them.

    vocab_map: [V_draft] int64 token ids of the head's rows, or None. workspace: from ``lm_head_workspace``.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [B, K], got shape {tuple(x.shape)}")
    bsz, k = x.shape
    vocab = head_weight.shape[0]
    for name, t, dtype in (("token", token, torch.int64), ("prob", prob, torch.float32), ("keep", keep, torch.bool)):
        if t.shape != (bsz,) or t.dtype != dtype:
            raise ValueError(f"{name} must be a [{bsz}] {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    if vocab_map is not None and (vocab_map.shape != (vocab,) or vocab_map.dtype != torch.int64):
        raise ValueError(f"vocab_map must be a [{vocab}] int64 tensor, got {vocab_map.dtype} {tuple(vocab_map.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in [0, 1]")
    if workspace is None:
        workspace = lm_head_workspace(bsz, vocab, k, x.device)
    blocks = lm_head_partials(x, norm_weight, eps, head_weight, workspace)
    _draft_head_kernel[(bsz,)](
        *workspace, vocab_map if vocab_map is not None else token, token, prob, keep, threshold,
        SPLITS=blocks.splits, BLOCK_SPLITS=max(2, triton.next_power_of_2(blocks.splits)),
        HAS_MAP=vocab_map is not None, num_warps=1)
    return token, prob, keep


def draft_head_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                         vocab_map: torch.Tensor | None, threshold: float):
    """(token, prob, keep) from the reference backend's draft head."""
    from kangaroo_fast.backend.torch_ref import TorchBackend as ops

    index, prob = ops.draft_head(x, norm_weight, eps, head_weight)
    token = index if vocab_map is None else vocab_map[index]
    return token, prob, prob >= threshold

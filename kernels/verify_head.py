"""Verification head: the full model's greedy tokens, the accepted length and the bonus token, on the device.

For the deep states x [B, T, K] of [last, d1 .. d_{T-1}] of each sequence and its drafts [B, T - 1]:

    targets[b, t] = argmax_v (norm(x[b, t]) @ W.T)[v]           (first maximum; W [V, K] is the LM head)
    accepted[b]   = the longest prefix with drafts[b, i] == targets[b, i]      (0 .. T - 1)
    bonus[b]      = targets[b, accepted[b]]

The logits stream over vocabulary tiles (``_lm_head``); one small program per sequence merges the chunks and
compares with the drafts, so the host reads two integers per sequence at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lm_head import lm_head_partials, lm_head_workspace


@triton.jit
def _verify_head_kernel(
    # pointers: partials [B * T, SPLITS]; drafts [B, T - 1] int64; outputs targets [B, T], accepted [B], bonus [B]
    max_ptr, arg_ptr, drafts_ptr, targets_ptr, accepted_ptr, bonus_ptr,
    T, stride_db, stride_tb,
    SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DRAFTS: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_mask = t < T
    i = tl.arange(0, BLOCK_SPLITS)
    mask = t_mask[:, None] & (i < SPLITS)[None, :]
    offs = (b * T + t)[:, None] * SPLITS + i[None, :]
    part_max = tl.load(max_ptr + offs, mask=mask, other=float("-inf"))
    part_arg = tl.load(arg_ptr + offs, mask=mask, other=0)
    best = tl.max(part_max, axis=1)
    targets = tl.min(tl.where(part_max == best[:, None], part_arg, 2147483647), axis=1).to(tl.int64)
    tl.store(targets_ptr + b * stride_tb + t, targets, mask=t_mask)
    if HAS_DRAFTS:
        drafts = tl.load(drafts_ptr + b * stride_db + t, mask=t < T - 1, other=-1)
        mismatch = (t < T - 1) & (drafts != targets)
        accepted = tl.min(tl.where(mismatch, t, T - 1), axis=0)
        bonus = tl.sum(tl.where(t == accepted, targets, 0), axis=0)
        tl.store(accepted_ptr + b, accepted.to(tl.int64))
        tl.store(bonus_ptr + b, bonus)


def verify_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                targets: torch.Tensor, drafts: torch.Tensor | None = None, accepted: torch.Tensor | None = None,
                bonus: torch.Tensor | None = None, workspace=None) -> torch.Tensor:
    """Fill targets [B, T] int64 for x [B, T, K]; with drafts [B, T - 1] int64 also accepted [B] and bonus [B]
    (int64). Returns ``targets``. workspace: from ``lm_head_workspace(B * T, V, K)``."""
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, K], got shape {tuple(x.shape)}")
    bsz, t, k = x.shape
    if targets.shape != (bsz, t) or targets.dtype != torch.int64 or targets.stride(-1) != 1:
        raise ValueError(f"targets must be a [{bsz}, {t}] int64 tensor, got {targets.dtype} {tuple(targets.shape)}")
    if drafts is not None:
        if drafts.shape != (bsz, t - 1) or drafts.dtype != torch.int64 or (t > 1 and drafts.stride(-1) != 1):
            raise ValueError(f"drafts must be a [{bsz}, {t - 1}] int64 tensor, got {drafts.dtype} "
                             f"{tuple(drafts.shape)}")
        for name, out in (("accepted", accepted), ("bonus", bonus)):
            if out is None or out.shape != (bsz,) or out.dtype != torch.int64:
                raise ValueError(f"{name} must be a [{bsz}] int64 tensor when drafts are given")
    rows = x.reshape(bsz * t, k)
    if workspace is None:
        workspace = lm_head_workspace(bsz * t, head_weight.shape[0], k, x.device)
    blocks = lm_head_partials(rows, norm_weight, eps, head_weight, workspace)
    has_drafts = drafts is not None
    _verify_head_kernel[(bsz,)](
        workspace[0], workspace[2], drafts if has_drafts else targets, targets,
        accepted if has_drafts else targets, bonus if has_drafts else targets,
        t, drafts.stride(0) if has_drafts else 0, targets.stride(0),
        SPLITS=blocks.splits, BLOCK_SPLITS=max(2, triton.next_power_of_2(blocks.splits)),
        BLOCK_T=max(2, triton.next_power_of_2(t)), HAS_DRAFTS=has_drafts, num_warps=1)
    return targets


def verify_head_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                          drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, accepted, bonus) from the reference backend's verify head and accept."""
    from kangaroo_fast.backend.torch_ref import TorchBackend as ops

    targets = ops.verify_head(x, norm_weight, eps, head_weight)
    accepted = ops.accept(drafts, targets)
    return targets, accepted, targets.gather(1, accepted[:, None])[:, 0]

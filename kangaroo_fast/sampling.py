"""Greedy choice, HuggingFace-style logit processing, and lossless speculative sampling.

Logit processing follows ``transformers``' warpers in their order and meaning (with ``min_tokens_to_keep=1``):

    temperature  logits / T                                       (TemperatureLogitsWarper; T = 1 leaves them)
    top_k        keep logits >= the k-th largest (ties kept)       (TopKLogitsWarper; k = 0 disables it)
    top_p        sort ascending, drop the tokens whose cumulative  (TopPLogitsWarper; p = 1 disables it)
                 probability is <= 1 - p, always keep the best one

``temperature == 0`` means greedy decoding (HF's ``do_sample=False``); top_k and top_p then play no part. The
three values live in ``DecodeSettings``, which validates them.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over a draft of k tokens d_1..d_k, each drawn from
its processed draft distribution q_i, with the processed target distributions p_1..p_{k+1} from verification:

    for i = 1..k:  accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
                   on the first rejection emit a token from the residual  max(0, p_i - q_i) / sum(max(0, p_i - q_i))
                   and stop;
    all accepted:  emit a bonus token from p_{k+1}.

Every emitted token is then distributed exactly as the target model's processed distribution given the tokens
before it, whatever q is and however k was chosen from the draft alone (the confidence early stop).
"""
from __future__ import annotations

import torch

from .config import DecodeSettings


def process_logits(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """Apply temperature, top-k and top-p to float logits [..., V] as HF does; removed entries become -inf."""
    scores = logits.float()
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    vocab = scores.shape[-1]
    if 0 < settings.top_k < vocab:
        kth = torch.topk(scores, settings.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= 1.0 - settings.top_p
        sorted_remove[..., -1:] = False
        scores = scores.masked_fill(sorted_remove.scatter(-1, order, sorted_remove), float("-inf"))
    return scores


def target_probs(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """The processed distribution softmax(process_logits(logits)) [..., V] in float32."""
    return process_logits(logits, settings).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] -> [B] int64."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def speculative_accept(drafts: torch.Tensor, num_drafts: torch.Tensor, draft_probs: torch.Tensor,
                       target_probs: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/resample rule for a batch of sequences, without a host sync.

    drafts [B, K] int64: row b holds its num_drafts[b] drafts first (entries past them are ignored);
    draft_probs [B, K, V]: q_1..q_K over the full vocabulary (zero outside a pruned draft vocabulary);
    target_probs [B, K + 1, V]: p_1..p_{K+1}. Returns (accepted a [B], the token emitted after d_1..d_a [B]).
    Draws K uniforms and one categorical sample per sequence.
    """
    bsz, k = drafts.shape
    if k == 0:
        return num_drafts.clone(), sample(target_probs[:, 0], generator)
    rows = torch.arange(bsz, device=drafts.device)
    p_drafted = target_probs[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_drafted = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(bsz, k, generator=generator, device=drafts.device, dtype=p_drafted.dtype)
    # reject where u >= p / q (q > 0: each draft was drawn from its q); only the real drafts count
    rejected = (u * q_drafted >= p_drafted) & (torch.arange(k, device=drafts.device) < num_drafts[:, None])
    any_rejected = rejected.any(dim=1)
    accepted = torch.where(any_rejected, rejected.to(torch.int64).argmax(dim=1), num_drafts)
    p_next = target_probs[rows, accepted]
    q_next = draft_probs[rows, accepted.clamp(max=k - 1)] * any_rejected[:, None]  # no q after all-accepted
    residual = (p_next - q_next).clamp_min(0.0)
    # p == q up to rounding leaves no residual; p itself is then the exact answer
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return accepted, sample(residual / residual.sum(-1, keepdim=True), generator)


def draft_distributions(drafts: list[list[int]], q: list[list], width: int, p: torch.Tensor) -> torch.Tensor:
    """Per row and draft, q over the vocabulary as [B, width, V] (V and dtype from the targets' p): the drafter's
    distribution ``q[b][j]``, or a point mass on a deterministic draft (``q[b][j]`` None); zero past a row's drafts."""
    dists = p.new_zeros(len(drafts), width, p.shape[-1])
    for b, (tokens, rows) in enumerate(zip(drafts, q)):
        for j, (token, row) in enumerate(zip(tokens, rows)):
            if row is None:
                dists[b, j, token] = 1.0
            else:
                dists[b, j] = row
    return dists

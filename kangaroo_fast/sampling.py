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


def speculative_accept(drafts: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """The accept/resample rule for one sequence.

    drafts: k token ids; draft_probs [k, V]: q_1..q_k over the full vocabulary (zero outside a pruned draft
    vocabulary); target_probs [k + 1, V]: p_1..p_{k+1}. Returns (accepted a, the token emitted after d_1..d_a).
    Uses k uniform draws at most, then one categorical draw.
    """
    k = len(drafts)
    for i, token in enumerate(drafts):
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u * q < p:  # u < p / q; q > 0 because token was drawn from q
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is undefined, p is exact
            residual = target_probs[i]
        return i, int(sample((residual / residual.sum())[None], generator)[0])
    return k, int(sample(target_probs[k:k + 1], generator)[0])

"""PyTorch reference ops: the CPU path and the oracle for the Triton kernels.

Shapes: ``B`` batch, ``T`` new positions, ``H`` hidden size, ``S`` cached positions, ``D`` head dim.
Every op follows HuggingFace's Llama maths step for step (float32 RMSNorm, RoPE on the (q, k) pair, scaled
dot-product attention with grouped K/V), so that greedy decoding matches ``model.generate`` token for token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchBackend:
    name = "torch"

    # ---- elementwise and projections -------------------------------------------------------------------------
    @staticmethod
    def embed(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, H] rows of the embedding table."""
        return F.embedding(token_ids, table)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """y = w * (x / sqrt(mean(x^2) + eps)), the statistics in float32, the product in x's dtype (as HF)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias); weight is [N, K] as in nn.Linear."""
        return F.linear(x, weight, bias)

    @staticmethod
    def mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) with gate and up stacked in one [2I, H] weight."""
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    # ---- attention ---------------------------------------------------------------------------------------------
    @staticmethod
    def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, start: int, num_heads: int, num_kv_heads: int) -> torch.Tensor:
        """Split a fused [B, T, (Hq + 2 Hkv) D] projection, rotate q and k, write k and v at positions
        start..start+T-1 of the [B, Hkv, S_max, D] caches, and return q as [B, Hq, T, D].

        ``cos``/``sin`` are [T, D] rows of the table for those positions, already in the activation dtype.
        """
        bsz, t, _ = qkv.shape
        d = cos.shape[-1]
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        q = q.view(bsz, t, num_heads, d).transpose(1, 2)
        k = k.view(bsz, t, num_kv_heads, d).transpose(1, 2)
        v = v.view(bsz, t, num_kv_heads, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache[:, :, start:start + t] = k
        v_cache[:, :, start:start + t] = v
        return q

    @staticmethod
    def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                  sliding_window: int | None = None) -> torch.Tensor:
        """Causal attention of T queries at positions start..start+T-1 over cache positions 0..start+T-1.

        q: [B, Hq, T, D]; caches [B, Hkv, S_max, D]; returns [B, T, Hq * D]. The causal offset comes from
        ``start``: query i sees keys j <= start + i (and j > start + i - window with a sliding window).
        """
        bsz, hq, t, d = q.shape
        end = start + t
        k = k_cache[:, :, :end]
        v = v_cache[:, :, :end]
        mask = None
        causal = False
        if sliding_window is not None and end > sliding_window:
            q_pos = torch.arange(start, end, device=q.device)[:, None]
            k_pos = torch.arange(end, device=q.device)[None, :]
            mask = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
        elif t > 1 and start == 0:
            causal = True
        elif t > 1:
            q_pos = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= q_pos
        groups = hq // k.shape[1]
        gqa = {}
        if groups > 1 and mask is None:
            gqa = {"enable_gqa": True}  # as HF: grouped K/V read in place when no mask is given
        elif groups > 1:
            k = _repeat_kv(k, groups)
            v = _repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=d ** -0.5,
                                             **gqa)
        return out.transpose(1, 2).reshape(bsz, t, hq * d)

    # ---- fused ops: compositions of the ops above here, one kernel each in the Triton backend --------------------
    @staticmethod
    def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear(rms_norm(x)) for x [..., K] -> [..., N]."""
        return TorchBackend.linear(TorchBackend.rms_norm(x, norm_weight, eps), weight, bias)

    @staticmethod
    def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ weight.T (the attention output projection)."""
        return residual + TorchBackend.linear(x, weight)

    @staticmethod
    def norm_mlp_residual(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate_up: torch.Tensor,
                          w_down: torch.Tensor) -> torch.Tensor:
        """x + mlp(rms_norm(x)): the second half of a decoder layer."""
        return x + TorchBackend.mlp(TorchBackend.rms_norm(x, norm_weight, eps), w_gate_up, w_down)

    @staticmethod
    def qkv_rope_cache_write(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                             b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, start: int, num_heads: int, num_kv_heads: int) -> torch.Tensor:
        """rope_cache_write(norm_linear(x)) for x [B, T, H] at positions start..start+T-1; ``cos``/``sin`` are the
        whole [S, D] tables in the activation dtype. Returns q as [B, Hq, T, D]."""
        t = x.shape[1]
        qkv = TorchBackend.norm_linear(x, norm_weight, eps, w_qkv, b_qkv)
        return TorchBackend.rope_cache_write(qkv, cos[start:start + t], sin[start:start + t], k_cache, v_cache, start,
                                             num_heads, num_kv_heads)

    @staticmethod
    def draft_propose(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                      draft_vocab: torch.Tensor | None = None,
                      threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapter output [B, H] -> (draft token id [B] (through the draft vocabulary, if any), its probability [B],
        keep drafting [B] = probability >= threshold)."""
        index, prob = TorchBackend.draft_head(x, norm_weight, eps, head_weight)
        token = index if draft_vocab is None else draft_vocab[index]
        return token, prob, prob >= threshold

    @staticmethod
    def verify_accept(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                      drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deep states [B, k+1, H] and drafts [B, k] -> (targets [B, k+1], accepted length [B], bonus token [B])."""
        targets = TorchBackend.verify_head(x, norm_weight, eps, head_weight)
        accepted = TorchBackend.accept(drafts, targets)
        return targets, accepted, targets.gather(1, accepted[:, None])[:, 0]

    # ---- heads -------------------------------------------------------------------------------------------------
    @staticmethod
    def draft_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter output [B, H] -> (row index of the best draft-vocabulary entry [B], its probability [B]).

        ``head_weight`` is [V_draft, H]: the LM head's rows of the draft vocabulary (or all of it).
        """
        logits = F.linear(TorchBackend.rms_norm(x, norm_weight, eps), head_weight).float()
        prob, index = logits.softmax(-1).max(-1)
        return index, prob

    @staticmethod
    def verify_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    head_weight: torch.Tensor) -> torch.Tensor:
        """Deep hidden states [B, T, H] -> the full model's greedy tokens [B, T] (final norm, LM head, argmax)."""
        return F.linear(TorchBackend.rms_norm(x, norm_weight, eps), head_weight).argmax(-1)

    @staticmethod
    def accept(drafts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Length of the longest prefix where drafts [B, k] equal targets [B, k+1][:, :k], as [B] int64."""
        k = drafts.shape[1]
        match = (drafts == targets[:, :k]).to(torch.int64)
        return match.cumprod(dim=1).sum(dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D], each K/V head repeated for its query group."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)

"""PyTorch reference ops: the CPU path and the oracle for the Triton kernels.

Shapes: ``B`` batch, ``T`` new positions, ``H`` hidden size, ``S`` cached positions, ``D`` head dim.
Every op follows HuggingFace's Llama maths step for step (float32 RMSNorm, RoPE on the (q, k) pair, scaled
dot-product attention with grouped K/V), so that greedy decoding matches ``model.generate`` token for token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu


class TorchBackend:
    name = "torch"

    @staticmethod
    def cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
        """The dtype of the KV caches for a model in ``dtype`` on ``device``: float32 for bfloat16 on a CPU without
        bf16 products (``cpu.arithmetic_dtype``: attention over float32 keys costs a third of attention over bf16
        ones there), else ``dtype``. The attention's arithmetic is then float32 throughout, its output in the
        queries' dtype."""
        return cpu.arithmetic_dtype(dtype, device)

    @staticmethod
    def product_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
        """The dtype the engine holds the products' weights in for a model in ``dtype``: the reference keeps the
        model's own (a faster backend may widen them, ``InductorBackend``)."""
        return dtype

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

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias); weight is [N, K] as in nn.Linear. Every product of every op goes through here
        (a subclass may compute it differently, e.g. ``OneDNNBackend`` on prepacked weights)."""
        return F.linear(x, weight, bias)

    @classmethod
    def mlp(cls, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) with gate and up stacked in one [2I, H] weight."""
        gate, up = cls.linear(x, w_gate_up).chunk(2, dim=-1)
        return cls.linear(F.silu(gate) * up, w_down)

    # ---- attention ---------------------------------------------------------------------------------------------
    @classmethod
    def rope_cache_write(cls, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, start: int | torch.Tensor, num_heads: int,
                         num_kv_heads: int) -> torch.Tensor:
        """Split a fused [B, T, (Hq + 2 Hkv) D] projection, rotate q and k, write k and v at positions
        start..start+T-1 of the [B, Hkv, S_max, D] caches, and return q as [B, Hq, T, D].

        ``start`` is one int for the whole batch, with ``cos``/``sin`` the [T, D] rows of the table for those
        positions; or a [B] int64 tensor of per-sequence starts, with ``cos``/``sin`` as [B, T, D] (row b holds
        the table rows of positions start[b]..start[b]+T-1). With a tensor, positions at or beyond S_max are not
        written: they are padding of a sequence whose tail runs past the cache. cos/sin are in the activation dtype.
        """
        bsz, t, _ = qkv.shape
        d = cos.shape[-1]
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        q = q.view(bsz, t, num_heads, d).transpose(1, 2)
        k = k.view(bsz, t, num_kv_heads, d).transpose(1, 2)
        v = v.view(bsz, t, num_kv_heads, d).transpose(1, 2)
        if cos.ndim == 3:  # per-sequence rows: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cls._write_cache(k, v, k_cache, v_cache, start)
        return q

    @staticmethod
    def _write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     start: int | torch.Tensor) -> None:
        """k, v [B, Hkv, T, D] into the caches at positions start..start+T-1 (per sequence with a [B] tensor;
        positions at or beyond S_max are dropped)."""
        bsz, _, t, _ = k.shape
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        if isinstance(start, int):
            k_cache[:, :, start:start + t] = k
            v_cache[:, :, start:start + t] = v
            return
        positions = start[:, None] + torch.arange(t, device=start.device)  # [B, T]
        inside = positions < k_cache.shape[2]
        rows = torch.arange(bsz, device=start.device)[:, None].expand(bsz, t)[inside]
        k_cache[rows, :, positions[inside]] = k.transpose(1, 2)[inside]
        v_cache[rows, :, positions[inside]] = v.transpose(1, 2)[inside]

    @staticmethod
    def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int | torch.Tensor,
                  sliding_window: int | None = None, end: int | None = None) -> torch.Tensor:
        """Causal attention of T queries at positions start..start+T-1 over cache positions 0..start+T-1.

        q: [B, Hq, T, D]; caches [B, Hkv, S_max, D]; returns [B, T, Hq * D]. The causal offset comes from
        ``start``: query i sees keys j <= start + i (and j > start + i - window with a sliding window).
        ``start`` is an int for the whole batch or a [B] int64 tensor of per-sequence starts; then row b sees only
        its own keys j <= start[b] + i, so nothing beyond a sequence's own positions (padding) is attended to.
        Queries at or beyond S_max (padding, see ``rope_cache_write``) get unspecified finite outputs.
        ``end``, with a tensor ``start``: the host's bound on the keys read, the batch's largest start + T (capped
        at S_max); None: computed from ``start`` (one host sync). An int ``start`` implies it.
        """
        if not isinstance(start, int):
            return TorchBackend._attention_per_sequence(q, k_cache, v_cache, start, sliding_window, end)
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
        # grouped K/V read in place (no copy per query group); the same products as repeating them, bit for bit
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal, scale=d ** -0.5,
                                             enable_gqa=hq != k.shape[1])
        return out.to(q.dtype).transpose(1, 2).reshape(bsz, t, hq * d)

    @staticmethod
    def _attention_per_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                                sliding_window: int | None, end: int | None = None) -> torch.Tensor:
        """``attention`` with a [B] tensor of starts: one boolean mask [B, 1, T, end] carries every row's offset.

        The keys read stop at the batch's largest end: ``end`` as given, or found from ``start`` (one host sync:
        the reference's only one per call)."""
        bsz, hq, t, d = q.shape
        s_max = k_cache.shape[2]
        q_pos = start[:, None] + torch.arange(t, device=q.device)  # [B, T]
        end = min(int(q_pos.max()) + 1 if end is None else end, s_max)
        q_pos = q_pos.clamp(max=end - 1)[:, :, None]  # padding queries past the cache see a full row, not none
        k_pos = torch.arange(end, device=q.device)[None, None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask[:, None], scale=d ** -0.5,
                                             enable_gqa=hq != k.shape[1])
        return out.to(q.dtype).transpose(1, 2).reshape(bsz, t, hq * d)

    # ---- fused ops: compositions of the ops above here, one kernel each in the Triton backend --------------------
    @classmethod
    def norm_linear(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear(rms_norm(x)) for x [..., K] -> [..., N]."""
        return cls.linear(cls.rms_norm(x, norm_weight, eps), weight, bias)

    @classmethod
    def linear_residual(cls, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ weight.T (the attention output projection)."""
        return residual + cls.linear(x, weight)

    @classmethod
    def norm_mlp_residual(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate_up: torch.Tensor,
                          w_down: torch.Tensor) -> torch.Tensor:
        """x + mlp(rms_norm(x)): the second half of a decoder layer."""
        return x + cls.mlp(cls.rms_norm(x, norm_weight, eps), w_gate_up, w_down)

    @classmethod
    def qkv_rope_cache_write(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                             b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, start: int | torch.Tensor, num_heads: int,
                             num_kv_heads: int) -> torch.Tensor:
        """rope_cache_write(norm_linear(x)) for x [B, T, H] at positions start..start+T-1 (per sequence with a [B]
        tensor ``start``); ``cos``/``sin`` are the whole [S, D] tables in the activation dtype. Returns q as
        [B, Hq, T, D]."""
        t = x.shape[1]
        qkv = cls.norm_linear(x, norm_weight, eps, w_qkv, b_qkv)
        if isinstance(start, int):
            rows = slice(start, start + t)
        else:  # positions past the table (a short sequence's padding) read its last row; their writes are dropped
            rows = (start[:, None] + torch.arange(t, device=start.device)).clamp(max=cos.shape[0] - 1)
        return cls.rope_cache_write(qkv, cos[rows], sin[rows], k_cache, v_cache, start, num_heads, num_kv_heads)

    @classmethod
    def draft_propose(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                      draft_vocab: torch.Tensor | None = None,
                      threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapter output [B, H] -> (draft token id [B] (through the draft vocabulary, if any), its probability [B],
        keep drafting [B] = probability >= threshold)."""
        index, prob = cls.draft_head(x, norm_weight, eps, head_weight)
        token = index if draft_vocab is None else draft_vocab[index]
        return token, prob, prob >= threshold

    @classmethod
    def verify_accept(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                      drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deep states [B, k+1, H] and drafts [B, k] -> (targets [B, k+1], accepted length [B], bonus token [B])."""
        targets = cls.verify_head(x, norm_weight, eps, head_weight)
        accepted = cls.accept(drafts, targets)
        return targets, accepted, targets.gather(1, accepted[:, None])[:, 0]

    # ---- heads -------------------------------------------------------------------------------------------------
    @classmethod
    def draft_head(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter output [B, H] -> (row index of the best draft-vocabulary entry [B], its probability [B]).

        ``head_weight`` is [V_draft, H]: the LM head's rows of the draft vocabulary (or all of it).
        """
        return top1(cls.linear(cls.rms_norm(x, norm_weight, eps), head_weight).float())

    @classmethod
    def verify_head(cls, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    head_weight: torch.Tensor) -> torch.Tensor:
        """Deep hidden states [B, T, H] -> the full model's greedy tokens [B, T] (final norm, LM head, argmax)."""
        return cls.linear(cls.rms_norm(x, norm_weight, eps), head_weight).argmax(-1)

    @staticmethod
    def accept(drafts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Length of the longest prefix where drafts [B, k] equal targets [B, k+1][:, :k], as [B] int64."""
        k = drafts.shape[1]
        match = (drafts == targets[:, :k]).to(torch.int64)
        return match.cumprod(dim=1).sum(dim=1)


def top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [..., V] -> (index of the first maximum, its softmax probability 1 / sum(exp(logits - max))): two
    reductions, the draft's token and its confidence (the Triton draft head computes the same)."""
    best, index = logits.max(-1)
    return index, (logits - best.unsqueeze(-1)).exp().sum(-1).reciprocal()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


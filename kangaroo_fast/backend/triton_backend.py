"""The Triton backend: the engine's ops as the fused kernels of ``kangaroo_fast.kernels``.

Per decoder layer the engine makes four launches' worth of calls: ``qkv_rope_cache_write`` (norm + q/k/v + RoPE +
cache write), ``attention`` (+ its merge for long caches), ``linear_residual`` (o_proj + residual) and
``norm_mlp_residual`` (norm + gate/up + SiLU·mul, then down + residual). The heads compute their argmax and
confidence on the device. The embedding lookup, and ops the engine no longer calls (``rms_norm``, ``linear``,
``mlp``, ``rope_cache_write``), are inherited from the reference.

Runs on CUDA tensors; on CPU only under ``TRITON_INTERPRET=1`` (how the tests compare it with the reference).
Positions arrive as an int or a [B] integer device tensor.
"""
from __future__ import annotations

import os

import torch

from .torch_ref import TorchBackend

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self):
        if not triton_available():
            raise ImportError("the triton backend needs triton: pip install 'kangaroo_fast[triton]'")
        if not torch.cuda.is_available() and not _INTERPRETED:
            raise RuntimeError("the triton backend runs on a CUDA GPU (or in triton's interpreter with "
                               "TRITON_INTERPRET=1 set before import); use backend='torch' on CPU")
        from kangaroo_fast import kernels  # noqa: F401  (imported here so that `import kangaroo_fast` needs no triton)
        self._workspaces: dict = {}

    @staticmethod
    def cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
        """The model's own dtype: the kernels read and write the caches in the activations' dtype."""
        return dtype

    # ---- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _positions(start, batch: int, device) -> torch.Tensor:
        """``start`` as a [B] int64 device tensor (an int is broadcast to every sequence)."""
        if isinstance(start, torch.Tensor):
            return start.to(device=device, dtype=torch.int64).expand(batch) if start.ndim == 0 else start
        return torch.full((batch,), int(start), dtype=torch.int64, device=device)

    def _workspace(self, key: tuple, make):
        """Scratch buffers kept per shape: allocated on first use, reused by every later call of that shape."""
        if key not in self._workspaces:
            self._workspaces[key] = make()
        return self._workspaces[key]

    # ---- projections -------------------------------------------------------------------------------------------
    def norm_linear(self, x, norm_weight, eps, weight, bias=None):
        from kangaroo_fast.kernels.rms_norm_linear import rms_norm_linear

        rows = x.reshape(-1, x.shape[-1])
        out = x.new_empty(rows.shape[0], weight.shape[0])
        rms_norm_linear(rows, weight, out, norm_weight=norm_weight, eps=eps, bias=bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    def linear_residual(self, x, weight, residual):
        from kangaroo_fast.kernels.rms_norm_linear import rms_norm_linear

        rows = x.reshape(-1, x.shape[-1])
        out = residual.new_empty(rows.shape[0], weight.shape[0])
        rms_norm_linear(rows, weight, out, residual=residual.reshape(-1, weight.shape[0]))
        return out.view(residual.shape)

    def norm_mlp_residual(self, x, norm_weight, eps, w_gate_up, w_down):
        from kangaroo_fast.kernels.rms_norm_linear import rms_norm_linear

        rows = x.reshape(-1, x.shape[-1])
        hidden = x.new_empty(rows.shape[0], w_down.shape[1])
        rms_norm_linear(rows, w_gate_up, hidden, norm_weight=norm_weight, eps=eps, gate_up=True)
        out = torch.empty_like(rows)
        rms_norm_linear(hidden, w_down, out, residual=rows)
        return out.view(x.shape)

    # ---- attention ---------------------------------------------------------------------------------------------
    def qkv_rope_cache_write(self, x, norm_weight, eps, w_qkv, b_qkv, cos, sin, k_cache, v_cache, start, num_heads,
                             num_kv_heads):
        from kangaroo_fast.kernels.qkv_rope_cache import qkv_rope_cache

        bsz, t, _ = x.shape
        q = x.new_empty(bsz, t, num_heads, k_cache.shape[-1])
        qkv_rope_cache(x, w_qkv, b_qkv, norm_weight, eps, cos, sin, self._positions(start, bsz, x.device), q,
                       k_cache, v_cache)
        return q.transpose(1, 2)

    def attention(self, q, k_cache, v_cache, start, sliding_window=None, end=None):
        """As the reference's; ``end`` is not needed (the kernel reads each sequence's own keys)."""
        from kangaroo_fast.kernels.decode_attention import decode_attention, decode_attention_workspace

        q = q.transpose(1, 2)  # [B, T, Hq, D], a view
        bsz, t, num_heads, d = q.shape
        out = q.new_empty(bsz, t, num_heads, d)
        workspace = self._workspace(("attention", tuple(q.shape), k_cache.shape[2], q.device),
                                    lambda: decode_attention_workspace(q, k_cache.shape[2]))
        decode_attention(q, k_cache, v_cache, self._positions(start, bsz, q.device), out, sliding_window, workspace)
        return out.view(bsz, t, num_heads * d)

    # ---- heads -------------------------------------------------------------------------------------------------
    def _head_workspace(self, rows: int, head_weight: torch.Tensor):
        from kangaroo_fast.kernels._lm_head import lm_head_workspace

        vocab, k = head_weight.shape
        return self._workspace(("head", rows, vocab, k, head_weight.device),
                               lambda: lm_head_workspace(rows, vocab, k, head_weight.device))

    def draft_propose(self, x, norm_weight, eps, head_weight, draft_vocab=None, threshold=0.0):
        from kangaroo_fast.kernels.draft_head import draft_head

        bsz = x.shape[0]
        token = torch.empty(bsz, dtype=torch.int64, device=x.device)
        prob = torch.empty(bsz, dtype=torch.float32, device=x.device)
        keep = torch.empty(bsz, dtype=torch.bool, device=x.device)
        return draft_head(x, norm_weight, eps, head_weight, draft_vocab, threshold, token, prob, keep,
                          self._head_workspace(bsz, head_weight))

    def draft_head(self, x, norm_weight, eps, head_weight):
        """(row index of the best draft-vocabulary entry [B], its probability [B]), as the reference's."""
        token, prob, _ = self.draft_propose(x, norm_weight, eps, head_weight)
        return token, prob

    def verify_head(self, x, norm_weight, eps, head_weight):
        from kangaroo_fast.kernels.verify_head import verify_head

        bsz, t, _ = x.shape
        targets = torch.empty(bsz, t, dtype=torch.int64, device=x.device)
        return verify_head(x, norm_weight, eps, head_weight, targets,
                           workspace=self._head_workspace(bsz * t, head_weight))

    def verify_accept(self, x, norm_weight, eps, head_weight, drafts):
        from kangaroo_fast.kernels.verify_head import verify_head

        bsz, t, _ = x.shape
        targets = torch.empty(bsz, t, dtype=torch.int64, device=x.device)
        accepted = torch.empty(bsz, dtype=torch.int64, device=x.device)
        bonus = torch.empty(bsz, dtype=torch.int64, device=x.device)
        verify_head(x, norm_weight, eps, head_weight, targets, drafts, accepted, bonus,
                    workspace=self._head_workspace(bsz * t, head_weight))
        return targets, accepted, bonus

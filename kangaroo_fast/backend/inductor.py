"""The reference's ops in the form ``torch.compile`` turns into one fused C++ step on CPU (``graphs.py``, mode
"compile"): the same maths, with static shapes inside a decode step.

Two ops of the reference do not compile well, and change form here (the maths stays the reference's):
- writing a sequence's new keys/values: the reference's slice assignment into a view of the [layers, B, Hkv, S, D]
  buffer makes Inductor rewrite the whole buffer at every layer, and its per-sequence path indexes with a boolean
  mask (a data-dependent shape); here one ``index_copy_`` (one sequence) or ``index_put_`` (a batch) writes every
  row at its own positions, clamped into the cache (padding past a sequence's room lands in the last slot, which no
  real position of a decoding sequence uses: a sequence stops once its cache has one free slot left,
  ``engine.stop_reason``);
- attention with per-sequence starts reads keys up to ``end``, the bound the host passes in (no sync); one
  sequence attends as the reference does with an int start: over float32 caches the reference's own call (bit
  for bit), over bf16/float16 ones as grouped float32 products (``_grouped_float32_attention``: torch's CPU SDPA
  with grouped heads took 0.21 ms a call at 300 keys on an AVX512-BF16 EPYC, the grouped form 0.064 ms, by
  ``bench/step_breakdown.py``'s attention row; a vanilla step makes 30 such calls).
Products go to ``F.linear``: inside a compiled step Inductor's freezing packs the bf16 weights for oneDNN once
where this CPU and torch build can (``cpu.onednn_available``), as ``OneDNNBackend`` does by hand for the eager calls
outside the steps (prefill, sampling's heads). Where they cannot (an AVX2-only CPU has no bf16 oneDNN products), a
bf16 model's products of several rows (prefill, verification of several tokens, batches) run on FBGEMM's float16
copies of the weights (``fbgemm.fp16_linear``: exact, one registered op, so the steps stay unfrozen and in
Inductor's on-disk caches); its one-row products stay plain bf16 ``F.linear``. Where FBGEMM is missing too, those
products run in float32 on widened copies (``product_dtype``), frozen and packed for oneDNN.
"""
from __future__ import annotations

import functools
import os
import shutil

import torch
import torch.nn.functional as F

from .fbgemm import fp16_linear, fp16_products
from . import cpu
from .onednn import OneDNNBackend, packed_linear
from .torch_ref import TorchBackend


@functools.lru_cache(maxsize=None)
def cpp_compiler_available() -> bool:
    """A C++ compiler for Inductor's CPU code: $CXX, else g++, c++ or clang++ on the PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names)


class InductorBackend(OneDNNBackend):
    name = "inductor"
    # a bf16 model's products of several rows on FBGEMM's float16 weights (``fbgemm``): None decides by this machine
    # (``fbgemm.fp16_products``); a subclass may force it either way (the tests do)
    fp16: bool | None = None
    # a batch's attention over bf16/float16 caches as grouped float32 products with a per-row mask (as one sequence's
    # is); False: the reference's SDPA call (a subclass may turn it off: bench/batch_scaling.py's A/B)
    grouped_batches: bool = True

    def __init__(self):
        if not cpp_compiler_available():
            eager = "onednn" if cpu.onednn_available() else "torch"
            raise RuntimeError("the inductor backend compiles C++ and found no compiler (set CXX, or install g++); "
                               f"use backend={eager!r}")

    @classmethod
    def _fp16(cls, dtype: torch.dtype, device: torch.device) -> bool:
        """``dtype``'s products of several rows on ``device`` run on FBGEMM's float16 weights (``fp16_linear``)."""
        if dtype != torch.bfloat16 or device.type != "cpu":
            return False
        return fp16_products() if cls.fp16 is None else cls.fp16

    @classmethod
    def product_dtype(cls, dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
        """float32 for a bfloat16 model on a CPU without oneDNN's bf16 products (``cpu.arithmetic_dtype``) and
        without FBGEMM's float16 ones (``_fp16``): the engine then holds copies of its products' weights widened for
        the products of several rows (``weights.EngineWeights.for_rows``), which run in float32 on them packed for
        oneDNN (by Inductor's freezing in the compiled steps, by ``onednn.packed_linear`` outside them)."""
        if cls._fp16(dtype, torch.device(device)):
            return dtype
        return cpu.arithmetic_dtype(dtype, device)

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.dtype != x.dtype:  # widened weights (``product_dtype``): a float32 product, rounded to x's dtype
            if torch.compiler.is_compiling():
                return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
            return packed_linear(x, weight, bias)
        if cls._fp16(weight.dtype, weight.device) and x.numel() > x.shape[-1]:
            return fp16_linear(x, weight, bias)
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and x.is_contiguous():
            # one row, as a [1, K] view with the strides of a fresh tensor: Inductor's own view of a [1, 1, K]
            # buffer has stride 0 on its size-1 dimension, which aten's product copies away first (ten copies in a
            # draft step of the embedded model, 5-10 us each on a 2-core AVX2 CPU)
            row = x.as_strided((1, x.shape[-1]), (x.shape[-1], 1))
            return F.linear(row, weight, bias).view(*x.shape[:-1], weight.shape[0])
        if torch.compiler.is_compiling() or not cpu.onednn_available():
            return F.linear(x, weight, bias)
        return super().linear(x, weight, bias)

    @staticmethod
    def _write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     start: int | torch.Tensor) -> None:
        if isinstance(start, int):
            TorchBackend._write_cache(k, v, k_cache, v_cache, start)
            return
        bsz, hkv, t, d = k.shape
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        positions = (start[:, None] + torch.arange(t, device=start.device)).clamp(max=k_cache.shape[2] - 1)
        if bsz == 1:
            k_cache.index_copy_(2, positions[0], k)
            v_cache.index_copy_(2, positions[0], v)
            return
        rows = torch.arange(bsz, device=start.device)[:, None, None]
        heads = torch.arange(hkv, device=start.device)[None, :, None]
        k_cache.index_put_((rows, heads, positions[:, None, :]), k)
        v_cache.index_put_((rows, heads, positions[:, None, :]), v)

    @classmethod
    def attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int | torch.Tensor,
                  sliding_window: int | None = None, end: int | None = None) -> torch.Tensor:
        bsz, hq, t, d = q.shape
        half = k_cache.dtype in (torch.bfloat16, torch.float16)
        if isinstance(start, int) or end is None or (bsz > 1 and not (half and cls.grouped_batches)) or \
                (sliding_window is not None and end > sliding_window):
            return TorchBackend.attention(q, k_cache, v_cache, start, sliding_window, end)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        if bsz > 1:  # each row at its own offset, as the reference's mask; padding queries past the cache see all
            q_pos = (start[:, None] + torch.arange(t, device=q.device)).clamp(max=end - 1)
            mask = torch.arange(end, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, T, end]
            out = _grouped_float32_attention(q, k, v, mask, d ** -0.5)
            return out.to(q.dtype).transpose(1, 2).reshape(bsz, t, hq * d)
        # one sequence at a tensor position: the reference's int-start maths (end = start + T)
        mask = None
        if t > 1:
            q_pos = start + torch.arange(t, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]
        if half:
            out = _grouped_float32_attention(q, k, v, mask, d ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=d ** -0.5,
                                                 enable_gqa=hq != k.shape[1])
        return out.to(q.dtype).transpose(1, 2).reshape(bsz, t, hq * d)


def _grouped_float32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    """Attention of queries q [B, Hq, T, D] over half-precision keys and values [B, Hkv, S, D] as two float32
    products per KV head with a float32 softmax between them: each KV head's query group stacked into one [G * T, D]
    block (no copy of the keys per query head). ``mask``: None, [T, S] for every row, or [B, T, S] per row (True:
    attended). Returns [B, Hq, T, D] in float32."""
    bsz, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.float().reshape(bsz, hkv, group * t, d)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    if mask is not None:  # the same for every query head of a group
        mask = mask[:, None, None] if mask.dim() == 3 else mask
        scores = scores.view(bsz, hkv, group, t, -1).masked_fill(~mask, float("-inf")).flatten(2, 3)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.view(bsz, hq, t, d)

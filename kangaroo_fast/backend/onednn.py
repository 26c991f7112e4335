"""The CPU fast path: the reference ops with their bf16 products on oneDNN weights packed once.

``torch.nn.functional.linear`` in bfloat16 on CPU hands a plain [N, K] weight to oneDNN, which re-lays it out on
every call. Packing each weight once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
the op Inductor's CPU freezing pass uses) and running ``torch.ops.mkldnn._linear_pointwise`` on it cut a
SmolLM2-135M decode step's products 2-3x on this project's 2-core CPU (``bench/results/micro-cpu.md``).

Attention in bfloat16 with one start for the batch (decode steps and verification of one sequence) reads the
grouped K/V in place and accumulates in float32 with plain matrix products: on this CPU, scaled_dot_product_attention
for one query took about 0.55 µs per cached key (0.34 ms at 600 keys), the products about a quarter of that.

Everything else is the reference: float32 (and float16, and anything not on CPU) goes to ``F.linear`` unchanged,
so float32 decoding keeps its token-for-token equality with HF. In bfloat16 the products round in a different
order than ``F.linear``'s, so outputs may part from HF's at near-ties, as any other kernel would.

Memory: the packed copies are held beside the model's own weights (HF's modules keep using those), so the linear
weights take twice their size while an engine lives; ``backend="torch"`` avoids that.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from .torch_ref import TorchBackend


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """oneDNN's packed bf16 linear exists in this torch build (and runs here)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None, "none",
                                                 [None], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(out.float(), torch.full((1, 8), 16.0)))


class OneDNNBackend(TorchBackend):
    name = "onednn"

    # id(weight) -> (weak reference to it, its version counter when packed, packed weight); shared by every
    # instance (the reference's ops are classmethods): a weight is packed once however many engines use it, and its
    # packed copy goes when the weight does
    _packed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def __init__(self):
        if not onednn_available():
            raise RuntimeError("the onednn backend needs a torch build with oneDNN's packed linear "
                               "(torch.ops.mkldnn._linear_pointwise); use backend='torch'")

    @classmethod
    def _pack(cls, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight``, made on first use and again if the weight changed in place."""
        key = id(weight)
        entry = cls._packed.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        cls._packed[key] = (weakref.ref(weight, lambda _ref, key=key: cls._packed.pop(key, None)), weight._version,
                            packed)
        return packed

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu" or \
                x.numel() == 0:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, cls._pack(weight), bias, "none", [None], "")
        return out.view(*x.shape[:-1], weight.shape[0])

    @classmethod
    def attention(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int | torch.Tensor,
                  sliding_window: int | None = None) -> torch.Tensor:
        """The reference's attention (same arguments and result); bf16 on CPU with an int ``start`` as grouped
        float32 products: each query group against its K/V head without copies, masked only where T > 1 or a
        window cuts in."""
        if q.dtype != torch.bfloat16 or q.device.type != "cpu" or not isinstance(start, int):
            return TorchBackend.attention(q, k_cache, v_cache, start, sliding_window)
        bsz, hq, t, d = q.shape
        hkv, end = k_cache.shape[1], start + t
        groups = hq // hkv
        k, v = k_cache[:, :, :end].float(), v_cache[:, :, :end].float()
        scores = (q.reshape(bsz, hkv, groups * t, d).float() @ k.transpose(-1, -2)) * d ** -0.5
        if t > 1 or (sliding_window is not None and end > sliding_window):
            q_pos = torch.arange(start, end)[:, None]
            k_pos = torch.arange(end)[None, :]
            visible = k_pos <= q_pos
            if sliding_window is not None:
                visible &= k_pos > q_pos - sliding_window
            scores = scores.view(bsz, hkv, groups, t, end).masked_fill(~visible, float("-inf")).view(
                bsz, hkv, groups * t, end)
        out = (scores.softmax(-1) @ v).to(q.dtype).view(bsz, hq, t, d)
        return out.transpose(1, 2).reshape(bsz, t, hq * d)

"""The CPU fast path: the reference ops with their bf16 products on oneDNN weights packed once.

``torch.nn.functional.linear`` in bfloat16 on CPU hands a plain [N, K] weight to oneDNN, which re-lays it out on
every call. Packing each weight once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
the op Inductor's CPU freezing pass uses) and running ``torch.ops.mkldnn._linear_pointwise`` on it cut a
SmolLM2-135M decode step's products 2-3x on this project's 2-core CPU (``bench/results/micro-cpu.md``).

Everything else is the reference: float32 (and float16, and anything not on CPU) goes to ``F.linear`` unchanged,
so float32 decoding keeps its token-for-token equality with HF. In bfloat16 the products round in a different
order than ``F.linear``'s, so outputs may part from HF's at near-ties, as any other kernel would.

Memory: the packed copies are held beside the model's own weights (HF's modules keep using those), so the linear
weights take twice their size while an engine lives; ``backend="torch"`` avoids that.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu
from .torch_ref import TorchBackend


def memo_by_memory(entries: dict, key: tuple, weight: torch.Tensor, make: Callable[[], object]):
    """``entries[key]`` for ``weight`` (``key`` starts with its address), made by ``make()`` on first use and again
    if the weight changed in place or another tensor took its memory; the entry goes when the weight does. Each entry
    is (weak reference to the tensor first seen there, its version counter then, the value)."""
    entry = entries.get(key)
    if entry is not None:
        first = entry[0]()
        if first is not None and first.data_ptr() == key[0] and first._version == entry[1]:
            return entry[2]
    value = make()

    def forget(ref, key=key):
        if entries.get(key, (None,))[0] is ref:
            del entries[key]

    entries[key] = (weakref.ref(weight, forget), weight._version, value)
    return value


class OneDNNBackend(TorchBackend):
    name = "onednn"

    # (address, shape, dtype, rows it is laid out for) of a weight -> (weak reference to the tensor first packed
    # there, its version counter when packed, packed weight); shared by every instance (the reference's ops are
    # classmethods): a weight is packed once however many engines use it, and its packed copy goes when the weight
    # does. Keyed by memory, not by the Python object, so one weight reached through several tensor objects (a
    # ``FrozenWeights`` parameter and the tensor it wraps, a detached view) is packed once
    _packed: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}
    packs = 0  # weights packed so far (tests check that steps reuse the packed copies)

    def __init__(self):
        if not cpu.onednn_available():
            raise RuntimeError("the onednn backend needs a torch build with oneDNN's packed linear "
                               "(torch.ops.mkldnn._linear_pointwise); use backend='torch'")

    @classmethod
    def _pack(cls, weight: torch.Tensor, rows: int | None = 1) -> torch.Tensor:
        """The packed copy of ``weight``, made on first use and again if the weight changed in place, laid out for
        products of ``rows`` rows (None: oneDNN's general layout). On a 2-core AVX2 EPYC a float32 LM head packed
        for one row took 15 ms at 2 to 4 rows, packed without a hint 9.5 and 10.5 ms."""
        def pack():
            cls.packs += 1
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), *([] if rows is None else [rows]))

        key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, rows)
        return memo_by_memory(cls._packed, key, weight, pack)

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu" or \
                x.numel() == 0:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, cls._pack(weight), bias, "none", [None], "")
        return out.view(*x.shape[:-1], weight.shape[0])


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) in weight's dtype on oneDNN's packed copy of it (``OneDNNBackend._pack``, laid
    out for several rows), rounded to x's dtype: the widened products (``InductorBackend.product_dtype``) outside
    the compiled steps. (Called inside them as a registered op instead of freezing, it kept them in Inductor's
    on-disk caches, but a verification of several tokens took 2.9-3.9 vanilla steps against 2.1 frozen.)"""
    rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, OneDNNBackend._pack(weight, None), bias, "none", [None], "")
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)

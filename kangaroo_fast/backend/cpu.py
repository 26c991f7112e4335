"""What this CPU's torch can do, and the dtype rules that follow: one module with no imports from the package, so
that every backend reads the same answers (the tests replace ``onednn_available`` here to take the paths of a CPU
without bf16 products; callers look it up through this module at call time, ``cpu.onednn_available()``)."""
from __future__ import annotations

import functools

import torch


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


def arithmetic_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a ``dtype`` model's products and KV caches compute in on ``device`` on the CPU paths that widen
    (``TorchBackend.cache_dtype``, ``InductorBackend.product_dtype``): float32 for bfloat16 on a CPU without oneDNN's
    bf16 products (AVX2), else ``dtype``. There, measured on a 2-core AVX2 EPYC: a bf16 product converts its
    weights for every row (a 4-row LM head costs 3x one row; a 300-row layer product 5-7x the same in float32) and
    bf16 attention converts its keys at every step (3-4x float32 attention); the float32 ones read twice the bytes
    but cost about the same per row at 1..8 rows once packed (``bench/linear_rows.py``). bf16 widens to float32
    exactly, so the weights and cached keys hold the same numbers; products round to bf16 as a bf16 product does.
    (The inductor backend widens products only where FBGEMM's float16 ones are missing too: ``backend/fbgemm.py``.)"""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not onednn_available():
        return torch.float32
    return dtype

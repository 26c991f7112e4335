"""bf16 products of several rows on a CPU without bf16 matrix instructions (AVX2): FBGEMM's float16 weights, exact.

On such a CPU torch's bf16 product converts its weights to float32 for every row it multiplies (a 4-row LM head of
the embedded model costs about 3x one row), and float32 copies of the weights read twice the bytes. FBGEMM, the x86
library behind torch's dynamic quantization, multiplies float32 rows by packed float16 weights, converting them in
registers once for all the rows (``torch.ops.quantized.linear_prepack_fp16`` / ``linear_dynamic_fp16``): the bytes
of bf16, and a few rows for little more than one (``bench/linear_rows.py``). The inductor backend sends a bf16
model's products of several rows here (prefill, verification of several tokens, batches); one-row products stay
torch's bf16 ones, which cost no more at one row and need no call out of the compiled step.

float16 holds every bf16 value of a trained weight matrix exactly, as it is or once the matrix is scaled by a power
of two (bf16 carries 8 significant bits, float16 11; float16's range, subnormals included, spans 2^40): each weight
is checked when it is packed (``exact_scale``); a scaled weight's rows are scaled by the inverse power of two, which
changes no rounding. So every product is the float32 product of the bf16 weight and the row, rounded to bf16, as
bf16's own product is, summed in FBGEMM's order. A weight float16 cannot hold exactly is multiplied in float32
instead: the numbers never depend on the path, only the speed does.

The product runs as one registered op (``kangaroo_fast::fp16_mm``), so compiled steps call it like any other op
(unfrozen: nothing for Inductor to pack). The packed copy of each weight is made on its first product of several
rows and kept while the weight lives (keyed by its memory, as ``OneDNNBackend._pack``): the weights' size again.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F

from . import cpu
from .onednn import memo_by_memory

_FP16_MAX = 65504.0


@functools.lru_cache(maxsize=None)
def fp16_products_available() -> bool:
    """FBGEMM's float16-weight products exist in this torch build and run on this CPU."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        w = torch.full((8, 16), 0.5)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(2, 16), torch.ops.quantized.linear_prepack_fp16(w))
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.equal(out, torch.full((2, 8), 8.0)))


@torch.compiler.assume_constant_result  # compiled steps read it as a constant of their trace
def fp16_products() -> bool:
    """A bfloat16 model's products of several rows run on FBGEMM's float16 weights here: a CPU without oneDNN's
    bf16 products (AVX2), where FBGEMM's float16 ones exist."""
    return not cpu.onednn_available() and fp16_products_available()


def exact_scale(weight: torch.Tensor) -> int | None:
    """The power of two e such that ``weight * 2**e`` is exact in float16 (below its maximum): 0 where the weight
    itself is (no scaling then), else the largest e that keeps its largest value in range; None where no e does (or
    the weight is not finite)."""
    w = weight.detach().float()
    top = w.abs().max().item() if w.numel() else 0.0
    if not math.isfinite(top):
        return None
    candidates = [0] if top < _FP16_MAX else []
    if top > 0:
        e = math.floor(math.log2(_FP16_MAX / top))
        while top * 2.0 ** e >= _FP16_MAX:  # log2's rounding
            e -= 1
        candidates.append(e)
    for e in candidates:
        scaled = w * 2.0 ** e
        if torch.equal(scaled.half().float(), scaled):
            return e
    return None


class _Packs:
    """The packed float16 copy of each weight, keyed by (address, shape, dtype) (``onednn.memo_by_memory``: a
    weight changed in place, or a new tensor at the same address, is packed again)."""
    entries: dict[tuple, tuple[weakref.ref, int, tuple[object, float | None]]] = {}
    packs = 0  # weights packed so far (tests check that steps reuse them)

    @classmethod
    def get(cls, weight: torch.Tensor) -> tuple[object, float | None]:
        """(packed weight, the factor that scales the rows), or (None, None) where the weight is not exact in
        float16 (``exact_scale``)."""
        def pack():
            cls.packs += 1
            e = exact_scale(weight)
            if e is None:
                return None, None
            return torch.ops.quantized.linear_prepack_fp16(weight.detach().float() * 2.0 ** e), 2.0 ** -e

        return memo_by_memory(cls.entries, (weight.data_ptr(), tuple(weight.shape), weight.dtype), weight, pack)


def _fp16_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    packed, factor = _Packs.get(weight)
    if packed is None:
        return F.linear(rows, weight.float())
    return torch.ops.quantized.linear_dynamic_fp16(rows if factor == 1.0 else rows * factor, packed)


def _fp16_mm_shape(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


# rows [M, K] float32 @ weight [N, K].T -> [M, N] float32
_LIB = torch.library.Library("kangaroo_fast", "FRAGMENT")
_LIB.define("fp16_mm(Tensor rows, Tensor weight) -> Tensor")
_LIB.impl("fp16_mm", _fp16_mm, "CPU")
torch.library.register_fake("kangaroo_fast::fp16_mm", _fp16_mm_shape, lib=_LIB)


def fp16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) for a CPU tensor x and weight [N, K], on FBGEMM's packed float16 copy of weight
    (exact, see the module): float32 products and sums, rounded to x's dtype. The casts around the op are traced
    with the step, so Inductor fuses them into their neighbours."""
    out = torch.ops.kangaroo_fast.fp16_mm(x.reshape(-1, x.shape[-1]).float(), weight)
    if bias is not None:
        out = out + bias.float()
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)

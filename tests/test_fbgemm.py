"""bf16 products of several rows on FBGEMM's float16 weights (``backend/fbgemm.py``), the AVX2 path.

The exactness rule (a power of two that makes the weight exact in float16), the products against the float32 product
of the same bf16 weight (scaled or not, with or without bias, odd shapes, a weight float16 cannot hold), the packed
copies keyed by memory, the compiled op against the eager one, and decoding on them: no widened copies, every step
unfrozen, several-row products on the packed copies, Kangaroo emitting its own vanilla decode.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kangaroo_fast
from kangaroo_fast.backend import cpu
from kangaroo_fast.backend.fbgemm import _Packs, exact_scale, fp16_linear, fp16_products, fp16_products_available
from kangaroo_fast.backend.inductor import InductorBackend, cpp_compiler_available
from kangaroo_fast.config import DecodeSettings

from conftest import TOLERANCES, HalfProducts, WidenedProducts, random_adapter, random_prompt, tiny_model

pytestmark = pytest.mark.skipif(not fp16_products_available(), reason="this torch build has no FBGEMM")


def _bf16(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


TINY = (1 + 2.0 ** -7) * 2.0 ** -20  # 8 significant bits under float16's subnormal step (2^-24): inexact as it is


@pytest.mark.parametrize("values,expected", [
    ([[0.5, -3.0], [0.0, 1e-3]], 0),  # exact as it is: no scaling
    ([[0.0, 0.0]], 0),
    ([[TINY, -TINY]], 35),  # scaled up: the largest power of two that keeps it under float16's maximum (65504)
    ([[1e5, 3.0]], -1),  # over float16's maximum: scaled down
    ([[2.0 ** 60, 3 * 2.0 ** -60]], None),  # 2^120 apart: no power of two fits both
    ([[float("inf"), 1.0]], None),
])
def test_exact_scale(values, expected):
    w = torch.tensor(values).to(torch.bfloat16)
    assert exact_scale(w) == expected
    if expected is not None:
        scaled = w.float() * 2.0 ** expected
        assert torch.equal(scaled.half().float(), scaled) and scaled.abs().max() < 65504


@pytest.mark.parametrize("rows,k,n", [(1, 7, 1), (7, 123, 45), (3, 576, 960), (123, 64, 3), (2, 1, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -24, 2.0 ** 20])
def test_products_match_the_float32_product(rows, k, n, bias, scale):
    """float32 rows times a bf16 weight on its float16 copy: the float32 product of the same numbers (float32
    tolerance), whether the weight is held as it is or scaled by a power of two; bf16 rows get it rounded to bf16."""
    w = _bf16((n, k), 11 + n, scale * k ** -0.5)
    b = _bf16((n,), 12) if bias else None
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = fp16_linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), exact, atol=atol * scale, rtol=rtol)
    xb = x.to(torch.bfloat16)
    out_b = fp16_linear(xb.view(1, rows, k), w, b)  # [B, T, K] keeps its shape
    assert out_b.dtype == torch.bfloat16 and out_b.shape == (1, rows, n)
    ref = F.linear(xb.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out_b[0], ref, atol=atol * scale, rtol=rtol)


def test_scaling_changes_no_number():
    """A weight scaled by 2^-30 (held as 2^-30 * 2^e in float16) gives 2^-30 times the unscaled one's products,
    bit for bit: powers of two commute with float32 rounding."""
    w, x = _bf16((45, 123), 3, 0.1), torch.randn(7, 123)
    small = w * 2.0 ** -30
    assert exact_scale(w) == 0 and exact_scale(small) > 0
    assert torch.equal(fp16_linear(x, small), fp16_linear(x, w) * 2.0 ** -30)


def test_a_weight_float16_cannot_hold_runs_in_float32():
    w = torch.tensor([[2.0 ** 60, 3 * 2.0 ** -60, 1.0]]).to(torch.bfloat16).repeat(5, 1)
    x = torch.randn(4, 3)
    assert _Packs.get(w) == (None, None)
    assert torch.equal(fp16_linear(x, w), F.linear(x, w.float()))


def test_packed_copies_are_keyed_by_memory():
    """Packed once, reused through any tensor object over the same memory, packed again after an in-place change,
    dropped with the weight."""
    w, x = _bf16((9, 17), 4), torch.randn(3, 17)
    packs = _Packs.packs
    first = fp16_linear(x, w)
    assert _Packs.packs == packs + 1
    assert torch.equal(fp16_linear(x, w.detach()), first) and _Packs.packs == packs + 1
    with torch.no_grad():
        w.mul_(-1)
    assert torch.equal(fp16_linear(x, w), -first) and _Packs.packs == packs + 2
    key = (w.data_ptr(), tuple(w.shape), w.dtype)
    assert key in _Packs.entries
    del w
    assert key not in _Packs.entries


@pytest.mark.skipif(not cpp_compiler_available(), reason="compiling needs a C++ compiler")
def test_compiled_products_are_the_eager_ones():
    w, b = _bf16((45, 123), 5), _bf16((45,), 6)
    fn = lambda x: HalfProducts.linear(torch.relu(x), w, b) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for rows in (3, 7):
        x = _bf16((1, rows, 123), rows)
        assert torch.equal(compiled(x), fn(x))


@pytest.mark.parametrize("has_bf16_products", [False, True])
def test_the_rule(monkeypatch, has_bf16_products):
    """FBGEMM's products for a bf16 model where oneDNN has no bf16 ones; one row stays on the bf16 weights."""
    monkeypatch.setattr(cpu, "onednn_available", lambda: has_bf16_products)
    assert fp16_products() == (not has_bf16_products)
    assert InductorBackend._fp16(torch.bfloat16, torch.device("cpu")) == (not has_bf16_products)
    assert InductorBackend.product_dtype(torch.bfloat16, "cpu") == torch.bfloat16  # never widened where FBGEMM is
    assert not InductorBackend._fp16(torch.float32, torch.device("cpu"))
    assert not InductorBackend._fp16(torch.bfloat16, torch.device("meta"))
    assert WidenedProducts.product_dtype(torch.bfloat16, "cpu") == (
        torch.bfloat16 if has_bf16_products else torch.float32)
    w, packs = _bf16((5, 8), 7), _Packs.packs
    HalfProducts.linear(_bf16((1, 1, 8), 8), w)  # one row: the bf16 product, nothing packed
    assert _Packs.packs == packs
    HalfProducts.linear(_bf16((1, 2, 8), 8), w)
    assert _Packs.packs == packs + 1


@pytest.mark.skipif(not cpp_compiler_available(), reason="the inductor backend needs a C++ compiler")
def test_engine_on_fp16_products(monkeypatch):
    """On a CPU without oneDNN's bf16 products (AVX2; forced here, whatever this CPU has): no widened copies,
    float32 caches; every compiled step unfrozen (nothing to pack: all of them in Inductor's on-disk caches); the
    prefill and the steps of several rows multiply on the packed float16 copies (packed once); Kangaroo emits the
    engine's vanilla decode, and a batch its first row's."""
    monkeypatch.setattr(cpu, "onednn_available", lambda: False)
    model = tiny_model("qwen2", 13, num_hidden_layers=3).to(torch.bfloat16)  # qwen2: a bias in the qkv product
    before = {name: p.clone() for name, p in model.named_parameters()}
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=9), backend=HalfProducts(),
                            dtype=torch.bfloat16)
    engine = km.engine
    assert engine.weights.wide is None and engine.cache.k.dtype == torch.float32
    prompt = random_prompt(model.config.vocab_size, 11, 1300)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=12)
    packs = _Packs.packs
    vanilla, _ = engine.generate(prompt, settings, set(), speculate=False)
    assert _Packs.packs > packs  # the prefill's products
    spec, stats = engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla
    assert all(not step.options["freezing"] for step in engine.steps.graphs.values())
    assert any("T>1" in key for key in engine.steps.graphs)
    packs = _Packs.packs
    assert engine.generate(prompt, settings, set())[0] == vanilla
    assert _Packs.packs == packs  # nothing packed anew
    batch = km.generate([prompt, random_prompt(model.config.vocab_size, 9, 4)], max_new_tokens=12,
                        eos_token_id=[], threshold=0.0, max_draft_steps=3, exit_layer=2)
    assert batch[0].tokens == vanilla
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # HF's weights untouched

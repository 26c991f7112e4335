"""float32 for a bfloat16 model on CPUs without bf16 products (AVX2): KV caches, and products of several rows.

The rules (``TorchBackend.cache_dtype``, ``InductorBackend.product_dtype``); exact widening on every cache write
(int and per-sequence starts, the reference's and the compiled steps' forms); attention over the wider caches and
products on widened weights against the model's own dtype; and decoding with them: the engine's caches and weights
follow its backend (one-row products on the model's weights, several rows on the widened copies: the path where
FBGEMM's float16 products do not exist, forced here by ``WidenedProducts``), and Kangaroo still emits its own
vanilla decode.
"""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.backend import TorchBackend, get_backend
from kangaroo_fast.backend import cpu
from kangaroo_fast.backend.inductor import InductorBackend, cpp_compiler_available
from kangaroo_fast.config import DecodeSettings

from conftest import TOLERANCES, WidenedProducts, early_exit_adapter, random_prompt, tiny_model

WRITERS = [TorchBackend._write_cache, InductorBackend._write_cache]


def _bf16(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("has_bf16_products", [False, True])
def test_the_rule(monkeypatch, has_bf16_products):
    monkeypatch.setattr(cpu, "onednn_available", lambda: has_bf16_products)
    wide = torch.bfloat16 if has_bf16_products else torch.float32
    assert TorchBackend.cache_dtype(torch.bfloat16, "cpu") == wide
    assert TorchBackend.cache_dtype(torch.float32, "cpu") == torch.float32
    assert TorchBackend.cache_dtype(torch.float16, "cpu") == torch.float16
    assert TorchBackend.cache_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16
    assert get_backend("torch").cache_dtype(torch.bfloat16, "cpu") == wide
    assert WidenedProducts.product_dtype(torch.bfloat16, "cpu") == wide  # without FBGEMM's (``test_fbgemm.py``)
    assert WidenedProducts.product_dtype(torch.float32, "cpu") == torch.float32
    assert TorchBackend.product_dtype(torch.bfloat16, "cpu") == torch.bfloat16  # the reference never widens


def test_triton_backend_keeps_the_models_dtype():
    pytest.importorskip("triton")
    from kangaroo_fast.backend.triton_backend import TritonBackend

    assert TritonBackend.cache_dtype(torch.bfloat16, "cpu") == torch.bfloat16


@pytest.mark.parametrize("write", WRITERS, ids=["reference", "compiled-form"])
@pytest.mark.parametrize("bsz,t,starts,as_tensor", [(1, 1, [0], False), (1, 7, [5], False), (3, 4, [9] * 3, False),
                                                     (1, 1, [0], True), (1, 7, [5], True), (3, 1, [2, 0, 9], True),
                                                     (3, 4, [1, 6, 13], True)])
def test_writes_widen_exactly(write, bsz, t, starts, as_tensor):
    hkv, s_max, d = 3, 17, 5
    k, v = _bf16((bsz, hkv, t, d), 1), _bf16((bsz, hkv, t, d), 2)
    k_cache = torch.zeros(bsz, hkv, s_max, d)
    v_cache = torch.zeros(bsz, hkv, s_max, d)
    start = torch.tensor(starts) if as_tensor else starts[0]
    write(k, v, k_cache, v_cache, start)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for b, p in enumerate(starts):
        expected_k[b, :, p:p + t] = k[b].float()
        expected_v[b, :, p:p + t] = v[b].float()
    assert k_cache.dtype == torch.float32
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("t,start,window", [(1, 0, None), (1, 122, None), (7, 0, None), (7, 30, None),
                                            (3, 40, 16)])
def test_attention_over_a_float32_cache(t, start, window):
    """One int start for the batch: the reference's attention over the widened caches is the attention over the
    bf16 ones within the bf16 tolerance, in the queries' dtype."""
    bsz, hq, hkv, s_max, d = 2, 6, 3, 130, 16
    q = _bf16((bsz, hq, t, d), 3)
    k_cache, v_cache = _bf16((bsz, hkv, s_max, d), 4), _bf16((bsz, hkv, s_max, d), 5)
    narrow = TorchBackend.attention(q, k_cache, v_cache, start, window)
    wide = TorchBackend.attention(q, k_cache.float(), v_cache.float(), start, window)
    assert wide.dtype == torch.bfloat16 and wide.shape == narrow.shape == (bsz, t, hq * d)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(wide, narrow, atol=atol, rtol=rtol)


@pytest.mark.parametrize("bsz,t", [(1, 1), (1, 5), (3, 1), (3, 4)])
def test_attention_per_sequence_over_a_float32_cache(bsz, t):
    """Tensor starts, as batches and the compiled steps run: the reference's form and the compiled form."""
    hq, hkv, s_max, d = 4, 2, 41, 8
    q = _bf16((bsz, hq, t, d), 6)
    k_cache, v_cache = _bf16((bsz, hkv, s_max, d), 7), _bf16((bsz, hkv, s_max, d), 8)
    start = torch.tensor([9, 30, 0][:bsz])
    end = int(start.max()) + t
    atol, rtol = TOLERANCES[torch.bfloat16]
    for attention in (TorchBackend.attention, InductorBackend.attention):
        narrow = attention(q, k_cache, v_cache, start, None, end)
        wide = attention(q, k_cache.float(), v_cache.float(), start, None, end)
        assert wide.dtype == torch.bfloat16
        torch.testing.assert_close(wide, narrow, atol=atol, rtol=rtol)


class _Float32Caches(TorchBackend):
    """The reference with float32 caches whatever this CPU has (the rule's choice on AVX2)."""

    @staticmethod
    def cache_dtype(dtype, device):
        return torch.float32


def test_engine_caches_follow_the_backend_and_kangaroo_emits_its_vanilla_decode():
    model = tiny_model("llama", 6).to(torch.bfloat16)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend=_Float32Caches(),
                            dtype=torch.bfloat16)
    engine = km.engine
    assert engine.w.dtype == torch.bfloat16
    assert engine.cache.k.dtype == engine.cache.v.dtype == engine.adapter_cache.k.dtype == torch.float32
    prompt = random_prompt(model.config.vocab_size, 5, 3)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=12)
    vanilla, _ = engine.generate(prompt, settings, set(), speculate=False)
    assert len(vanilla) == 12 and all(0 <= t < model.config.vocab_size for t in vanilla)
    spec, stats = engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla
    batch = km.generate([prompt, random_prompt(model.config.vocab_size, 9, 4)], max_new_tokens=12,
                        eos_token_id=[], threshold=0.0, max_draft_steps=3, exit_layer=2)
    assert batch[0].tokens == vanilla


@pytest.mark.parametrize("rows,k,n", [(1, 7, 1), (7, 123, 45), (3, 576, 960), (123, 64, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_products_on_widened_weights(rows, k, n, bias):
    """bf16 rows times float32 copies of bf16 weights: the float32 product rounded to bf16 (eager: oneDNN on the
    packed copy), within the bf16 tolerance of the bf16 product."""
    x, w = _bf16((rows, k), 10 + rows), _bf16((n, k), 11 + n) * k ** -0.5
    b = _bf16((n,), 12) if bias else None
    out = InductorBackend.linear(x, w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    wide = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, wide, atol=atol, rtol=rtol)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=atol, rtol=rtol)
    batched = InductorBackend.linear(x.view(1, rows, k), w.float())  # [B, T, K] inputs keep their shape
    assert batched.shape == (1, rows, n)


@pytest.fixture
def without_bf16_products(monkeypatch):
    """This CPU as an AVX2 one, whatever it is: no oneDNN bf16 products."""
    monkeypatch.setattr(cpu, "onednn_available", lambda: False)


@pytest.mark.skipif(not cpp_compiler_available(), reason="the inductor backend needs a C++ compiler")
def test_engine_widens_the_products_of_several_rows(without_bf16_products):
    model = tiny_model("qwen2", 6).to(torch.bfloat16)  # qwen2: a bias in the qkv product
    before = {name: p.clone() for name, p in model.named_parameters()}
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend=WidenedProducts(),
                            dtype=torch.bfloat16, graphs=False)
    engine, h = km.engine, model.config.hidden_size
    wide_w, wide_a = engine.weights.wide
    assert engine.w.lm_head.dtype == engine.a.head.dtype == torch.bfloat16
    assert wide_w.lm_head.dtype == wide_a.head.dtype == wide_a.qkv.dtype == torch.float32
    assert all(w.w_qkv.dtype == w.b_qkv.dtype == w.w_down.dtype == torch.float32 for w in wide_w.layers)
    assert wide_w.embed is engine.w.embed and wide_w.embed.dtype == torch.bfloat16  # no product: not copied
    assert torch.equal(wide_w.lm_head, engine.w.lm_head.float())  # the same numbers
    assert engine._weights(torch.zeros(1, 1, h))[0] is engine.w
    assert engine._weights(torch.zeros(1, 3, h))[0] is wide_w and engine._weights(torch.zeros(2, h))[1] is wide_a
    assert engine.cache.k.dtype == torch.float32
    prompt = random_prompt(model.config.vocab_size, 9, 5)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=4, max_new_tokens=14)
    vanilla, _ = engine.generate(prompt, settings, set(), speculate=False)
    spec, stats = engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # HF's weights untouched


def test_packed_copies_are_keyed_by_memory():
    """A float32 copy packed once, reused through any tensor object over the same memory (a compiled step passes
    a new one each call), packed again after an in-place change, and dropped with the weight."""
    from kangaroo_fast.backend.onednn import OneDNNBackend, packed_linear

    w, x = torch.randn(9, 17), _bf16((3, 17), 13)
    packs = OneDNNBackend.packs
    first = packed_linear(x, w, None)
    assert OneDNNBackend.packs == packs + 1 and first.dtype == torch.bfloat16
    assert torch.equal(packed_linear(x, w.detach(), None), first) and OneDNNBackend.packs == packs + 1
    with torch.no_grad():
        w.mul_(-1)
    assert torch.equal(packed_linear(x, w, None), -first) and OneDNNBackend.packs == packs + 2
    key = (w.data_ptr(), tuple(w.shape), w.dtype, None)
    assert key in OneDNNBackend._packed
    del w
    assert key not in OneDNNBackend._packed


@pytest.mark.parametrize("has_bf16,compiler,expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, torch.float32)])
def test_default_cpu_dtype(monkeypatch, has_bf16, compiler, expected):
    """bf16 on CPUs with bf16 products, and on others where the compiled, widened bf16 path exists."""
    from kangaroo_fast import models
    from kangaroo_fast.backend import inductor

    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(inductor, "cpp_compiler_available", lambda: compiler)
    assert models.default_dtype("cpu") == expected

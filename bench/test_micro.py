"""Microbenchmarks: every backend op the engine calls, at its decode (T=1) and verification (T=7) shapes, and a
whole draft step and verification step, at SmolLM2-135M and Vicuna-7B shapes, for every provider (``torch`` is
the reference; another backend's output is checked against it before it is timed).

    make bench                                  (or: pytest -q bench/test_micro.py)
"""
from __future__ import annotations

import pytest
import torch

import harness
from kangaroo_fast.backend import TorchBackend, get_backend
from kangaroo_fast.config import DecodeSettings
from kangaroo_fast.drafting import AdapterDrafter
from kangaroo_fast.engine import RoundDrafts

SHAPES = list(harness.shapes(harness.bench_device()))
PROVIDERS = harness.providers()
T = harness.VERIFY_TOKENS
# per-dtype (atol, rtol) of a provider against the torch reference, one table for every op
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (3e-3, 3e-3)}

_ENGINES: dict = {}


def engine_for(shape_name, provider, dtype, device):
    """One random engine per (shape, provider), the same weights and caches for every provider; kept while the
    tests of that shape run (a 7B one takes a while to build, and holds 1.5 GB on CPU, 13 GB on CUDA)."""
    if any(name != shape_name for name, _ in _ENGINES):
        _ENGINES.clear()
    key = (shape_name, provider)
    if key not in _ENGINES:
        _ENGINES[key] = harness.random_engine(harness.shapes(device)[shape_name], provider, dtype, device)
    return _ENGINES[key]


def op_inputs(engine, op, case):
    """The arguments the engine passes to ``op`` in ``case``, and the bytes a memory-bound op must move."""
    w, c, dev, dt = engine.w, engine.cfg, engine.w.device, engine.w.dtype
    layer = w.layers[0]
    k_cache, v_cache = engine.cache.layer(0)
    t = T if case.endswith(f"T={T}") else 1
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, t, c.hidden_size, generator=gen).to(dev, dt)
    start = harness.CONTEXT
    if op == "embed":
        ids = torch.randint(0, c.vocab_size, (1, t), generator=gen).to(dev)
        return (ids, w.embed), 2 * x.numel() * x.element_size()
    if op == "rms_norm":
        bytes_moved = 2 * harness.tensor_bytes(x) + harness.tensor_bytes(layer.input_norm)
        return (x, layer.input_norm, c.rms_norm_eps), bytes_moved
    if op == "linear":
        weight = layer.w_o if case.startswith("o ") else layer.w_qkv
        x = x[..., :weight.shape[1]].contiguous()
        out_bytes = t * weight.shape[0] * x.element_size()
        return (x, weight), harness.tensor_bytes(x, weight) + out_bytes
    if op == "mlp":
        return (x, layer.w_gate_up, layer.w_down), 2 * harness.tensor_bytes(x) + harness.tensor_bytes(
            layer.w_gate_up, layer.w_down)
    if op == "rope_cache_write":
        qkv = torch.randn(1, t, c.qkv_size, generator=gen).to(dev, dt)
        cos, sin = engine.cos[start:start + t], engine.sin[start:start + t]
        return (qkv, cos, sin, k_cache, v_cache, start, c.num_heads, c.num_kv_heads), 2 * harness.tensor_bytes(qkv)
    if op == "attention":
        q = torch.randn(1, c.num_heads, t, c.head_dim, generator=gen).to(dev, dt)
        read = 2 * (start + t) * c.kv_size * q.element_size()
        return (q, k_cache, v_cache, start, None), 2 * harness.tensor_bytes(q) + read
    if op == "draft_head":
        return (x[:, -1], engine.a.norm, c.rms_norm_eps, engine.a.head), harness.tensor_bytes(
            x[:, -1], engine.a.norm, engine.a.head)
    if op == "verify_head":
        return (x, w.final_norm, c.rms_norm_eps, w.lm_head), harness.tensor_bytes(x, w.final_norm, w.lm_head)
    if op == "accept":
        drafts = torch.randint(0, 3, (1, T - 1), generator=gen).to(dev)
        targets = torch.randint(0, 3, (1, T), generator=gen).to(dev)
        return (drafts, targets), None
    raise KeyError(op)


OP_CASES = [("embed", "T=1"), ("rms_norm", "T=1"), ("rms_norm", f"T={T}"), ("linear", "qkv T=1"),
            ("linear", "o T=1"), ("linear", f"qkv T={T}"), ("mlp", "T=1"), ("mlp", f"T={T}"),
            ("rope_cache_write", "T=1"), ("rope_cache_write", f"T={T}"), ("attention", "T=1"),
            ("attention", f"T={T}"), ("draft_head", "T=1"), ("verify_head", f"T={T}"), ("accept", f"k={T - 1}")]


def _check(out, ref, dtype, op):
    if isinstance(ref, tuple):
        for o, r in zip(out, ref):
            _check(o, r, dtype, op)
    elif ref.dtype.is_floating_point:
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{op}: {m}")
    elif op == "accept":
        assert torch.equal(out, ref), f"{op}: {out} != {ref}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op, case", OP_CASES, ids=[f"{o}-{c}" for o, c in OP_CASES])
@pytest.mark.parametrize("shape", SHAPES)
def test_op(benchmark, recorder, device, dtype, shape, op, case, provider):
    engine = engine_for(shape, "torch", dtype, device)
    backend = get_backend(provider)
    if not hasattr(backend, op):
        pytest.skip(f"backend {provider!r} has no op {op!r}")
    args, bytes_moved = op_inputs(engine, op, case)
    fn = getattr(backend, op)
    with torch.no_grad():
        if provider != "torch":
            _check(fn(*args), getattr(TorchBackend, op)(*args), dtype, op)
        times = harness.time_op(lambda: fn(*args), device, benchmark)
    m = recorder.add(harness.Measurement.from_times(times, bytes_moved, op=op, case=case, shape=shape,
                                                    provider=provider, device=str(device),
                                                    dtype=str(dtype).replace("torch.", "")))
    benchmark.extra_info.update(median_ms=m.median_ms, gbps=m.gbps)
    assert m.median_ms > 0


def _weight_bytes(engine, first, stop):
    layers = engine.w.layers[first:stop]
    return sum(harness.tensor_bytes(l.input_norm, l.w_qkv, l.b_qkv, l.w_o, l.post_norm, l.w_gate_up, l.w_down)
               for l in layers)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("step", ["draft_step", "verify_step"])
@pytest.mark.parametrize("shape", SHAPES)
def test_step(benchmark, recorder, device, dtype, shape, step, provider):
    """A draft step: one proposal (the newest token through layers 0..l-1, the adapter and the draft head, and
    the proposal's own shallow pass, as ``Engine.draft`` runs it). A verification step: layers l..L-1 over the
    kept states of last + 6 drafts, the verify head and the acceptance (``Engine.verify``)."""
    l, pos = harness.EXIT_LAYER, harness.CONTEXT
    settings = DecodeSettings(exit_layer=l, threshold=0.0, max_draft_steps=6)

    def step_fn(engine):
        if step == "draft_step":
            def draft():
                rnd = RoundDrafts.start([11], [pos], [1])
                engine.draft(rnd, AdapterDrafter(), [0], settings, set())
                return rnd.tokens
            return draft
        states = torch.Generator().manual_seed(3)
        engine.shallow_states.copy_(torch.randn(engine.shallow_states.shape, generator=states))
        rnd = RoundDrafts.start([11], [pos], [T - 1])
        rnd.tokens = [[11] * (T - 1)]
        return lambda: engine.verify(rnd, l, settings)

    engine = engine_for(shape, provider, dtype, device)
    kv_read = 2 * pos * engine.cfg.kv_size * engine.w.embed.element_size()
    if step == "draft_step":
        a_bytes = harness.tensor_bytes(engine.a.qkv, engine.a.o, engine.a.head)
        bytes_moved = 2 * (_weight_bytes(engine, 0, l) + l * kv_read) + a_bytes + 2 * kv_read
        case = "1 proposal"
    else:
        n = engine.cfg.num_layers - l
        bytes_moved = _weight_bytes(engine, l, None) + n * kv_read + harness.tensor_bytes(engine.w.lm_head)
        case = f"{n} layer{'s' if n != 1 else ''}, T={T}"
    with torch.no_grad():
        if provider != "torch":
            expected = step_fn(engine_for(shape, "torch", dtype, device))()
            got = step_fn(engine)()
            same = torch.equal(got, expected) if isinstance(got, torch.Tensor) else got == expected
            assert same, f"{step}: tokens differ from the torch backend"
        times = harness.time_op(step_fn(engine), device, benchmark)
    m = recorder.add(harness.Measurement.from_times(times, bytes_moved, op=step, case=case, shape=shape,
                                                    provider=provider, device=str(device),
                                                    dtype=str(dtype).replace("torch.", "")))
    benchmark.extra_info.update(median_ms=m.median_ms, gbps=m.gbps)
    assert m.median_ms > 0

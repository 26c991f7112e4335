"""Compiled decode steps on CPU (the inductor backend, ``graphs="compile"``): token-identical to HF greedy in
float32, alone and in batches whose rows finish apart, sampling equal to the same backend run eagerly, and one
compile per kind of step however the context, the verification length and the batch change."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import kangaroo_fast
from kangaroo_fast.backend import TorchBackend, default_backend_name
from kangaroo_fast.backend.inductor import InductorBackend, cpp_compiler_available
from kangaroo_fast.backend.cpu import onednn_available
from kangaroo_fast.graphs import CompiledStep

from conftest import TOLERANCES, WidenedProducts, hf_greedy, random_adapter, random_prompt, tiny_model

pytestmark = pytest.mark.skipif(not cpp_compiler_available(), reason="the inductor backend needs a C++ compiler")

NEW_TOKENS = 20
LENGTHS = (1, 7, 23)


@pytest.fixture(scope="module")
def case():
    """One tiny Llama (GQA 6/2), its prompts and HF's greedy outputs, and one compiled model shared by the tests
    (a compile is the slow part)."""
    model = tiny_model("llama", 11)
    prompts = [random_prompt(model.config.vocab_size, n, 1100 + n) for n in LENGTHS]
    refs = [hf_greedy(model, ids, NEW_TOKENS, eos_token_id=[]) for ids in prompts]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=5), backend="inductor")
    return model, prompts, refs, km


def test_compiled_greedy_matches_hf_alone(case, capsys):
    model, prompts, refs, km = case
    assert isinstance(km.engine.ops, InductorBackend) and km.engine.steps.mode == "compile"
    for ids, ref in zip(prompts, refs):
        assert km.generate(ids, max_new_tokens=NEW_TOKENS, speculate=False, eos_token_id=[]).tokens == ref
        for threshold in (0.0, 0.6):
            out = km.generate(ids, max_new_tokens=NEW_TOKENS, threshold=threshold, max_draft_steps=4,
                              eos_token_id=[])
            assert out.tokens == ref, threshold
    assert all(isinstance(step, CompiledStep) for step in km.engine.steps.graphs.values())
    kinds = {key[0] for key in km.engine.steps.graphs}
    # one sequence: the head runs inside its draft steps, and apart only after a copied span
    assert kinds - {"head"} == {"shallow", "draft", "verify"}
    assert sum(step.replays for step in km.engine.steps.graphs.values()) > 3 * len(km.engine.steps.graphs)
    # a cold step says it is compiling, once per kind of step
    said = capsys.readouterr().err.count("kangaroo_fast: compiling the ")
    assert said == len(km.engine.steps.graphs)


def test_compiled_batch_with_rows_finishing_apart_matches_hf(case):
    model, prompts, _refs, km = case
    # an EOS that one reference reaches early: that row leaves the batch first, the batch shrinks 3 -> 2 -> 1
    eos = hf_greedy(model, prompts[1], NEW_TOKENS, eos_token_id=[])[5]
    refs = [hf_greedy(model, ids, NEW_TOKENS, eos_token_id=eos) for ids in prompts]
    assert min(len(r) for r in refs) < NEW_TOKENS
    for speculate in (False, True):
        outs = km.generate(prompts, max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3,
                           eos_token_id=eos, speculate=speculate)
        assert [o.tokens for o in outs] == refs, speculate


def test_one_compile_per_kind_of_step(case):
    """``warm_up`` compiles every kind of step generation uses, and nothing compiles after it: new contexts,
    verification lengths and batch sizes, and one row sliced from a batch buffer, reuse the warmed-up steps
    (Dynamo's count of graphs stays put)."""
    model, prompts, _refs, km = case
    km.warm_up(batch_sizes=(1, 2))
    before, kinds = counters["stats"]["unique_graphs"], len(km.engine.steps.graphs)
    kwargs = dict(max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=5, eos_token_id=[])
    km.generate(prompts[:2], **kwargs)
    km.generate(prompts[0], **kwargs)
    longer = torch.cat([prompts[2], prompts[1]], dim=1)  # another context length
    km.generate(longer, **kwargs)
    km.generate([longer[0], prompts[0][0], prompts[1][0]], **kwargs)  # three rows, then fewer
    km.generate(prompts[1], speculate=False, max_new_tokens=NEW_TOKENS + 9, eos_token_id=[])
    assert counters["stats"]["unique_graphs"] == before
    # per batch of one or of more: shallow and verify for T of one and of more, vanilla's verify, draft, head
    assert len(km.engine.steps.graphs) == kinds <= 2 * (2 + 2 + 1 + 1 + 1)


def test_models_of_other_shapes_compile_apart():
    """Two models whose head counts differ, compiled in one process: each decodes as HF does. (Dynamo remembers the
    sizes a code object was compiled for by its file, line and name, which both models' steps share; with its
    automatic dynamic shapes on, the second model's head count came out symbolic and its compile failed.)"""
    for kind in ("llama", "mistral"):  # 2 and 6 KV heads
        model = tiny_model(kind, 21, num_hidden_layers=2)
        ids = random_prompt(model.config.vocab_size, 6, 1400)
        km = kangaroo_fast.load(model, backend="inductor")
        out = km.generate(ids, max_new_tokens=8, speculate=False, eos_token_id=[])
        assert out.tokens == hf_greedy(model, ids, 8, eos_token_id=[]), kind


def test_dense_strides():
    from kangaroo_fast.graphs import _dense

    buffer = torch.randn(3, 7, 5)
    row = buffer[:1, :4]  # contiguous() keeps its stride of 35 for the size-1 batch
    assert row.is_contiguous() and row.stride() == (35, 5, 1)
    dense = _dense(row)
    assert dense.stride() == (20, 5, 1) and torch.equal(dense, row)
    fresh = torch.randn(2, 3)
    assert _dense(fresh) is fresh


def test_compiled_sampling_equals_eager(case):
    model, prompts, _refs, km = case
    eager = kangaroo_fast.load(model, adapter=km.adapter, backend="inductor", graphs=False)
    assert eager.engine.steps.mode == "plain"
    for ids in prompts[1:]:
        kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=20, seed=3, eos_token_id=[])
        assert km.generate(ids, **kwargs).tokens == eager.generate(ids, **kwargs).tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,t,start,d", [(6, 2, 1, 0, 8), (6, 2, 1, 122, 8), (9, 3, 7, 30, 5), (4, 4, 2, 5, 16),
                                              (3, 1, 123, 0, 7)])
def test_one_sequence_attention_equals_the_reference(dtype, hq, hkv, t, start, d):
    """The compiled steps' attention of one sequence at a tensor start (over half-precision caches: grouped float32
    products) equals the reference's at the int start, within the dtype's tolerance, each query head on its own
    KV head's keys."""
    g = torch.Generator().manual_seed(hq * 1000 + t * 10 + start)
    s_max = start + t + 3  # room past the end: keys there must not be read
    q = torch.randn(1, hq, t, d, generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(1, hkv, s_max, d, generator=g).to(dtype) for _ in range(2))
    ref = TorchBackend.attention(q, k_cache, v_cache, start)
    out = InductorBackend.attention(q, k_cache, v_cache, torch.tensor([start]), None, start + t)
    assert out.dtype == dtype and out.shape == ref.shape == (1, t, hq * d)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,t,starts,d", [(6, 2, 1, (0, 7, 3), 8), (9, 3, 3, (30, 1, 122, 5), 5),
                                               (4, 4, 2, (5, 5), 16), (3, 1, 7, (0, 11), 7)])
def test_batch_attention_equals_the_reference(dtype, hq, hkv, t, starts, d):
    """A batch's attention at per-row starts (over half-precision caches: grouped float32 products, a mask per row)
    equals the reference's per-sequence attention, within the dtype's tolerance, and each row equals that row alone;
    float32 caches take the reference's call itself (bit for bit). A row whose queries run past the cache's end
    stays finite, as the reference's."""
    g = torch.Generator().manual_seed(hq * 1000 + t * 10 + sum(starts))
    bsz, end = len(starts), max(starts) + t
    s_max = end + 3
    q = torch.randn(bsz, hq, t, d, generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(bsz, hkv, s_max, d, generator=g).to(dtype) for _ in range(2))
    start = torch.tensor(starts)
    ref = TorchBackend.attention(q, k_cache, v_cache, start, None, end)
    out = InductorBackend.attention(q, k_cache, v_cache, start, None, end)
    assert out.dtype == dtype and out.shape == ref.shape == (bsz, t, hq * d)
    if dtype == torch.float32:
        assert torch.equal(out, ref)
        return
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for b, s in enumerate(starts):  # a row is the one-sequence attention of that row over its own keys
        alone = InductorBackend.attention(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], start[b:b + 1], None,
                                          s + t)
        torch.testing.assert_close(out[b:b + 1], alone, atol=atol, rtol=rtol)
    clipped = InductorBackend.attention(q, k_cache[:, :, :end - 1], v_cache[:, :, :end - 1], start, None, end - 1)
    assert torch.isfinite(clipped).all()


def test_compile_mode_needs_the_inductor_backend():
    model = tiny_model("llama", 12)
    with pytest.raises(ValueError, match="graphs='compile' needs the inductor backend, not the torch backend"):
        kangaroo_fast.load(model, backend="torch", graphs="compile")


def test_default_cpu_backend_compiles_bfloat16_only():
    eager = "onednn" if onednn_available() else "torch"
    assert default_backend_name("cpu", torch.bfloat16) == "inductor"
    assert default_backend_name("cpu", torch.float32) == eager
    assert default_backend_name("cpu") == eager


def test_eager_products_without_onednn_are_plain_linear(monkeypatch):
    """Where this CPU has no oneDNN bf16 products (AVX2 only), the backend still builds and its eager products
    (prefill, sampling's heads) are exactly ``F.linear``; with oneDNN they agree within bf16 rounding."""
    from kangaroo_fast.backend import cpu

    x = torch.randn(7, 123, dtype=torch.bfloat16)
    w = torch.randn(37, 123, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, w)
    if onednn_available():
        torch.testing.assert_close(InductorBackend.linear(x, w).float(), ref.float(), rtol=2e-2, atol=2e-1)
    monkeypatch.setattr(cpu, "onednn_available", lambda: False)
    ops = InductorBackend()
    assert torch.equal(ops.linear(x, w), ref)


CACHE_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import kangaroo_fast, kangaroo_fast.graphs as graphs
from torch._dynamo.utils import counters
from conftest import tiny_model
graphs.compile_options = lambda products=None: {"freezing": False}
km = kangaroo_fast.load(tiny_model("llama", 13, num_hidden_layers=1), adapter=None, backend="inductor")
km.warm_up()
print(counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"])
"""


def test_second_process_reads_the_compiled_steps_from_disk(tmp_path):
    """Without freezing (``compile_options`` where nothing is packed: one-row bf16 steps on an AVX2 CPU) a second
    process takes its
    compiled steps from Inductor's on-disk caches, the AOT graph cache included (frozen graphs skip it)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    tests = os.path.dirname(__file__)

    def hits():
        run = subprocess.run([sys.executable, "-c", CACHE_CHILD, tests], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return [int(n) for n in run.stdout.split()[-2:]]

    assert hits() == [0, 0]
    fx, aot = hits()
    assert aot >= 1 and fx >= 1


def test_no_compiler_error_names_the_eager_backend(monkeypatch):
    import kangaroo_fast.backend.inductor as inductor

    monkeypatch.setattr(inductor, "cpp_compiler_available", lambda: False)
    eager = "onednn" if onednn_available() else "torch"
    with pytest.raises(RuntimeError, match=f"found no compiler .*use backend='{eager}'"):
        InductorBackend()


class _HalfCaches(InductorBackend):
    """The inductor backend with the model's own bf16 KV caches whatever this CPU has (the rule's choice on a CPU
    with oneDNN's bf16 products, AVX512-BF16 or AMX)."""

    @staticmethod
    def cache_dtype(dtype, device):
        return dtype


def test_compiled_steps_over_bf16_caches():
    """The compiled steps with their attention over bf16 caches (grouped float32 products: the unit tests above):
    Kangaroo emits the compiled vanilla decode, of one sequence and of a batch (its rows round as a batch's do, which
    in bf16 may part from one sequence's)."""
    from kangaroo_fast.config import DecodeSettings

    model = tiny_model("llama", 14, num_hidden_layers=3).to(torch.bfloat16)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=4), backend=_HalfCaches(),
                            dtype=torch.bfloat16)
    engine = km.engine
    assert engine.cache.k.dtype == torch.bfloat16 and engine.steps.mode == "compile"
    prompt = random_prompt(model.config.vocab_size, 13, 1400)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=12)
    vanilla, _ = engine.generate(prompt, settings, set(), speculate=False)
    spec, stats = engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla
    prompts = [prompt, random_prompt(model.config.vocab_size, 6, 5)]
    kwargs = dict(max_new_tokens=12, eos_token_id=[], threshold=0.0, max_draft_steps=3, exit_layer=2)
    batch = km.generate(prompts, **kwargs)
    assert [o.tokens for o in batch] == [o.tokens for o in km.generate(prompts, speculate=False, **kwargs)]
    assert sum(o.stats.draft_steps for o in batch) > 0


def test_compiled_bf16_without_bf16_products(monkeypatch):
    """A CPU without oneDNN's bf16 products (AVX2; taken away here where this one has them) nor FBGEMM's float16
    ones (``WidenedProducts``; FBGEMM's path: ``test_fbgemm.py``): the one-row steps read the bf16 weights unfrozen
    (nothing to pack, so Inductor's on-disk caches keep them), the steps of several rows the float32 copies, frozen
    and packed by Inductor; the eager calls (prefill) pack those copies once; Kangaroo emits the compiled vanilla
    decode."""
    from kangaroo_fast.backend import cpu, onednn
    from kangaroo_fast.config import DecodeSettings

    monkeypatch.setattr(cpu, "onednn_available", lambda: False)
    model = tiny_model("llama", 12, num_hidden_layers=3).to(torch.bfloat16)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=8), backend=WidenedProducts(),
                            dtype=torch.bfloat16)
    engine = km.engine
    prompt = random_prompt(model.config.vocab_size, 11, 1200)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=12)
    vanilla, _ = engine.generate(prompt, settings, set(), speculate=False)
    spec, stats = engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla
    steps = engine.steps.graphs
    assert {key[0] for key in steps} - {"head"} == {"shallow", "draft", "verify"}
    for key, step in steps.items():
        several = "T>1" in key or "B>1" in key
        assert step.options["freezing"] == (several and torch.backends.mkldnn.is_available()), key
    wide, _a = engine.weights.wide
    products = [getattr(w, name) for w in wide.layers for name in ("w_qkv", "w_o", "w_gate_up", "w_down")]
    keys = {(p.data_ptr(), tuple(p.shape), p.dtype, None) for p in products}
    assert keys <= set(onednn.OneDNNBackend._packed)  # the prefill's products (every layer's) packed them
    packs = onednn.OneDNNBackend.packs
    assert engine.generate(prompt, settings, set())[0] == vanilla
    assert onednn.OneDNNBackend.packs == packs  # and nothing is packed anew
    # a one-row product takes its row as a [1, K] view with a fresh tensor's strides: aten copies none first
    # (Inductor's own view has stride 0 on the size-1 dimension; ``InductorBackend.linear``)
    engine.steps.draft(torch.tensor([[5]]), [len(prompt)], 2)
    with torch.profiler.profile() as profile:
        engine.steps.draft(torch.tensor([[5]]), [len(prompt)], 2)
    names = [event.name for event in profile.events()]
    assert any(name.startswith("Torch-Compiled Region") for name in names) and "aten::clone" not in names


def test_compiled_step_guards_its_arguments_not_its_closure(monkeypatch):
    """A compiled step keeps the tensor guards on its own arguments (a new shape recompiles and computes right) and
    drops those on tensors its closure reaches (``graphs._kept_guards``); each step compiles its own code object, so
    steps of one function never walk each other's compiled entries."""
    import kangaroo_fast.graphs as graphs

    decisions, kept_guards = [], graphs._kept_guards

    def spy(entries, arguments):
        kept = kept_guards(entries, arguments)
        decisions.extend((e.guard_type, e.name, k) for e, k in zip(entries, kept))
        return kept

    monkeypatch.setattr(graphs, "_kept_guards", spy)
    scale = torch.full((3,), 2.0)
    fn = lambda x: (x * scale,)  # noqa: E731
    first, second = (CompiledStep(fn, [], "test", torch.float32) for _ in range(2))
    codes = [step.fn._torchdynamo_orig_callable.__code__ for step in (first, second)]
    assert codes[0] is not codes[1] and codes[0] is not fn.__code__
    x = torch.randn(2, 3)
    assert torch.equal(first(x=x)[0], x * 2)
    tensors = {name: kept for kind, name, kept in decisions if kind == "TENSOR_MATCH"}
    assert tensors == {"x": True, "scale": False}, tensors
    wider = torch.randn(4, 3)
    assert torch.equal(first(x=wider)[0], wider * 2)  # the guard on x failed, and the step compiled again
    assert torch.equal(second(x=x)[0], x * 2)


def test_a_step_refuses_caches_with_other_rows():
    """The caches' guards are dropped; the engine checks their active rows against the step's instead."""
    model = tiny_model("llama", 14, num_hidden_layers=2)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 1, seed=2), backend="inductor")
    km.engine._reset(1)
    tokens = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="a step of 2 rows on caches of 1 active rows"):
        km.engine.steps.shallow(tokens, [3, 3], 1, True)


def test_step_configuration_holds_only_while_it_compiles(monkeypatch):
    """A compiled step's configuration (its symbolic sources, no automatic dynamic shapes, Inductor's options) is
    set while Dynamo compiles one of its calls and restored at the compile's end (``graphs._on_compile_start``): a
    call leaves the process's configuration as it was, and the user's own compile between calls sees it."""
    import kangaroo_fast.graphs as graphs

    seen = []

    def record(_args):  # registered after the steps' callbacks, so it sees what they set
        seen.append((torch.compiler.config.dynamic_sources, torch._dynamo.config.automatic_dynamic_shapes,
                     torch._inductor.config.cpp_wrapper))

    def twice(x: torch.Tensor, end: int):
        return (x[:end] * 2,)

    step = CompiledStep(twice, [r".*\['end'\]"], "test")
    process = (torch.compiler.config.dynamic_sources, torch._dynamo.config.automatic_dynamic_shapes,
               torch._inductor.config.cpp_wrapper)
    graphs._install_compile_callbacks()  # as a step's call does: before the recording one
    torch._dynamo.callback_handler.register_start_callback(record)
    try:
        x = torch.arange(12.0)
        assert torch.equal(step(x=x, end=5)[0], x[:5] * 2)
        assert seen == [(step.dynamic, False, step.options["cpp_wrapper"])]
        writes = []
        for config in (torch.compiler.config, torch._dynamo.config, torch._inductor.config):
            monkeypatch.setattr(type(config), "__setattr__", lambda self, name, value: writes.append(name))
        assert torch.equal(step(x=x, end=9)[0], x[:9] * 2)  # no compile (end is symbolic): no configuration written
        monkeypatch.undo()
        assert writes == [] and len(seen) == 1
        assert (torch.compiler.config.dynamic_sources, torch._dynamo.config.automatic_dynamic_shapes,
                torch._inductor.config.cpp_wrapper) == process
        torch.compile(lambda x: x + 1)(x)  # not a step's: the process's configuration
        assert seen[1:] == [process]
        torch._dynamo.callback_handler.clear()  # as torch._dynamo.reset() does: a step's call puts its own back
        def thrice(x: torch.Tensor, end: int):  # code Dynamo has not seen (it remembers sizes by code)
            return (x[:end] * 3,)

        again, before = CompiledStep(thrice, [r".*\['end'\]"], "test"), counters["stats"]["unique_graphs"]
        for end in (7, 8):
            assert torch.equal(again(x=x, end=end)[0], x[:end] * 3)
        assert counters["stats"]["unique_graphs"] == before + 1  # end symbolic from the first compile
    finally:
        if record in torch._dynamo.callback_handler.start_callbacks:
            torch._dynamo.callback_handler.remove_start_callback(record)


@pytest.mark.parametrize("backend,graphs", [("torch", "eager"), ("inductor", "compile")])
def test_adapter_with_mlp_in_the_step_loops_matches_hf(case, backend, graphs):
    """An adapter with an MLP block drafts through the step loop (uncaptured graph steps, and compiled steps with
    its weights frozen in) and the output stays HF's greedy output; with threshold 0 it drafts every round."""
    model, prompts, refs, _ = case
    adapter = random_adapter(model, 2, seed=8, mlp_size=24, threshold=0.0, max_draft_steps=3)
    km = kangaroo_fast.load(model, adapter=adapter, backend=backend, graphs=graphs)
    for ids, ref in zip(prompts, refs):
        out = km.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert out.tokens == ref
        assert out.stats.draft_steps > 0

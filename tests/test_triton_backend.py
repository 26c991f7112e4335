"""The Triton backend against the reference backend: each seam op, then the whole Kangaroo decode.

Without a GPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1), so this compares the very
kernels the CUDA path launches with the oracle, on CPU, in float32.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import kangaroo_fast  # noqa: E402
from kangaroo_fast.backend import (TorchBackend, default_backend_name, get_backend,  # noqa: E402
                                   resolve_backend)
from kangaroo_fast.backend.triton_backend import TritonBackend  # noqa: E402
from kangaroo_fast.engine import Engine  # noqa: E402
from kangaroo_fast.models import pack_model  # noqa: E402

from conftest import (TOLERANCES, early_exit_adapter, hf_greedy, random_adapter, random_prompt,  # noqa: E402
                      tiny_model)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = TorchBackend()


@pytest.fixture(scope="module")
def triton_ops():
    return TritonBackend()


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def assert_close(actual, expected):
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---- each op of the seam -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 3])
def test_projection_ops_match_reference(triton_ops, t):
    h, inter = 45, 70
    x, g = randn(1, t, h, seed=1), 1 + randn(h, seed=2, scale=0.25)
    w, b = randn(30, h, seed=3, scale=0.2), randn(30, seed=4)
    assert_close(triton_ops.norm_linear(x, g, 1e-6, w, b), REF.norm_linear(x, g, 1e-6, w, b))
    residual = randn(1, t, 30, seed=5)
    assert_close(triton_ops.linear_residual(x, w, residual), REF.linear_residual(x, w, residual))
    w_gate_up, w_down = randn(2 * inter, h, seed=6, scale=0.2), randn(h, inter, seed=7, scale=0.2)
    assert_close(triton_ops.norm_mlp_residual(x, g, 1e-6, w_gate_up, w_down),
                 REF.norm_mlp_residual(x, g, 1e-6, w_gate_up, w_down))


@pytest.mark.parametrize("t,start", [(1, 0), (4, 9), (1, 19)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_ops_match_reference(triton_ops, t, start, window):
    h, num_heads, num_kv_heads, d, max_len = 40, 6, 2, 8, 20
    x, g = randn(1, t, h, seed=t), 1 + randn(h, seed=2, scale=0.25)
    w_qkv, b_qkv = randn((num_heads + 2 * num_kv_heads) * d, h, seed=3, scale=0.2), randn(80, seed=4)
    angles = torch.arange(max_len)[:, None] * 0.3 ** torch.arange(d // 2)[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DEVICE), torch.cat([angles.sin()] * 2, -1).to(DEVICE)
    caches = [randn(1, num_kv_heads, max_len, d, seed=s) for s in (5, 6)]
    ref_caches = [c.clone() for c in caches]
    q = triton_ops.qkv_rope_cache_write(x, g, 1e-6, w_qkv, b_qkv, cos, sin, *caches, start, num_heads, num_kv_heads)
    q_ref = REF.qkv_rope_cache_write(x, g, 1e-6, w_qkv, b_qkv, cos, sin, *ref_caches, start, num_heads,
                                     num_kv_heads)
    assert q.shape == q_ref.shape == (1, num_heads, t, d)
    assert_close(q, q_ref)
    for cache, ref in zip(caches, ref_caches):
        assert_close(cache, ref)
    assert_close(triton_ops.attention(q, *caches, start, window), REF.attention(q_ref, *ref_caches, start, window))


@pytest.mark.parametrize("mapped", [False, True])
def test_head_ops_match_reference(triton_ops, mapped):
    h, vocab = 40, 150
    x, g, head = randn(2, h, seed=1), 1 + randn(h, seed=2, scale=0.25), randn(vocab, h, seed=3, scale=0.5)
    vocab_map = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:vocab].to(DEVICE) if mapped else None
    token, prob, keep = triton_ops.draft_propose(x, g, 1e-6, head, vocab_map, 0.3)
    ref_token, ref_prob, ref_keep = REF.draft_propose(x, g, 1e-6, head, vocab_map, 0.3)
    assert torch.equal(token, ref_token)
    assert_close(prob, ref_prob)
    assert torch.equal(keep, ref_keep)
    index, prob = triton_ops.draft_head(x, g, 1e-6, head)
    ref_index, ref_prob = REF.draft_head(x, g, 1e-6, head)
    assert torch.equal(index, ref_index)
    assert_close(prob, ref_prob)

    states = randn(2, 4, h, seed=4)
    targets = REF.verify_head(states, g, 1e-6, head)
    assert torch.equal(triton_ops.verify_head(states, g, 1e-6, head), targets)
    drafts = targets[:, :3].clone()
    drafts[1, 1] += 1  # sequence 0 accepts all three drafts, sequence 1 only the first
    got = triton_ops.verify_accept(states, g, 1e-6, head, drafts)
    expected = REF.verify_accept(states, g, 1e-6, head, drafts)
    assert expected[1].tolist() == [3, 1]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# ---- the whole decode --------------------------------------------------------------------------------------------
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def decode_cases():
    """Per kind: the HF model, two prompts and HF's greedy outputs."""
    cases = {}
    for kind, seed in (("llama", 11), ("qwen2", 37)):
        model = tiny_model(kind, seed)
        prompts = [random_prompt(model.config.vocab_size, n, seed * 100 + n) for n in (1, 9)]
        cases[kind] = (model, prompts, [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts])
    return cases


@pytest.mark.parametrize("kind,exit_layer,adapter_kind", [("llama", 1, "random"), ("llama", 2, "early_exit"),
                                                          ("qwen2", 2, "random"), ("qwen2", 3, "early_exit")])
def test_triton_decode_token_identical_to_reference(decode_cases, kind, exit_layer, adapter_kind):
    model, prompts, refs = decode_cases[kind]
    make = random_adapter if adapter_kind == "random" else early_exit_adapter
    adapter = make(model, exit_layer, seed=exit_layer + 5)
    reference = kangaroo_fast.load(model, adapter=adapter, backend="torch", device=DEVICE)
    fused = kangaroo_fast.load(model, adapter=adapter, backend="triton", device=DEVICE)
    assert isinstance(fused.engine.ops, TritonBackend)
    drafted = accepted = 0
    for threshold, prompt in ((0.0, 0), (1.0, 0), (0.5, 1)):
        for ids, ref in zip(prompts[prompt:prompt + 1], refs[prompt:prompt + 1]):
            settings = dict(max_new_tokens=NEW_TOKENS, threshold=threshold, max_draft_steps=3)
            expected = reference.generate(ids, **settings)
            out = fused.generate(ids, **settings)
            assert out.tokens == expected.tokens == ref, (threshold, ids.shape[1])
            assert out.stats.drafted_at == expected.stats.drafted_at
            assert out.stats.accepted_at == expected.stats.accepted_at
            drafted += out.stats.draft_steps
            accepted += sum(out.stats.accepted_at)
            if threshold == 1.0:  # every proposal is below the threshold: one draft per round at most
                assert out.stats.draft_steps <= out.stats.rounds
    assert drafted > 0
    if adapter_kind == "early_exit":  # the verify path's accept branch is exercised, not only rejections
        assert accepted > 0


def test_triton_sliding_window_decode_matches_hf():
    """Mistral with a 9-token window over a 23-token prompt: the kernels' window mask decides the output."""
    model = tiny_model("mistral", 41, sliding_window=9)
    ids = random_prompt(model.config.vocab_size, 23, 5)
    ref = hf_greedy(model, ids, 12, eos_token_id=-1)
    fused = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 3, seed=1), backend="triton", device=DEVICE)
    assert fused.generate(ids, max_new_tokens=12, threshold=0.3, max_draft_steps=4, eos_token_id=[]).tokens == ref


@pytest.mark.parametrize("graphs", [False, "eager"])
def test_triton_decode_with_context_lookup_matches_hf(graphs):
    """Copied spans through the fused kernels (several tokens per draft forward in the plain loop, one per step in
    the graph loop), one sequence and a batch of two."""
    model = tiny_model("llama", 13, vocab_size=24)
    part = random_prompt(24, 7, 2)
    prompts = [torch.cat([part, part, part[:, :3]], dim=1), random_prompt(24, 5, 3)]
    refs = [hf_greedy(model, ids, 16, eos_token_id=-1) for ids in prompts]  # no EOS: 16 tokens each
    fused = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=4), backend="triton", device=DEVICE,
                               graphs=graphs if DEVICE == "cpu" else None)
    one = fused.generate(prompts[0], max_new_tokens=16, threshold=0.3, max_draft_steps=4, lookup=3, eos_token_id=[])
    assert one.tokens == refs[0] and one.stats.lookup_drafts > 0
    both = fused.generate([p[0] for p in prompts], max_new_tokens=16, threshold=0.3, max_draft_steps=4, lookup=3,
                          eos_token_id=[])
    assert [out.tokens for out in both] == refs


def test_triton_vanilla_decode_matches_hf(decode_cases):
    model, prompts, refs = decode_cases["qwen2"]
    fused = kangaroo_fast.load(model, backend="triton", device=DEVICE)
    for ids, ref in zip(prompts, refs):
        assert fused.generate(ids, max_new_tokens=NEW_TOKENS, speculate=False).tokens == ref


# ---- backend choice ----------------------------------------------------------------------------------------------
def test_kangaroo_fast_imports_and_decodes_without_triton():
    """triton is an optional extra: without it the package imports, CPU keeps its default (onednn, or torch where
    this torch has no packed linear), CUDA falls back to torch, and asking for triton says what to install."""
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch, kangaroo_fast
from kangaroo_fast.backend import default_backend_name, get_backend, resolve_backend
from kangaroo_fast.backend.cpu import onednn_available
cpu = "onednn" if onednn_available() else "torch"
assert default_backend_name("cuda") == "torch" and default_backend_name("cpu") == cpu
assert resolve_backend(None, "cpu").name == cpu
try:
    get_backend("triton")
except ImportError as error:
    assert "pip install 'kangaroo_fast[triton]'" in str(error), error
else:
    raise AssertionError("get_backend('triton') worked without triton")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_backend_choice_follows_the_device():
    from kangaroo_fast.backend.cpu import onednn_available
    from kangaroo_fast.backend.onednn import OneDNNBackend

    cpu_default = "onednn" if onednn_available() else "torch"
    assert default_backend_name("cpu") == cpu_default
    assert default_backend_name(torch.device("cuda", 0)) == "triton"
    assert isinstance(resolve_backend(None, "cpu"), TorchBackend)
    assert isinstance(resolve_backend(None, "cpu"), OneDNNBackend) == onednn_available()
    assert not isinstance(resolve_backend(None, "cpu"), TritonBackend)
    assert isinstance(get_backend("triton"), TritonBackend)
    ops = TorchBackend()
    assert resolve_backend(ops, "cpu") is ops


def test_engine_on_cpu_defaults_to_the_reference_maths():
    """On CPU the default is the reference, or its oneDNN subclass (same maths; bf16 products on packed weights)."""
    from kangaroo_fast.backend import default_backend_name

    model = tiny_model("llama", 3)
    engine = Engine(pack_model(model), None, 32)
    assert isinstance(engine.ops, TorchBackend) and not isinstance(engine.ops, TritonBackend)
    assert kangaroo_fast.load(model).engine.ops.name == default_backend_name("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_uses_triton_and_matches_hf():
    model = tiny_model("llama", 11)
    ids = random_prompt(model.config.vocab_size, 9, 1109)
    ref = hf_greedy(model, ids, NEW_TOKENS)
    km = kangaroo_fast.load(model.to("cuda"), adapter=early_exit_adapter(model, 2), dtype=torch.float32)
    assert isinstance(km.engine.ops, TritonBackend)
    assert km.generate(ids, max_new_tokens=NEW_TOKENS, threshold=0.3).tokens == ref


@pytest.mark.parametrize("speculate", [True, False])
def test_triton_graph_loop_matches_hf(decode_cases, speculate):
    """The decode steps the CUDA path captures, run on the fused kernels through the graph loop: replayed eagerly
    under the interpreter on CPU, captured and replayed on a GPU."""
    model, prompts, refs = decode_cases["llama"]
    graphs = "eager" if DEVICE == "cpu" else True
    fused = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2, seed=3), backend="triton", device=DEVICE,
                               graphs=graphs)
    out = fused.generate(prompts[1], max_new_tokens=NEW_TOKENS, threshold=0.3, max_draft_steps=3,
                         speculate=speculate)
    assert out.tokens == refs[1]
    steps = fused.engine.steps
    assert steps.replays > 0 and steps.capture == (DEVICE != "cpu")

"""Compiled decode steps on CPU (the inductor backend, ``graphs="compile"``): token-identical to HF greedy in
float32, alone and in batches whose rows finish apart, sampling equal to the same backend run eagerly, and one
compile per kind of step however the context, the verification length and the batch change."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import kangaroo_fast
from kangaroo_fast.backend import default_backend_name
from kangaroo_fast.backend.inductor import InductorBackend, cpp_compiler_available
from kangaroo_fast.backend.onednn import onednn_available
from kangaroo_fast.graphs import CompiledStep

from conftest import hf_greedy, random_adapter, random_prompt, tiny_model

pytestmark = pytest.mark.skipif(not (onednn_available() and cpp_compiler_available()),
                                reason="the inductor backend needs oneDNN's packed linear and a C++ compiler")

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
    assert kinds == {"shallow", "head", "verify"}
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
    """Every call after the steps' first ones reuses them: new contexts, verification lengths and batch sizes
    compile nothing (Dynamo's count of graphs moves only with the kinds of step)."""
    model, prompts, _refs, km = case
    kwargs = dict(max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=5, eos_token_id=[])
    km.generate(prompts[:2], **kwargs)
    km.generate(prompts[0], **kwargs)
    before, kinds = counters["stats"]["unique_graphs"], len(km.engine.steps.graphs)
    longer = torch.cat([prompts[2], prompts[1]], dim=1)  # another context length
    km.generate(longer, **kwargs)
    km.generate([longer[0], prompts[0][0], prompts[1][0]], **kwargs)  # three rows, then fewer
    km.generate(prompts[1], speculate=False, max_new_tokens=NEW_TOKENS + 9, eos_token_id=[])
    assert counters["stats"]["unique_graphs"] - before == len(km.engine.steps.graphs) - kinds
    assert len(km.engine.steps.graphs) <= 2 * 2 * 3  # (batch of one or more) x (T of one or more) x kinds


def test_compiled_sampling_equals_eager(case):
    model, prompts, _refs, km = case
    eager = kangaroo_fast.load(model, adapter=km.adapter, backend="inductor", graphs=False)
    assert eager.engine.steps.mode == "plain"
    for ids in prompts[1:]:
        kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=20, seed=3, eos_token_id=[])
        assert km.generate(ids, **kwargs).tokens == eager.generate(ids, **kwargs).tokens


def test_compile_mode_needs_the_inductor_backend():
    model = tiny_model("llama", 12)
    with pytest.raises(ValueError, match="graphs='compile' needs the inductor backend, not the torch backend"):
        kangaroo_fast.load(model, backend="torch", graphs="compile")


def test_default_cpu_backend_compiles_bfloat16_only():
    assert default_backend_name("cpu", torch.bfloat16) == "inductor"
    assert default_backend_name("cpu", torch.float32) == "onednn"
    assert default_backend_name("cpu") == "onednn"

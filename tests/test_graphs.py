"""The graph decode loop: its static-buffer discipline replayed eagerly on CPU against HF and the plain loop, and
real CUDA-graph capture and replay where a CUDA device exists."""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.config import DecodeSettings
from kangaroo_fast.graphs import DecodeSteps, StepGraph

from conftest import early_exit_adapter, hf_greedy, make_layers_identity, random_adapter, random_prompt, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_capture_refuses_the_reference_backend():
    model = tiny_model("llama", 3)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="torch")
    with pytest.raises(ValueError, match="CUDA graphs run on the triton backend, not TorchBackend"):
        DecodeSteps(km.engine, "cuda")
    with pytest.raises(ValueError, match="graphs=True needs the triton backend on a CUDA device, not the torch "
                                         "backend on cpu"):
        kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="torch", graphs=True)
    with pytest.raises(ValueError, match="graphs='always' must be None, True, False, 'eager' or 'compile'"):
        kangaroo_fast.load(model, backend="torch", graphs="always")


def test_graphs_default_off_on_cpu():
    model = tiny_model("llama", 3)
    assert kangaroo_fast.load(model, backend="torch").engine.graph_mode == "off"


def test_step_graph_refuses_cpu_inputs_for_capture():
    with pytest.raises(ValueError, match="static input 'token' is on cpu"):
        StepGraph(lambda token: (token,), {"token": torch.zeros(1, 1, dtype=torch.int64)})


def test_eager_step_graph_copies_into_static_inputs_and_checks_shapes():
    static = {"x": torch.zeros(2, 3)}
    graph = StepGraph(lambda x: (x * 2,), static, capture=False)
    new = torch.randn(2, 3)
    (out,) = graph(x=new)
    assert torch.equal(static["x"], new) and torch.equal(out, new * 2) and graph.replays == 1
    with pytest.raises(ValueError, match=r"input 'x' has shape \(1, 3\), the graph was captured for \(2, 3\)"):
        graph(x=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"replay needs inputs \['x'\], got \['y'\]"):
        graph(y=new)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("threshold,steps", [(0.0, 3), (0.4, 6), (1.0, 2)])
def test_eager_graph_loop_matches_hf_and_plain_loop(kind, threshold, steps):
    model = tiny_model(kind, 21)
    adapter = early_exit_adapter(model, 2)
    graphed = kangaroo_fast.load(model, adapter=adapter, backend="torch", dtype=torch.float32, graphs="eager")
    plain = kangaroo_fast.load(model, adapter=adapter, backend="torch", dtype=torch.float32, graphs=False)
    for seed, length in ((1, 1), (2, 7), (3, 23)):
        prompt = random_prompt(model.config.vocab_size, length, seed)
        settings = DecodeSettings(exit_layer=2, threshold=threshold, max_draft_steps=steps, max_new_tokens=20)
        tokens, stats = graphed.engine.generate(prompt, settings, set())
        plain_tokens, plain_stats = plain.engine.generate(prompt, settings, set())
        assert tokens == hf_greedy(model, prompt, 20, eos_token_id=None)
        assert (tokens, stats.rounds, stats.drafted_at, stats.accepted_at) == (
            plain_tokens, plain_stats.rounds, plain_stats.drafted_at, plain_stats.accepted_at)
    steps = graphed.engine.steps
    assert steps.replays > 0 and {key[0] for key in steps.graphs} == {"shallow", "draft", "verify"}
    assert plain.engine.steps.mode == "plain" and not plain.engine.steps.graphs


def test_eager_graph_loop_counts_one_sync_per_draft_and_per_verify():
    model = tiny_model("llama", 5)
    make_layers_identity(model, 2)  # every draft accepted: rounds run all their draft steps
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="torch", dtype=torch.float32,
                            graphs="eager")
    prompt = random_prompt(model.config.vocab_size, 9, 4)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=4, max_new_tokens=26)
    tokens, stats = km.engine.generate(prompt, settings, set())
    assert tokens == hf_greedy(model, prompt, 26, eos_token_id=None)
    steps = km.engine.steps
    verifies = sum(g.replays for key, g in steps.graphs.items() if key[0] == "verify")
    assert verifies == stats.rounds
    # every round: k proposals, each one draft step (the input before it through the shallow layers and the
    # head; one sync each), plus one shallow step for the last draft's own state, then one verification (one sync)
    assert steps.graphs[("draft", 1, 1, 2)].replays == stats.draft_steps
    assert steps.graphs[("shallow", 1, 1, 2, True)].replays == stats.rounds
    assert ("head", 1) not in steps.graphs
    assert steps.syncs == stats.draft_steps + stats.rounds
    assert stats.mean_accepted == 5.0  # all 4 drafts and the bonus, every round (25 tokens after the first)


def test_eager_graph_loop_batch_and_vanilla_match_hf():
    model = tiny_model("qwen2", 8)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 1), backend="torch", dtype=torch.float32,
                            graphs="eager")
    prompts = [random_prompt(model.config.vocab_size, n, n)[0] for n in (3, 11, 6)]
    settings = DecodeSettings(exit_layer=1, threshold=0.2, max_draft_steps=3, max_new_tokens=15)
    for speculate in (True, False):
        outs = km.engine.generate_batch(prompts, settings, set(), speculate=speculate)
        for p, (tokens, _) in zip(prompts, outs):
            assert tokens == hf_greedy(model, p[None], 15, eos_token_id=None)
    # vanilla is the verify step from layer 0 on the embedded newest token, for each batch size that ran
    vanilla = {key: g for key, g in km.engine.steps.graphs.items() if key[-1] == 0}
    assert set(vanilla) <= {("verify", b, 1, 0) for b in (1, 2, 3)} and sum(g.replays for g in vanilla.values())


@needs_cuda
def test_cuda_graph_replay_matches_eager_steps():
    model = tiny_model("llama", 11).to("cuda")
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), dtype=torch.float32)
    engine = km.engine
    assert engine.graph_mode == "cuda"
    prompt = random_prompt(model.config.vocab_size, 9, 5).to("cuda")
    steps = DecodeSteps(engine, "cuda")
    for position in (9, 10, 14):  # one graph serves every position
        engine.cache.reset(1)
        engine.adapter_cache.reset(1)
        x = engine.prefill(prompt, [9], 2)
        token = engine._targets(x)
        pos = torch.tensor([position], device="cuda")
        h, out = (t.clone() for t in steps.shallow(token, [position], 2, True))
        eager = steps._shallow(token, pos, 2, True)
        torch.testing.assert_close(h, eager[0])
        torch.testing.assert_close(out, eager[1])
        draft, prob = (t.clone() for t in steps.head(out[:, -1]))
        eager_draft, eager_prob = steps._head(out[:, -1])
        assert torch.equal(draft, eager_draft)
        torch.testing.assert_close(prob, eager_prob)
        step = [t.clone() for t in steps.draft(token, [position], 2)]  # the same inputs: one step
        for a, b in zip(step, (h, out, draft, prob)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        states = torch.cat([h, h], dim=1)
        drafts = draft[:, None]
        replayed = [t.clone() for t in steps.verify(states, drafts, [position], 2)]
        for a, b in zip(replayed, steps._verify(states, drafts, pos, 2)):
            assert torch.equal(a, b)
    assert set(steps.graphs) == {("shallow", 1, 1, 2, True), ("head", 1), ("draft", 1, 1, 2),
                                ("verify", 1, 2, 2)}


@needs_cuda
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_cuda_graph_decode_matches_hf_and_the_reference(threshold):
    model = tiny_model("llama", 12).to("cuda")
    adapter = early_exit_adapter(model, 2)
    km = kangaroo_fast.load(model, adapter=adapter, dtype=torch.float32)
    reference = kangaroo_fast.load(model, adapter=adapter, dtype=torch.float32, backend="torch")
    assert km.engine.graph_mode == "cuda" and reference.engine.graph_mode == "off"
    settings = DecodeSettings(exit_layer=2, threshold=threshold, max_draft_steps=4, max_new_tokens=24)
    for seed, length in ((1, 3), (2, 17)):
        prompt = random_prompt(model.config.vocab_size, length, seed).to("cuda")
        tokens, stats = km.engine.generate(prompt, settings, set())
        assert tokens == reference.engine.generate(prompt, settings, set())[0]
        assert tokens == hf_greedy(model, prompt, 24, eos_token_id=None)
    steps = km.engine.steps
    assert all(g.graph is not None for g in steps.graphs.values())  # captured, not eager
    assert steps.replays > 0


def test_draft_step_is_the_shallow_step_then_the_head():
    """``DecodeSteps.draft`` (one step) gives what the shallow step and the head step give one after the other, on
    the same inputs (exactly: the same ops), and takes one new token per row only."""
    model = tiny_model("llama", 6)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=4), backend="torch", dtype=torch.float32)
    engine = km.engine
    steps = DecodeSteps(engine, "eager")
    prompt = random_prompt(model.config.vocab_size, 11, 6)
    for position in (11, 12):
        engine._reset(1)
        token = engine._targets(engine.prefill(prompt, [11], 2))
        h, out = (t.clone() for t in steps.shallow(token, [position], 2, True))
        draft, prob = (t.clone() for t in steps.head(out[:, -1]))
        for a, b in zip(steps.draft(token, [position], 2), (h, out, draft, prob)):
            assert torch.equal(a, b)
    assert ("draft", 1, 1, 2) in steps.graphs
    with pytest.raises(ValueError, match="a draft step runs one new token per row, not 2"):
        steps.draft(torch.cat([token, token], 1), [11], 2)

"""CUDA-graph capture and replay of the draft and verify steps (the replay checks need a CUDA device)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kangaroo_fast  # noqa: E402
from kangaroo_fast.graphs import DecodeGraphs, StepGraph  # noqa: E402

from conftest import early_exit_adapter, random_prompt, tiny_model  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphs_refuse_the_reference_backend():
    model = tiny_model("llama", 3)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="torch")
    with pytest.raises(ValueError, match="CUDA graphs run on the triton backend, not TorchBackend"):
        DecodeGraphs(km.engine, 2, 0.5)


def test_step_graph_refuses_cpu_inputs():
    with pytest.raises(ValueError, match="static input 'token' is on cpu"):
        StepGraph(lambda token: (token,), {"token": torch.zeros(1, 1, dtype=torch.int64)})


@needs_cuda
def test_graph_replay_matches_eager_steps():
    model = tiny_model("llama", 11).to("cuda")
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), dtype=torch.float32)
    engine = km.engine
    prompt = random_prompt(model.config.vocab_size, 9, 5).to("cuda")
    graphs = DecodeGraphs(engine, 2, 0.3)
    for position in (9, 10, 14):  # one graph serves every position
        engine.cache.reset()
        engine.adapter_cache.reset()
        last = engine.prefill(prompt, 2)
        token = torch.tensor([[last]], device="cuda")
        pos = torch.tensor([position], device="cuda")
        h, draft, prob, keep = (t.clone() for t in graphs.draft_step(token, pos))
        eager = graphs._draft(token, pos)
        torch.testing.assert_close(h, eager[0])
        assert torch.equal(draft, eager[1]) and torch.equal(keep, eager[3])
        torch.testing.assert_close(prob, eager[2])
        states = torch.cat([h, h], dim=1)
        drafts = draft[:, None]
        replayed = [t.clone() for t in graphs.verify_step(states, drafts, pos)]
        for a, b in zip(replayed, graphs._verify(states, drafts, pos)):
            assert torch.equal(a, b)
    assert set(graphs.graphs) == {("draft", 1), ("verify", 1, 2)}

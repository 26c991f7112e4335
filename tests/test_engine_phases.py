"""Unit tests of the engine's phases, the static cache, the statistics and the adapter's step-by-step maths."""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.backend import TorchBackend, get_backend
from kangaroo_fast.cache import StaticKVCache
from kangaroo_fast.drafting import AdapterDrafter
from kangaroo_fast.engine import GenerationStats, RoundDrafts

from conftest import early_exit_adapter, random_adapter, random_prompt, tiny_model


def host_accept(drafts: list[int], targets: list[int]) -> int:
    """The acceptance rule on the host, the oracle for the device's: the longest prefix of drafts equal to the
    targets before them."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted


# ---- accept --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drafts,targets,expected", [
    ([5, 9, 2], [5, 9, 2, 7], 3),        # all match
    ([4, 9, 2], [5, 9, 2, 7], 0),        # first differs (later ones equal: still 0)
    ([5, 9, 3, 8], [5, 9, 2, 8, 1], 2),  # partial
    ([5, 1, 2], [5, 9, 2, 7], 1),        # a later match after a mismatch does not count
    ([], [6], 0),                        # no drafts
    ([13], [13, 0], 1),
    ([13], [12, 0], 0),
])
def test_engine_accept(drafts, targets, expected):
    assert host_accept(drafts, targets) == expected


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_engine_accept_random_matches_brute_force(k):
    gen = torch.Generator().manual_seed(100 + k)
    for _ in range(25):
        targets = torch.randint(0, 3, (k + 1,), generator=gen).tolist()
        drafts = [t if torch.rand((), generator=gen) < 0.7 else t + 1 for t in targets[:k]]
        expected = next((i for i in range(k) if drafts[i] != targets[i]), k)
        assert host_accept(drafts, targets) == expected


def test_torch_backend_accept():
    drafts = torch.tensor([[5, 9, 2], [4, 9, 2], [5, 9, 3], [5, 1, 2], [7, 7, 7]])
    targets = torch.tensor([[5, 9, 2, 7], [5, 9, 2, 7], [5, 9, 2, 7], [5, 9, 2, 7], [7, 7, 7, 7]])
    got = TorchBackend.accept(drafts, targets)
    assert got.dtype == torch.int64
    assert got.tolist() == [3, 0, 2, 1, 3]
    empty = TorchBackend.accept(torch.zeros(2, 0, dtype=torch.int64), torch.tensor([[3], [4]]))
    assert empty.tolist() == [0, 0]


def test_torch_backend_accept_agrees_with_engine_accept():
    gen = torch.Generator().manual_seed(7)
    b, k = 13, 5
    targets = torch.randint(0, 4, (b, k + 1), generator=gen)
    noise = (torch.rand(b, k, generator=gen) < 0.3).to(torch.int64)
    drafts = targets[:, :k] + noise
    got = TorchBackend.accept(drafts, targets).tolist()
    assert got == [host_accept(d, t) for d, t in zip(drafts.tolist(), targets.tolist())]
    assert len(set(got)) > 1


def test_get_backend():
    assert isinstance(get_backend("torch"), TorchBackend)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        get_backend("nope")


# ---- the static cache ------------------------------------------------------------------------------------------
def test_static_kv_cache_shapes():
    cache = StaticKVCache(5, 2, 3, 37, 12, torch.float32, "cpu")
    assert cache.k.shape == cache.v.shape == (5, 2, 3, 37, 12)
    assert cache.max_len == 37
    assert cache.lengths.tolist() == [0, 0]
    k, v = cache.layer(3)
    assert k.shape == (2, 3, 37, 12)
    assert k.data_ptr() == cache.k[3].data_ptr() and v.data_ptr() == cache.v[3].data_ptr()
    cache.lengths.fill_(9)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="max_len=0 must be >= 1"):
        StaticKVCache(1, 1, 1, 0, 4, torch.float32, "cpu")


def test_engine_cache_shapes():
    model = tiny_model("qwen2", 3)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=4), max_cache_len=53)
    c = km.config
    assert km.engine.cache.k.shape == (c.num_layers, 1, c.num_kv_heads, 53, c.head_dim)
    assert km.engine.adapter_cache.k.shape == (1, 1, c.num_kv_heads, 53, c.head_dim)
    assert km.engine.cache.k.dtype == torch.float32


def test_cache_never_reallocated():
    model = tiny_model("mistral", 5)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=6), max_cache_len=90)
    eng = km.engine
    ptrs = (eng.cache.k.data_ptr(), eng.cache.v.data_ptr(), eng.adapter_cache.k.data_ptr(),
            eng.adapter_cache.v.data_ptr())
    seen = []

    def check(_new):
        seen.append((eng.cache.k.data_ptr(), eng.cache.v.data_ptr(), eng.adapter_cache.k.data_ptr(),
                     eng.adapter_cache.v.data_ptr()))

    before = eng.cache.k.clone()
    out = km.generate(random_prompt(model.config.vocab_size, 11, 7), max_new_tokens=40, threshold=0.0,
                      max_draft_steps=4, callback=check, eos_token_id=[])
    assert sum(out.stats.accepted_at) < out.stats.draft_steps  # drafts were rejected
    assert len(seen) == out.stats.rounds + 1
    assert all(s == ptrs for s in seen)
    assert not torch.equal(before, eng.cache.k)  # it was written in place
    km.generate(random_prompt(model.config.vocab_size, 4, 8), max_new_tokens=9, speculate=False)
    assert (eng.cache.k.data_ptr(), eng.cache.v.data_ptr()) == ptrs[:2]


# ---- statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,threshold,steps", [("llama", 0.0, 3), ("mistral", 0.6, 6), ("qwen2", 1.0, 2),
                                                   ("qwen2", 0.0, 5)])
def test_stats_consistency(kind, threshold, steps):
    model = tiny_model(kind, 9)
    adapter = early_exit_adapter(model, model.config.num_hidden_layers - 1, seed=10)
    km = kangaroo_fast.load(model, adapter=adapter)
    ids = random_prompt(model.config.vocab_size, 13, 11)
    emitted: list[list[int]] = []
    out = km.generate(ids, max_new_tokens=33, threshold=threshold, max_draft_steps=steps, callback=emitted.append,
                      eos_token_id=[])
    s = out.stats
    assert sum(len(e) for e in emitted) == s.new_tokens == len(out.tokens) == 33
    assert len(emitted) == s.rounds + 1  # the prefill token, then one batch per round
    assert all(1 <= len(e) <= steps + 1 for e in emitted[1:])
    assert s.rounds >= 1
    assert s.prompt_tokens == 13
    assert s.stop_reason == "max_new_tokens"
    assert s.mode == "kangaroo" and s.dtype == "float32" and s.device == "cpu"
    assert s.mean_accepted == pytest.approx((s.new_tokens - 1) / s.rounds)
    assert 1.0 <= s.mean_accepted <= steps + 1
    assert len(s.acceptance_rate) == len(s.drafted_at) == len(s.accepted_at) <= steps
    assert all(0.0 <= r <= 1.0 for r in s.acceptance_rate)
    assert all(0 <= a <= d for a, d in zip(s.accepted_at, s.drafted_at))
    assert list(s.drafted_at) == sorted(s.drafted_at, reverse=True)  # position j+1 drafted only after j
    assert list(s.accepted_at) == sorted(s.accepted_at, reverse=True)
    assert sum(s.drafted_at) == s.draft_steps
    assert s.drafted_at[0] <= s.rounds
    # every round emits its accepted drafts plus one token
    assert sum(s.accepted_at) + s.rounds == s.new_tokens - 1
    if threshold == 1.0:
        assert len(s.drafted_at) >= 1
    d = s.as_dict()
    assert d["new_tokens"] == 33 and d["rounds"] == s.rounds and d["acceptance_rate"] == s.acceptance_rate
    assert s.time_s == pytest.approx(s.prefill_s + s.decode_s) and s.time_s > 0 and s.tokens_per_s > 0


def test_stats_properties_by_hand():
    s = GenerationStats(new_tokens=11, rounds=4, drafted_at=[4, 3, 1], accepted_at=[3, 2, 0])
    assert s.new_tokens_after_prefill == 10
    assert s.mean_accepted == 2.5
    assert s.acceptance_rate == [0.75, 2 / 3, 0.0]
    assert GenerationStats().mean_accepted == 0.0
    assert GenerationStats(new_tokens=0).new_tokens_after_prefill == 0
    assert GenerationStats(drafted_at=[0], accepted_at=[0]).acceptance_rate == [0.0]
    assert GenerationStats().tokens_per_s == 0.0


def test_vanilla_stats():
    model = tiny_model("llama", 12)
    km = kangaroo_fast.load(model)
    out = km.generate(random_prompt(model.config.vocab_size, 3, 13), max_new_tokens=14, speculate=False,
                      eos_token_id=[])
    s = out.stats
    assert s.mode == "vanilla" and s.rounds == 13 and s.mean_accepted == 1.0
    assert s.draft_steps == 0 and s.acceptance_rate == [] and s.stop_reason == "max_new_tokens"


# ---- phases by hand --------------------------------------------------------------------------------------------
def test_phases_by_hand_reproduce_generate():
    """prefill -> draft -> verify -> accept -> commit, driven by hand, gives generate's tokens."""
    model = tiny_model("qwen2", 14)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 4, seed=15))
    ids = random_prompt(model.config.vocab_size, 9, 16)
    settings = kangaroo_fast.DecodeSettings(exit_layer=4, threshold=0.0, max_draft_steps=3, max_new_tokens=25)
    expected = km.generate(ids, max_new_tokens=25, exit_layer=4, threshold=0.0, max_draft_steps=3,
                           eos_token_id=[]).tokens
    eng = km.engine
    eng.cache.reset()
    eng.adapter_cache.reset()
    drafter = AdapterDrafter()
    with torch.no_grad():
        last = eng._next_tokens(eng.prefill(ids, [9], exit_layer=4), settings, None)
        assert eng.cache.lengths.tolist() == [9]
        drafter.begin([ids[0].tolist() + last], 0.0)
        tokens, pos = list(last), [9]
        partial = False
        while len(tokens) < 25:
            budget = min(3, 25 - len(tokens) - 1)
            rnd = RoundDrafts.start(last, pos, [budget])
            eng.draft(rnd, drafter, [0], settings, set())
            (drafts,) = rnd.tokens
            assert len(drafts) == budget == rnd.ran[0] - 1  # threshold 0: the full budget, every input ran
            (new,) = eng.verify(rnd, 4, settings)
            targets = eng._targets(eng._layers(eng.shallow_states[:1, :budget + 1], 9 + len(tokens) - 1, 4,
                                               km.config.num_layers))[0].tolist()
            accepted = host_accept(drafts, targets)
            assert new == drafts[:accepted] + [targets[accepted]]  # the device's acceptance, checked on the host
            partial |= 0 < accepted < len(drafts)
            pos = eng.commit(pos, [accepted + 1])
            assert eng.cache.lengths.tolist() == pos == eng.adapter_cache.lengths.tolist()
            tokens.extend(new)
            last = [new[-1]]
    assert tokens == expected
    assert pos == [9 + len(tokens) - 1]
    assert partial


@pytest.mark.parametrize("kind,exit_layer,length", [("llama", 1, 17), ("mistral", 3, 29), ("qwen2", 2, 1)])
def test_adapter_forward_equals_engine_steps(kind, exit_layer, length):
    """Adapter.forward over a whole sequence == the engine's adapter run one position at a time (then normed)."""
    model = tiny_model(kind, 20)
    adapter = random_adapter(model, exit_layer, seed=21)
    km = kangaroo_fast.load(model, adapter=adapter)
    eng = km.engine
    c = km.config
    gen = torch.Generator().manual_seed(22)
    hidden = torch.randn(1, length, c.hidden_size, generator=gen) * 2.0
    with torch.no_grad():
        whole = adapter(hidden, km.packed.rope_cos[:length], km.packed.rope_sin[:length])
        eng.adapter_cache.reset()
        steps = []
        for i in range(length):
            out = eng._adapter(hidden[:, i:i + 1], i)
            steps.append(TorchBackend.rms_norm(out, eng.a.norm, c.rms_norm_eps))
        stepwise = torch.cat(steps, dim=1)
        # and the engine's adapter over the whole sequence at once (the prefill path)
        eng.adapter_cache.reset()
        prefill = TorchBackend.rms_norm(eng._adapter(hidden, 0), eng.a.norm, c.rms_norm_eps)
    assert whole.shape == (1, length, c.hidden_size)
    torch.testing.assert_close(stepwise, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill, whole, atol=1e-5, rtol=1e-5)
    # the draft proposals from either agree
    head = adapter.head_weight(km.packed.lm_head)
    assert torch.equal((whole @ head.T).argmax(-1), (stepwise @ head.T).argmax(-1))


def test_adapter_forward_on_real_shallow_states():
    """Through the model's own layer-l states (prefill path) the engine's adapter equals Adapter.forward."""
    model = tiny_model("llama", 30)
    adapter = random_adapter(model, 2, seed=31)
    km = kangaroo_fast.load(model, adapter=adapter)
    ids = random_prompt(model.config.vocab_size, 19, 32)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[2]
        whole = adapter(hs, km.packed.rope_cos[:19], km.packed.rope_sin[:19])
        eng = km.engine
        eng.cache.reset()
        eng.adapter_cache.reset()
        h = eng._layers(eng.ops.embed(ids, eng.w.embed), 0, 0, 2)
        torch.testing.assert_close(h, hs, atol=1e-5, rtol=1e-5)
        stepwise = torch.cat([TorchBackend.rms_norm(eng._adapter(h[:, i:i + 1], i), eng.a.norm, km.config.rms_norm_eps)
                              for i in range(19)], dim=1)
    torch.testing.assert_close(stepwise, whole, atol=1e-5, rtol=1e-5)


def test_draft_buffer_grows_for_more_steps():
    model = tiny_model("llama", 40)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=41, max_draft_steps=2))
    assert km.engine.shallow_states.shape[1] == 3
    ids = random_prompt(model.config.vocab_size, 5, 42)
    ref = km.generate(ids, max_new_tokens=20, speculate=False, eos_token_id=[]).tokens
    out = km.generate(ids, max_new_tokens=20, threshold=0.0, max_draft_steps=9, eos_token_id=[])
    assert km.engine.shallow_states.shape[1] == 10
    assert out.tokens == ref
    assert len(out.stats.drafted_at) == 9


def test_the_loop_reads_as_small_phases():
    """No function of the decode loop runs past 50 lines (the round is draft, verify, accept, commit)."""
    import ast
    from pathlib import Path

    import kangaroo_fast.engine as engine_module

    tree = ast.parse(Path(engine_module.__file__).read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef)}
    assert {"generate_batch", "draft", "verify", "commit"} <= set(lengths)
    assert max(lengths.values()) <= 50, {name: n for name, n in lengths.items() if n > 50}


def test_greedy_verification_never_accepts_a_rows_padding(monkeypatch):
    """A row with fewer drafts than the round's widest is padded; its padding must match no target. (It was 0, so a
    row without drafts whose target was token 0 accepted the padding and emitted the token after it.)"""
    model = tiny_model("llama", 3)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, 5, threshold=0.0, max_draft_steps=3))
    eng = km.engine
    targets = torch.tensor([[0, 5, 6], [3, 4, 8]])

    def verify(states, drafts, pos, first):
        accepted = TorchBackend.accept(drafts, targets)
        return targets, accepted, targets.gather(1, accepted[:, None])[:, 0]

    monkeypatch.setattr(eng.steps, "verify", verify)
    rnd = RoundDrafts.start([11, 12], [7, 9], [0, 2])
    rnd.tokens = [[], [3, 9]]
    settings = kangaroo_fast.DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=8)
    assert eng.verify(rnd, 2, settings) == [[0], [3, 4]]


def test_batch_where_a_row_stops_drafting_on_a_token_0_target_equals_hf():
    """The case that found the padding bug: byte prompts, two in a batch, the last round's row without drafts."""
    from test_bench import byte_encoder

    model = tiny_model("llama", 3)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, 5, threshold=0.0, max_draft_steps=3))
    prompts = [byte_encoder([{"role": "user", "content": f"question {i}?"}])[0] for i in (2, 0)]
    outs = km.generate(prompts, max_new_tokens=5, threshold=0.0, max_draft_steps=3, eos_token_id=[])
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            want = model.generate(p[None], attention_mask=torch.ones_like(p[None]), do_sample=False,
                                  max_new_tokens=5, eos_token_id=None)[0, len(p):].tolist()
        assert out.tokens == want

"""Context lookup (``kangaroo_fast/lookup.py``): the n-gram index against a brute-force search, and decoding with
it still token-identical to HF greedy (plain loop, eager graph loop, batches) and lossless when sampling."""
from __future__ import annotations

import random

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.adapter import Adapter
from kangaroo_fast.config import DecodeSettings
from kangaroo_fast.graphs import DecodeSteps
from kangaroo_fast.lookup import NgramLookup

from conftest import early_exit_adapter, hf_greedy, random_adapter, random_prompt, tiny_model


def brute_force(tokens: list[int], drafts: list[int], max_n: int) -> int | None:
    """The token after the latest occurrence (followed by a committed token) of the longest matching suffix."""
    context = tokens + drafts
    for n in range(max_n, min(max_n, 2) - 1, -1):
        if len(context) < n:
            continue
        suffix = context[len(context) - n:]
        for j in range(len(tokens) - 2, n - 2, -1):  # j: the n-gram's last position; j + 1 must be committed
            if tokens[j - n + 1:j + 1] == suffix:
                return tokens[j + 1]
    return None


@pytest.mark.parametrize("length", [1, 2, 7, 123])
@pytest.mark.parametrize("max_n", [1, 2, 3, 5])
def test_propose_equals_brute_force(length, max_n):
    rng = random.Random(length * 10 + max_n)
    vocab = 4 if length > 7 else 3  # small vocabularies: many repeats
    tokens = [rng.randrange(vocab) for _ in range(length)]
    whole = NgramLookup(tokens, max_n)
    grown = NgramLookup(tokens[:1], max_n)
    for cut in range(2, length + 1):  # committed a few tokens at a time, as rounds do
        if cut % 3 == 0 or cut == length:
            grown.extend(tokens[len(grown.tokens):cut])
    assert grown.tokens == whole.tokens == tokens
    for draft_len in range(0, 4):
        drafts = [rng.randrange(vocab) for _ in range(draft_len)]
        expected = brute_force(tokens, drafts, max_n)
        assert whole.propose(drafts) == expected, (tokens, drafts)
        assert grown.propose(drafts) == expected


def test_propose_prefers_the_longest_match_then_the_latest():
    # "1 2" was followed by 3 and later by 4; "0 1 2" only by 3
    lookup = NgramLookup([0, 1, 2, 3, 9, 1, 2, 4, 0, 1, 2], 3)
    assert lookup.propose() == 3  # the trigram 0 1 2 wins over the more recent bigram 1 2 -> 4
    assert NgramLookup([0, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3).propose() == 4  # only the bigram: its latest
    assert NgramLookup([5, 6, 7], 3).propose() is None  # the suffix itself is no earlier occurrence
    assert lookup.propose([9]) is None  # "2 9" never occurred
    assert NgramLookup([5, 6, 5], 1).propose() == 6  # max_n = 1: single tokens
    assert NgramLookup([5, 6, 5], 2).propose() is None  # from 2 up, single tokens are not looked up


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_lookup_values_are_named(bad):
    with pytest.raises(ValueError, match=f"lookup={bad!r}"):
        NgramLookup([1, 2], bad)
    if bad != 0:
        with pytest.raises(ValueError, match=f"lookup={bad!r}"):
            DecodeSettings(exit_layer=1, lookup=bad).validate(4)


def _repeating_prompt(vocab: int, seed: int) -> torch.Tensor:
    """A random passage said twice and begun a third time: the model's continuation tends to copy it."""
    part = random_prompt(vocab, 9, seed)
    return torch.cat([part, part, part[:, :4]], dim=1)


@pytest.mark.parametrize("kind,exit_layer", [("llama", 1), ("mistral", 2), ("qwen2", 3)])
@pytest.mark.parametrize("lookup", [1, 2, 3])
def test_greedy_with_lookup_matches_hf(kind, exit_layer, lookup):
    model = tiny_model(kind, 40 + exit_layer, vocab_size=24)  # a small vocabulary: n-grams recur
    km = kangaroo_fast.load(model, adapter=random_adapter(model, exit_layer, seed=3))
    used = 0
    for seed in (1, 2):
        for ids in (_repeating_prompt(model.config.vocab_size, seed), random_prompt(model.config.vocab_size, 7, seed)):
            ref = hf_greedy(model, ids, 24)
            for threshold, steps in ((0.0, 3), (0.6, 6), (1.0, 1)):
                out = km.generate(ids, max_new_tokens=24, threshold=threshold, max_draft_steps=steps, lookup=lookup)
                assert out.tokens == ref, (seed, threshold, steps)
                assert out.stats.lookup_drafts <= out.stats.draft_steps
                used += out.stats.lookup_drafts
    assert used > 0  # the lookup did propose drafts


def test_lookup_proposals_are_accepted_where_the_output_copies():
    """Layers after the exit do nothing, so HF's output is the early-exit model's; on a prompt that repeats, the
    lookup's copies are mostly right and decoding needs fewer rounds than without it."""
    model = tiny_model("llama", 7)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=5))
    ids = _repeating_prompt(model.config.vocab_size, 4)
    ref = hf_greedy(model, ids, 30)
    without = km.generate(ids, max_new_tokens=30, threshold=1.0, max_draft_steps=6, lookup=0)
    with_lookup = km.generate(ids, max_new_tokens=30, threshold=1.0, max_draft_steps=6, lookup=3)
    assert without.tokens == with_lookup.tokens == ref
    assert without.stats.lookup_drafts == 0
    copied = sum(ref[i + 1] == NgramLookup(ids[0].tolist() + ref[:i + 1], 3).propose() for i in range(len(ref) - 1))
    if copied >= len(ref) // 2:  # the model does copy this prompt: the lookup must pay off
        assert with_lookup.stats.rounds < without.stats.rounds


def test_eager_graph_loop_and_batches_with_lookup_match_hf():
    model = tiny_model("qwen2", 12, vocab_size=24)
    adapter = early_exit_adapter(model, 1)
    graphed = kangaroo_fast.load(model, adapter=adapter, backend="torch", dtype=torch.float32, graphs="eager")
    plain = kangaroo_fast.load(model, adapter=adapter, backend="torch", dtype=torch.float32, graphs=False)
    prompts = [_repeating_prompt(model.config.vocab_size, s)[0] for s in (1, 2)] + \
        [random_prompt(model.config.vocab_size, 5, 3)[0]]
    settings = DecodeSettings(exit_layer=1, threshold=0.3, max_draft_steps=4, max_new_tokens=18, lookup=3)
    refs = [hf_greedy(model, p[None], 18, eos_token_id=None) for p in prompts]
    for km in (graphed, plain):
        outs = km.engine.generate_batch(prompts, settings, set())
        assert [tokens for tokens, _ in outs] == refs
        assert sum(stats.lookup_drafts for _, stats in outs) > 0
        for p, ref in zip(prompts, refs):
            tokens, stats = km.engine.generate(p[None], settings, set())
            assert tokens == ref


def test_lookup_is_an_adapter_setting(tmp_path):
    model = tiny_model("llama", 3, vocab_size=24)
    adapter = random_adapter(model, 2, seed=1, lookup=1)  # single tokens: a 24-token vocabulary repeats at once
    adapter.save(tmp_path / "a")
    loaded = Adapter.load(tmp_path / "a")
    assert loaded.config.lookup == 1
    km = kangaroo_fast.load(model, adapter=loaded)
    assert km.default_settings()["lookup"] == 1
    ids = _repeating_prompt(model.config.vocab_size, 2)
    assert km.generate(ids, max_new_tokens=12).stats.lookup_drafts > 0
    assert km.generate(ids, max_new_tokens=12, lookup=0).stats.lookup_drafts == 0
    assert kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=1)).default_settings()["lookup"] == 0


def test_steps_that_copy_skip_the_draft_head(monkeypatch):
    model = tiny_model("llama", 7, vocab_size=24)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=5))
    ids = _repeating_prompt(model.config.vocab_size, 4)
    calls = []
    head, draft = DecodeSteps.head, DecodeSteps.draft
    monkeypatch.setattr(DecodeSteps, "head", lambda steps, newest: calls.append(1) or head(steps, newest))
    monkeypatch.setattr(DecodeSteps, "draft", lambda steps, *a: calls.append(1) or draft(steps, *a))
    out = km.generate(ids, max_new_tokens=30, threshold=0.0, max_draft_steps=4, lookup=1)
    assert out.tokens == hf_greedy(model, ids, 30)
    assert out.stats.lookup_drafts > 0
    # one sequence: a hit skips its step's head (run alone, or in the draft step)
    assert len(calls) == out.stats.draft_steps - out.stats.lookup_drafts

"""Greedy Kangaroo decoding is token-identical to HF ``generate(do_sample=False)`` in float32."""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.api import DEFAULT_ADAPTER_DIR

from conftest import (KINDS, TINY_SHAPES, early_exit_adapter, hf_greedy, make_layers_identity, random_adapter,
                      random_prompt, tiny_model)

PROMPT_LENGTHS = (1, 7, 23)
NEW_TOKENS = 24
SEEDS = {"llama": 11, "mistral": 23, "qwen2": 37}


def _unused_token(model, ids: torch.Tensor, max_new_tokens: int, start: int = 0) -> tuple[int, list[int]]:
    """An id that HF's greedy output (with that id as EOS) never produces, and that output."""
    vocab = model.config.vocab_size
    for candidate in range(start, start + vocab):
        eos = candidate % vocab
        ref = hf_greedy(model, ids, max_new_tokens, eos_token_id=eos)
        if eos not in ref:
            return eos, ref
    raise AssertionError("every token id appears in the reference output")


# ---- the settings matrix on tiny random models -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cases():
    """Per kind: the HF model, the prompts and HF's greedy outputs (computed once)."""
    cases = {}
    for kind in KINDS:
        model = tiny_model(kind, SEEDS[kind])
        prompts = [random_prompt(model.config.vocab_size, n, SEEDS[kind] * 100 + n) for n in PROMPT_LENGTHS]
        refs = [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]
        cases[kind] = (model, prompts, refs)
    return cases


def _exit_layers(kind: str) -> list[int]:
    num_layers = TINY_SHAPES[kind]["num_hidden_layers"]
    return sorted({1, 2, num_layers - 1})


MATRIX = [(kind, layer, adapter_kind) for kind in KINDS for layer in _exit_layers(kind)
          for adapter_kind in ("random", "early_exit")]


@pytest.mark.parametrize("kind,exit_layer,adapter_kind", MATRIX)
def test_tiny_models_match_hf_greedy(tiny_cases, kind, exit_layer, adapter_kind):
    model, prompts, refs = tiny_cases[kind]
    assert model.config.num_hidden_layers == TINY_SHAPES[kind]["num_hidden_layers"] > exit_layer
    if adapter_kind == "random":
        adapter = random_adapter(model, exit_layer, seed=exit_layer + 5)
    else:
        adapter = early_exit_adapter(model, exit_layer, seed=exit_layer + 7)
    km = kangaroo_fast.load(model, adapter=adapter)
    for threshold in (0.0, 0.6, 1.0):
        for steps in (1, 3, 6):
            for ids, ref in zip(prompts, refs):
                streamed: list[int] = []
                out = km.generate(ids, max_new_tokens=NEW_TOKENS, threshold=threshold, max_draft_steps=steps,
                                  callback=streamed.extend)
                assert out.tokens == ref, (threshold, steps, ids.shape[1])
                assert streamed == out.tokens
                assert out.stats.mode == "kangaroo"
                assert len(out.stats.drafted_at) <= steps
                if threshold == 0.0 and len(ref) > 2:
                    assert out.stats.draft_steps > 0


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_models_vanilla_match_hf_greedy(tiny_cases, kind):
    model, prompts, refs = tiny_cases[kind]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=3))
    plain = kangaroo_fast.load(model)  # no adapter at all
    for ids, ref in zip(prompts, refs):
        for m in (km, plain):
            out = m.generate(ids, max_new_tokens=NEW_TOKENS, speculate=False)
            assert out.tokens == ref
            assert out.stats.mode == "vanilla"
            assert out.stats.draft_steps == 0
            assert out.stats.rounds == len(out.tokens) - 1


def test_early_exit_adapter_gives_partial_acceptance(tiny_cases):
    """Sanity of the matrix above: the early-exit adapter at layer L-1 gets some drafts accepted and some
    rejected, so the partial-acceptance path is exercised."""
    model, prompts, refs = tiny_cases["qwen2"]
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 4, seed=2))
    rates = []
    for ids, ref in zip(prompts, refs):
        out = km.generate(ids, max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3)
        assert out.tokens == ref
        rates.extend(out.stats.acceptance_rate)
    assert max(rates) > 0.0
    assert min(rates) < 1.0


@pytest.mark.parametrize("kind,overrides", [
    ("mistral", dict(sliding_window=9)),
    ("llama", dict(tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=6)),
])
def test_model_variants_match_hf(kind, overrides):
    model = tiny_model(kind, 41, **overrides)
    ids = random_prompt(model.config.vocab_size, 23, 5)
    eos, ref = _unused_token(model, ids, 30, start=17)
    if "sliding_window" in overrides:
        # the window matters: without it the output differs
        full = tiny_model(kind, 41, **{**overrides, "sliding_window": None})
        assert hf_greedy(full, ids, 30, eos_token_id=eos) != ref
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 3, seed=1))
    for threshold, steps in ((0.0, 5), (0.6, 2), (1.0, 4)):
        out = km.generate(ids, max_new_tokens=30, threshold=threshold, max_draft_steps=steps, eos_token_id=eos)
        assert out.tokens == ref
    assert km.generate(ids, max_new_tokens=30, speculate=False, eos_token_id=eos).tokens == ref


# ---- a draft that equals the full model: every draft accepted --------------------------------------------------
def _all_accept_model(kind: str, exit_layer: int, seed: int):
    model = tiny_model(kind, seed)
    make_layers_identity(model, exit_layer)
    adapter = early_exit_adapter(model, exit_layer, seed=seed + 1)
    assert adapter.draft_vocab is None
    assert torch.equal(adapter.norm, model.model.norm.weight)
    return model, adapter


@pytest.mark.parametrize("kind,exit_layer", [("llama", 1), ("mistral", 2), ("qwen2", 3)])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_all_drafts_accepted(kind, exit_layer, steps):
    model, adapter = _all_accept_model(kind, exit_layer, seed=60 + exit_layer)
    ids = random_prompt(model.config.vocab_size, 7, 61 + steps)
    rounds = 3
    n_new = 1 + rounds * (steps + 1)
    eos, ref = _unused_token(model, ids, n_new, start=29)
    assert len(ref) == n_new
    km = kangaroo_fast.load(model, adapter=adapter)
    out = km.generate(ids, max_new_tokens=n_new, threshold=0.0, max_draft_steps=steps, eos_token_id=eos)
    assert out.tokens == ref
    assert out.stats.rounds == rounds
    assert out.stats.mean_accepted == steps + 1
    assert out.stats.acceptance_rate == [1.0] * steps
    assert out.stats.drafted_at == [rounds] * steps
    assert out.stats.draft_steps == rounds * steps
    assert out.stats.stop_reason == "max_new_tokens"


def test_no_draft_accepted_with_disjoint_draft_vocab():
    model = tiny_model("llama", 71)
    ids = random_prompt(model.config.vocab_size, 7, 72)
    eos, ref = _unused_token(model, ids, 30, start=3)
    used = set(ref)
    vocab = torch.tensor([t for t in range(model.config.vocab_size) if t not in used and t != eos][::-1])
    assert vocab.numel() >= 20
    adapter = random_adapter(model, 2, seed=73, draft_vocab=vocab)
    km = kangaroo_fast.load(model, adapter=adapter)
    for steps in (1, 4):
        out = km.generate(ids, max_new_tokens=30, threshold=0.0, max_draft_steps=steps, eos_token_id=eos)
        assert out.tokens == ref
        assert out.stats.drafted_at and all(d > 0 for d in out.stats.drafted_at)
        assert out.stats.acceptance_rate == [0.0] * len(out.stats.drafted_at)
        assert out.stats.accepted_at == [0] * len(out.stats.drafted_at)
        assert out.stats.mean_accepted == 1.0


@pytest.mark.parametrize("slot", ["first_token", "first_draft", "middle_draft", "last_draft", "bonus"])
def test_eos_inside_a_draft_stops_generation(slot):
    steps = 6
    model, adapter = _all_accept_model("qwen2", 2, seed=80)
    ids = random_prompt(model.config.vocab_size, 7, 81)
    _, full = _unused_token(model, ids, 40, start=1)

    def slot_of(i: int) -> str:
        # tokens[0] comes from prefill; round r drafts tokens[1 + 7r .. 6 + 7r] and adds the bonus 7 + 7r
        if i == 0:
            return "first_token"
        return {0: "first_draft", 5: "last_draft", 6: "bonus"}.get((i - 1) % (steps + 1), "middle_draft")

    index = next(i for i, t in enumerate(full) if full.index(t) == i and slot_of(i) == slot)
    eos = full[index]
    ref = hf_greedy(model, ids, 40, eos_token_id=eos)
    assert ref == full[:index + 1]
    km = kangaroo_fast.load(model, adapter=adapter)
    out = km.generate(ids, max_new_tokens=40, threshold=0.0, max_draft_steps=steps, eos_token_id=eos)
    assert out.tokens == ref
    assert out.tokens[-1] == eos
    assert out.stats.stop_reason == "eos"
    assert out.stats.new_tokens == index + 1


def test_eos_list_stops_at_first_listed_token():
    model, adapter = _all_accept_model("llama", 2, seed=90)
    ids = random_prompt(model.config.vocab_size, 5, 91)
    _, full = _unused_token(model, ids, 30, start=2)
    firsts = [i for i, t in enumerate(full) if full.index(t) == i and i > 3]
    eos = [full[firsts[3]], full[firsts[1]]]
    ref = hf_greedy(model, ids, 30, eos_token_id=eos)
    assert ref == full[:firsts[1] + 1]
    km = kangaroo_fast.load(model, adapter=adapter)
    assert km.generate(ids, max_new_tokens=30, threshold=0.0, max_draft_steps=4, eos_token_id=eos).tokens == ref


# ---- stopping on the cache and on max_new_tokens -----------------------------------------------------------------
@pytest.mark.parametrize("room", [1, 2, 5, 13])
@pytest.mark.parametrize("setup", ["all_accept", "random", "vanilla"])
def test_cache_filled_to_its_end(room, setup):
    n = 7
    if setup == "all_accept":
        model, adapter = _all_accept_model("mistral", 2, seed=100)
    else:
        model = tiny_model("mistral", 101)
        adapter = random_adapter(model, 2, seed=102)
    ids = random_prompt(model.config.vocab_size, n, 103 + room)
    eos, ref = _unused_token(model, ids, 60, start=40)
    km = kangaroo_fast.load(model, adapter=adapter, max_cache_len=n + room)
    assert km.engine.max_len == n + room
    out = km.generate(ids, max_new_tokens=60, threshold=0.0, max_draft_steps=6, eos_token_id=eos,
                      speculate=setup != "vanilla")
    assert out.stats.stop_reason == "cache_full"
    assert n + len(out.tokens) == n + room
    assert out.tokens == ref[:len(out.tokens)]


@pytest.mark.parametrize("max_new", [1, 2, 5, 17])
@pytest.mark.parametrize("setup", ["all_accept", "random"])
def test_max_new_tokens_respected_exactly(max_new, setup):
    if setup == "all_accept":
        model, adapter = _all_accept_model("llama", 1, seed=110)
    else:
        model = tiny_model("qwen2", 111)
        adapter = random_adapter(model, 3, seed=112)
    ids = random_prompt(model.config.vocab_size, 9, 113)
    eos, ref = _unused_token(model, ids, max_new, start=60)
    km = kangaroo_fast.load(model, adapter=adapter)
    for steps in (1, 6):
        for speculate in (True, False):
            out = km.generate(ids, max_new_tokens=max_new, threshold=0.0, max_draft_steps=steps,
                              eos_token_id=eos, speculate=speculate)
            assert len(out.tokens) == max_new
            assert out.stats.new_tokens == max_new
            assert out.stats.stop_reason == "max_new_tokens"
            assert out.tokens == ref


# ---- the embedded SmolLM2-135M -----------------------------------------------------------------------------------
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers larger than 50.",
    "How do I boil an egg so that the yolk stays soft?",
    "Translate 'good morning, my friend' into Spanish.",
    "Give me a short motivational quote for a Monday.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Suggest a name for a small orange cat.",
    "What are the health benefits of drinking water?",
    "Write one sentence that uses the word 'serendipity'.",
    "How many legs does a spider have?",
    "Tell me a fun fact about octopuses.",
    "Reply with only the word: yes",
]
DEFAULT_NEW_TOKENS = 40

# (which KangarooModel, generate() keywords): exit layers 2 and 6 with the adapters' own settings and with
# overrides, thresholds 0, 0.6 and 1, and a deep early exit that gets many (not all) drafts accepted.
DEFAULT_SETTINGS = [
    ("exit6", dict(threshold=0.0, max_draft_steps=4)),
    ("exit2", dict(threshold=1.0, max_draft_steps=3)),
    ("exit6", dict(exit_layer=24, threshold=0.0, max_draft_steps=5)),
    ("exit2", dict(threshold=0.0, max_draft_steps=2)),
    ("exit6", dict(threshold=1.0, max_draft_steps=6)),
    ("exit6", dict(exit_layer=2, threshold=0.6, max_draft_steps=3)),
    ("loaded", dict()),
    ("exit6", dict(exit_layer=27, threshold=0.6, max_draft_steps=6)),
    ("exit2", dict(exit_layer=6, threshold=0.0, max_draft_steps=1)),
]


@pytest.fixture(scope="module")
def default_models(default_model):
    """KangarooModels sharing the loaded SmolLM2 weights: its own (shipped adapter or none), an early-exit adapter
    at layer 6 and a random adapter at layer 2."""
    km = default_model.model
    hf = km.hf_model
    shipped = (DEFAULT_ADAPTER_DIR / "config.json").exists()
    assert (km.adapter is not None) == shipped
    return {
        "loaded": km,
        "exit6": kangaroo_fast.KangarooModel(hf, km.tokenizer, early_exit_adapter(hf, 6, seed=5)),
        "exit2": kangaroo_fast.KangarooModel(hf, km.tokenizer, random_adapter(hf, 2, seed=6, scale=0.02)),
    }


@pytest.mark.parametrize("index", range(len(CHAT_PROMPTS)))
def test_default_model_chat_prompts_match_hf(default_model, default_models, index):
    prompt = CHAT_PROMPTS[index]
    name, kwargs = DEFAULT_SETTINGS[index % len(DEFAULT_SETTINGS)]
    km = default_models[name]
    ids = km.encode(prompt)
    assert ids.shape[0] == 1 and ids.shape[1] > 5
    ref = hf_greedy(default_model.reference, ids, DEFAULT_NEW_TOKENS)
    speculate = km.adapter is not None
    out = km.generate(prompt, max_new_tokens=DEFAULT_NEW_TOKENS, speculate=speculate, **kwargs)
    assert out.tokens == ref
    assert out.stats.prompt_tokens == ids.shape[1]
    assert out.text == km.tokenizer.decode(ref, skip_special_tokens=True)
    if out.stats.stop_reason == "eos":
        assert out.tokens[-1] == default_model.reference.config.eos_token_id
    else:
        assert out.stats.stop_reason == "max_new_tokens" and len(out.tokens) == DEFAULT_NEW_TOKENS


def test_default_model_deep_exit_accepts_some_drafts(default_model, default_models):
    """On the real model an early exit at layer 27 agrees with the full model often but not always: rounds with
    partial acceptance and rejection both occur, and the output stays HF's."""
    km = default_models["exit6"]
    ids = km.encode("Name three famous painters and one painting by each.")
    ref = hf_greedy(default_model.reference, ids, 32)
    out = km.generate(ids, max_new_tokens=32, exit_layer=27, threshold=0.0, max_draft_steps=4)
    assert out.tokens == ref
    rates = out.stats.acceptance_rate
    assert rates[0] > 0.0
    assert min(rates) < 1.0
    assert out.stats.mean_accepted > 1.0


# ---- per-layer attention types (kept last: it fails on the current package) --------------------------------
@pytest.mark.parametrize("max_window_layers", [28, 2, 0])
def test_qwen2_per_layer_sliding_window_matches_hf(max_window_layers):
    """Qwen2 applies the sliding window only to layers >= max_window_layers (config.layer_types)."""
    model = tiny_model("qwen2", 43, use_sliding_window=True, sliding_window=6, max_window_layers=max_window_layers)
    ids = random_prompt(model.config.vocab_size, 23, 9)
    eos, ref = _unused_token(model, ids, 20, start=50)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2, seed=4))
    assert km.generate(ids, max_new_tokens=20, speculate=False, eos_token_id=eos).tokens == ref
    assert km.generate(ids, max_new_tokens=20, threshold=0.0, max_draft_steps=3, eos_token_id=eos).tokens == ref

"""The drafter seam: the lookup-only drafter (no adapter), a drafter written outside the package, the default
composition, and bad drafters named. Every decode is checked against HF's greedy output in float32."""
from __future__ import annotations

import random

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.drafting import AdapterDrafter, ContextLookup, FirstOf, Proposal, make_drafter

from conftest import hf_greedy, random_adapter, random_prompt, tiny_model


def _repeating_prompt(vocab: int, seed: int) -> torch.Tensor:
    part = random_prompt(vocab, 11, seed)
    return torch.cat([part, part, part[:, :3]], dim=1)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("graphs", [False, "eager"])
def test_lookup_drafter_needs_no_adapter_and_matches_hf(kind, graphs):
    model = tiny_model(kind, 51, vocab_size=29)
    km = kangaroo_fast.load(model, backend="torch", graphs=graphs)
    assert km.adapter is None
    copied = 0
    for seed in (1, 2):
        for ids in (_repeating_prompt(29, seed), random_prompt(29, 1, seed)):
            out = km.generate(ids, max_new_tokens=24, drafter="lookup")
            assert out.tokens == hf_greedy(model, ids, 24)
            assert out.stats.lookup_drafts == out.stats.draft_steps  # every draft was copied
            copied += out.stats.lookup_drafts
    assert copied > 0


def test_lookup_drafter_in_a_batch_matches_hf():
    model = tiny_model("llama", 52, vocab_size=23)
    km = kangaroo_fast.load(model, backend="torch")
    prompts = [_repeating_prompt(23, 3)[0], random_prompt(23, 5, 4)[0], _repeating_prompt(23, 5)[0][:17]]
    outs = km.generate(prompts, max_new_tokens=18, drafter="lookup", lookup=2)
    for p, out in zip(prompts, outs):
        assert out.tokens == hf_greedy(model, p[None], 18)


class Scribble:
    """A drafter from outside the package: proposes spans of random tokens, always confident, and keeps what it is
    told. Its drafts are mostly wrong; the output must not care."""

    uses_adapter = False

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.rng = vocab, random.Random(seed)
        self.seen: dict[int, list[int]] = {}

    def begin(self, contexts, threshold):
        self.seen = {i: list(c) for i, c in enumerate(contexts)}

    def propose(self, seq, drafts, room, head):
        return Proposal([self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, room))])

    def commit(self, seq, tokens):
        self.seen[seq].extend(tokens)


@pytest.mark.parametrize("graphs", [False, "eager"])
def test_a_drafter_from_outside_stays_lossless_and_sees_every_token(graphs):
    model = tiny_model("qwen2", 53)
    km = kangaroo_fast.load(model, backend="torch", graphs=graphs)
    drafter = Scribble(model.config.vocab_size, 0)
    prompts = [random_prompt(model.config.vocab_size, n, n)[0] for n in (4, 9)]
    outs = km.generate(prompts, max_new_tokens=20, drafter=drafter, max_draft_steps=5)
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert out.tokens == hf_greedy(model, p[None], 20)
        assert drafter.seen[i] == p.tolist() + out.tokens  # begin's context plus every commit
        assert out.stats.draft_steps > 0 and out.stats.lookup_drafts == 0


def test_default_composition_copies_first_then_asks_the_adapter():
    model = tiny_model("llama", 7, vocab_size=24)
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=5), backend="torch")
    part = random_prompt(24, 9, 4)
    ids = torch.cat([part, part, part[:, :4]], dim=1)
    both = km.generate(ids, max_new_tokens=30, threshold=0.0, max_draft_steps=4, lookup=1)
    adapter_only = km.generate(ids, max_new_tokens=30, threshold=0.0, max_draft_steps=4, lookup=0)
    ref = hf_greedy(model, ids, 30)
    assert both.tokens == adapter_only.tokens == ref
    assert 0 < both.stats.lookup_drafts < both.stats.draft_steps
    assert adapter_only.stats.lookup_drafts == 0
    assert isinstance(make_drafter("kangaroo", 2, True), FirstOf)
    assert isinstance(make_drafter("kangaroo", 0, True), AdapterDrafter)


def test_first_of_takes_the_first_non_empty_proposal():
    class Fixed:
        uses_adapter = False

        def __init__(self, tokens):
            self.tokens = tokens

        def begin(self, contexts, threshold):
            pass

        def propose(self, seq, drafts, room, head):
            return Proposal(list(self.tokens))

        def commit(self, seq, tokens):
            pass

    head = lambda: pytest.fail("no drafter here asks for the head")  # noqa: E731
    assert FirstOf(Fixed([]), Fixed([4, 5]), Fixed([6])).propose(0, [], 3, head).tokens == [4, 5]
    nothing = FirstOf(Fixed([]), Fixed([])).propose(0, [], 3, head)
    assert nothing.tokens == [] and not nothing.confident


def test_context_lookup_proposes_spans_within_the_room():
    lookup = ContextLookup(2)
    lookup.begin([[1, 2, 3, 4, 1, 2]], 0.5)
    head = lambda: pytest.fail("the lookup never asks for the head")  # noqa: E731
    assert lookup.propose(0, [], 3, head).tokens == [3, 4, 1]
    assert lookup.propose(0, [], 1, head).tokens == [3]
    assert lookup.propose(0, [9], 3, head).tokens == []
    lookup.commit(0, [3, 9])
    assert lookup.propose(0, [], 2, head).tokens == []  # n-grams down to 2 only: "3 9" never occurred before
    lookup.commit(0, [1, 2])
    assert lookup.propose(0, [], 2, head).tokens == [3, 9]  # "1 2" now last followed by "3 9", the latest wins


def test_bad_drafters_are_named():
    model = tiny_model("llama", 56)
    km = kangaroo_fast.load(model, backend="torch")
    ids = random_prompt(model.config.vocab_size, 5, 1)
    with pytest.raises(ValueError, match="drafter='medusa' must be one of kangaroo, lookup"):
        km.generate(ids, max_new_tokens=4, drafter="medusa")
    with pytest.raises(TypeError, match="drafter=42 is neither one of kangaroo, lookup nor a drafter"):
        km.generate(ids, max_new_tokens=4, drafter=42)
    with pytest.raises(ValueError, match="drafter=AdapterDrafter uses the adapter, and this model has none"):
        km.generate(ids, max_new_tokens=4, drafter=AdapterDrafter())
    with pytest.raises(ValueError, match="speculative decoding needs an adapter"):
        km.generate(ids, max_new_tokens=4)
    assert km.generate(ids, max_new_tokens=4, drafter="medusa", speculate=False).stats.mode == "vanilla"


def test_adapter_drafter_max_position_stops_it_there_and_is_checked():
    from kangaroo_fast.drafting import HeadProposal

    drafter = AdapterDrafter(max_position=2)
    drafter.begin((), 0.5)
    head = lambda: HeadProposal(token=7, confidence=0.9)  # noqa: E731
    assert drafter.propose(0, [3], 4, head).tokens == [7]
    stopped = drafter.propose(0, [3, 4], 4, head)
    assert stopped.tokens == [] and not stopped.confident
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_position={bad!r}"):
            AdapterDrafter(max_position=bad)

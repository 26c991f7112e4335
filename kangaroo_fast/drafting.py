"""What proposes drafts: one small interface, and the drafters the package ships.

The decode loop (``Engine._round``) drafts in steps. At each step it asks the drafter, for every sequence still
drafting, to ``propose`` a continuation of that sequence's drafts so far; the loop appends it (cut at EOS and at
the room the round leaves), and the sequence drafts on while the proposal was ``confident`` and room is left. The
loop runs every proposed token through layers 0..l-1 (and the adapter where the drafter uses it), keeping its
layer-l state for verification, so any drafter's tokens verify alike and the output stays the full model's.

A drafter that needs the model's own guess calls ``head()``: the adapter's draft head on the sequence's newest
input (the loop runs the inputs not yet run first, for every sequence in one forward). A drafter that never calls
it (the context lookup) costs no head at all, and a copied span runs through the shallow layers in one forward.

    Drafter                     what it proposes
    AdapterDrafter              the paper's: the draft head's top token, confident while its probability >= η
    ContextLookup               the token after the latest earlier occurrence of the context's last n tokens,
                                as a span while the lookup finds more (prompt-lookup decoding); no model
    FirstOf(a, b, ...)          the first non-empty proposal (the default: FirstOf(ContextLookup, AdapterDrafter))

A new strategy is a class with these four methods (``begin``, ``propose``, ``commit``, and ``uses_adapter``) and
its test; ``kangaroo_fast.generate(..., drafter=obj)`` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .lookup import NgramLookup


@dataclass
class HeadProposal:
    """The draft head's guess after one sequence's newest input."""

    token: int
    confidence: float                # top-1 probability of the raw draft distribution
    q: torch.Tensor | None = None    # when sampling: the processed draft distribution over the vocabulary [V]


@dataclass
class Proposal:
    """A drafter's continuation of one sequence's drafts."""

    tokens: list[int] = field(default_factory=list)   # empty: nothing to propose, the sequence stops drafting
    confident: bool = True                            # the sequence may draft on after these
    # per token, when sampling: its draft distribution q [V], or None for a point mass (a deterministic proposal)
    q: list[torch.Tensor | None] | None = None
    copied: bool = False                              # counted in ``GenerationStats.lookup_drafts``


class Drafter(Protocol):
    """Proposes draft tokens for the sequences of one generation; ``seq`` is a prompt's index in the batch."""

    uses_adapter: bool  # the shallow forward runs the adapter (its cache kept whole) and ``head`` may be called

    def begin(self, contexts: Sequence[Sequence[int]], threshold: float) -> None:
        """A new generation: per sequence its prompt and first token; ``threshold`` is η."""

    def propose(self, seq: int, drafts: list[int], room: int, head: Callable[[], HeadProposal]) -> Proposal:
        """Continue ``drafts`` (this round's so far) by at most ``room`` tokens."""

    def commit(self, seq: int, tokens: list[int]) -> None:
        """Tokens the round emitted for ``seq`` (accepted drafts and the bonus token)."""


class AdapterDrafter:
    """Kangaroo's drafting: the adapter's head proposes one token per step until its confidence falls below η;
    with ``max_position``, only at the round's first ``max_position`` draft positions (a composition may still
    copy further: the adapter's later guesses are the least often accepted)."""

    uses_adapter = True

    def __init__(self, max_position: int | None = None):
        if max_position is not None and (isinstance(max_position, bool) or not isinstance(max_position, int)
                                         or max_position < 1):
            raise ValueError(f"max_position={max_position!r} must be an integer >= 1 (None: no limit)")
        self.threshold = 0.0
        self.max_position = max_position

    def begin(self, contexts: Sequence[Sequence[int]], threshold: float) -> None:
        self.threshold = threshold

    def propose(self, seq: int, drafts: list[int], room: int, head: Callable[[], HeadProposal]) -> Proposal:
        if self.max_position is not None and len(drafts) >= self.max_position:
            return Proposal([], False)
        guess = head()
        return Proposal([guess.token], guess.confidence >= self.threshold, [guess.q])

    def commit(self, seq: int, tokens: list[int]) -> None:
        pass


class ContextLookup:
    """Copies from the context (``lookup.py``): the longest n-gram (``max_n`` down to 2) of the context and the
    drafts so far that occurred before proposes the token that followed it, and the span goes on while the lookup
    finds more. Copied drafts are point masses when sampling."""

    uses_adapter = False

    def __init__(self, max_n: int):
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"lookup={max_n!r} must be an integer >= 1 (0 turns the lookup off)")
        self.max_n = max_n
        self.indexes: list[NgramLookup] = []

    def begin(self, contexts: Sequence[Sequence[int]], threshold: float) -> None:
        self.indexes = [NgramLookup(list(tokens), self.max_n) for tokens in contexts]

    def propose(self, seq: int, drafts: list[int], room: int, head: Callable[[], HeadProposal]) -> Proposal:
        index, span = self.indexes[seq], []
        while len(span) < room:
            hit = index.propose(drafts + span)
            if hit is None:
                break
            span.append(hit)
        return Proposal(span, True, [None] * len(span), copied=True)

    def commit(self, seq: int, tokens: list[int]) -> None:
        self.indexes[seq].extend(tokens)


class FirstOf:
    """Composition: each step, the first of ``drafters`` that proposes anything proposes."""

    def __init__(self, *drafters: Drafter):
        if not drafters:
            raise ValueError("FirstOf needs at least one drafter")
        self.drafters = drafters
        self.uses_adapter = any(d.uses_adapter for d in drafters)

    def begin(self, contexts: Sequence[Sequence[int]], threshold: float) -> None:
        for d in self.drafters:
            d.begin(contexts, threshold)

    def propose(self, seq: int, drafts: list[int], room: int, head: Callable[[], HeadProposal]) -> Proposal:
        for d in self.drafters:
            proposal = d.propose(seq, drafts, room, head)
            if proposal.tokens:
                return proposal
        return Proposal([], False)

    def commit(self, seq: int, tokens: list[int]) -> None:
        for d in self.drafters:
            d.commit(seq, tokens)


DRAFTERS = ("kangaroo", "lookup")


def make_drafter(kind, lookup: int, has_adapter: bool) -> Drafter:
    """The drafter called ``kind``, or ``kind`` itself when it is a drafter object.

    "kangaroo": the adapter, after the context lookup when ``lookup`` > 0 (needs an adapter);
    "lookup": the context lookup alone (no adapter needed; n = ``lookup``, or 3 when it is 0)."""
    if not isinstance(kind, str):
        missing = [name for name in ("begin", "propose", "commit", "uses_adapter") if not hasattr(kind, name)]
        if missing:
            raise TypeError(f"drafter={kind!r} is neither one of {', '.join(DRAFTERS)} nor a drafter "
                            f"(it lacks {', '.join(missing)})")
        if kind.uses_adapter and not has_adapter:
            raise ValueError(f"drafter={type(kind).__name__} uses the adapter, and this model has none")
        return kind
    if kind == "lookup":
        return ContextLookup(lookup or 3)
    if kind != "kangaroo":
        raise ValueError(f"drafter={kind!r} must be one of {', '.join(DRAFTERS)} or a drafter object")
    require_adapter(kind, has_adapter)
    return FirstOf(ContextLookup(lookup), AdapterDrafter()) if lookup else AdapterDrafter()


def require_adapter(kind, has_adapter: bool) -> None:
    """Refuse the adapter's drafting ("kangaroo") for a model without an adapter, naming the ways out; callers
    check this before any other setting, as the first thing a user without an adapter needs to hear."""
    if isinstance(kind, str) and kind == "kangaroo" and not has_adapter:
        raise ValueError("speculative decoding needs an adapter: pass adapter=..., drafter='lookup' (no adapter "
                         "needed), or speculate=False")

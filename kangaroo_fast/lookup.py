"""Context lookup: a second source of draft tokens beside the adapter, for text that repeats its context.

Summaries, answers over retrieved documents and translations copy whole phrases from the prompt, and the adapter
(one attention layer over layer-l states) rarely copies. ``NgramLookup`` proposes the token that followed the latest
earlier occurrence of the context's last n tokens (the longest n from ``max_n`` down to 2 that occurs; 1 only when
``max_n`` is 1), as prompt-lookup decoding does (Saxena, 2023). Its proposals are verified like any draft, so the
output stays the full model's (lossless); they only change how many drafts a round gets right.

The index maps every n-gram of the committed tokens to the token after its latest occurrence; the current round's
uncommitted drafts are part of the looked-up suffix but are not indexed (they may be rejected).
"""
from __future__ import annotations


class NgramLookup:
    """An n-gram index over one sequence's committed tokens (prompt and emitted)."""

    def __init__(self, tokens: list[int], max_n: int):
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"lookup={max_n!r} must be an integer >= 1 (0 turns the lookup off)")
        self.sizes = tuple(range(max_n, min(max_n, 2) - 1, -1))
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.tokens: list[int] = []
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        """Commit ``new`` tokens: every n-gram that now has a next token points to it (the latest wins)."""
        tokens = self.tokens
        first = max(len(tokens) - 1, 0)  # the last old token gets its next token now
        tokens.extend(new)
        for j in range(first, len(tokens) - 1):
            following = tokens[j + 1]
            for n, table in self.tables.items():
                if j >= n - 1:
                    table[tuple(tokens[j - n + 1:j + 1])] = following

    def propose(self, drafts: list[int] = ()) -> int | None:
        """The token after the latest earlier occurrence of the suffix of committed tokens + ``drafts``, or None."""
        for n in self.sizes:
            tail = list(drafts[-n:])
            if len(tail) < n:
                tail = self.tokens[len(self.tokens) - (n - len(tail)):] + tail
                if len(tail) < n:
                    continue
            hit = self.tables[n].get(tuple(tail))
            if hit is not None:
                return hit
        return None

"""What one method's decode of one prompt returns: shared by this package's methods and the vLLM peers."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MethodResult:
    tokens: list[int]
    seconds: float
    target_forwards: int | None = None  # including the prefill
    rounds: int | None = None
    draft_steps: int | None = None
    lookup_drafts: int | None = None  # drafts copied from the context (Kangaroo's context lookup)
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)


"""The settings sweep (``kangaroo-fast tune``): Kangaroo against the same engine's vanilla mode over a grid of
adapters, thresholds, draft steps and context lookups, on the tune split."""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable, Iterable

import torch

from .prompts import Sample


def run_tune(models: dict[str, object], samples: list[Sample], thresholds: Iterable[float], steps: Iterable[int],
             max_new_tokens: int, encode: Callable[[list[dict]], torch.Tensor], progress: bool = False,
             lookups: Iterable[int] = (0,)) -> dict:
    """Kangaroo against the same engine's vanilla mode over the grid adapters x thresholds x max_draft_steps x
    context lookups (``lookup.py``; 0: off).

    ``models`` maps an adapter name to a KangarooModel (all on the same base model). For every prompt (first turn)
    vanilla runs once, then every setting; speedup = vanilla seconds / Kangaroo seconds summed over the
    prompts of a category. Returns the rows and the best setting per category and overall.
    """
    thresholds, steps, lookups = list(thresholds), list(steps), list(lookups)
    if not models or not thresholds or not steps or not lookups:
        raise ValueError("tune needs at least one adapter, one threshold, one max_draft_steps and one lookup value")
    grid = list(itertools.product(models, thresholds, steps, lookups))
    from ..config import DecodeSettings

    for name, threshold, max_steps, lookup in grid:  # a bad value fails here, not half-way through the sweep
        model = models[name]
        if model.adapter is None:
            raise ValueError(f"tune: the model for {name!r} has no adapter")
        DecodeSettings(model.adapter.config.exit_layer, threshold, max_steps, max_new_tokens,
                       lookup).validate(model.config.num_layers)
    first = next(iter(models.values()))
    from tqdm.auto import tqdm

    totals: dict = defaultdict(lambda: {"seconds": 0.0, "tokens": 0, "rounds": 0, "drafts": 0, "mismatches": 0})
    vanilla_s: dict[str, float] = defaultdict(float)
    prompt_ids = [encode([{"role": "user", "content": s.turns[0]}]) for s in samples]
    warm = min(prompt_ids, key=lambda t: t.shape[1])
    first.generate(warm, max_new_tokens=4, speculate=False)
    for model in models.values():
        model.warm_up()
        model.generate(warm, max_new_tokens=4)
    for sample, ids in tqdm(list(zip(samples, prompt_ids)), desc="prompts", disable=not progress):
        vanilla = first.generate(ids, max_new_tokens=max_new_tokens, speculate=False)
        for category in (sample.category, "overall"):
            vanilla_s[category] += vanilla.stats.time_s
        for name, threshold, max_steps, lookup in grid:
            out = models[name].generate(ids, max_new_tokens=max_new_tokens, threshold=threshold,
                                        max_draft_steps=max_steps, lookup=lookup)
            for category in (sample.category, "overall"):
                row = totals[(name, threshold, max_steps, lookup, category)]
                row["seconds"] += out.stats.time_s
                row["tokens"] += out.stats.new_tokens_after_prefill
                row["rounds"] += out.stats.rounds
                row["drafts"] += out.stats.draft_steps
                row["mismatches"] += int(out.tokens != vanilla.tokens)
    rows = _rows(models, totals, vanilla_s)
    best = {}
    for row in rows:
        if row["category"] not in best or row["speedup_vs_vanilla"] > best[row["category"]]["speedup_vs_vanilla"]:
            best[row["category"]] = row
    return {"rows": rows, "best": best, "max_new_tokens": max_new_tokens, "prompts": len(samples),
            "dtype": str(first.dtype).replace("torch.", ""), "device": str(first.device)}



def _rows(models: dict[str, object], totals: dict, vanilla_s: dict[str, float]) -> list[dict]:
    """One row per (adapter, threshold, max_draft_steps, lookup, category) from the sweep's summed statistics."""
    rows = []
    for (name, threshold, max_steps, lookup, category), t in totals.items():
        rows.append({"adapter": name, "exit_layer": models[name].adapter.config.exit_layer, "threshold": threshold,
                     "max_draft_steps": max_steps, "lookup": lookup, "category": category,
                     "speedup_vs_vanilla": vanilla_s[category] / t["seconds"] if t["seconds"] > 0 else 0.0,
                     "mean_accepted": t["tokens"] / t["rounds"] if t["rounds"] else 0.0,
                     "drafts_per_round": t["drafts"] / t["rounds"] if t["rounds"] else 0.0,
                     "mismatches_vs_vanilla": t["mismatches"]})
    return rows

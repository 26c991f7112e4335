"""The benchmark's summaries and tables: per method, per category and overall (the definitions are the package
docstring's), the markdown tables of a run, of the batch-size axis and of a tune sweep, and the results files."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .methods import ADAPTER_METHODS, METHOD_LABELS


def summarise(records: list[dict], methods: list[str]) -> dict:
    """{category (and "overall"): {method: statistics}}; see the module docstring for the definitions."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    groups["overall"] = list(records)
    summary = {}
    for category, rows in groups.items():
        per_method = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            tokens = sum(r["new_tokens"] for r in mine)
            seconds = sum(r["seconds"] for r in mine)
            forwards = [r for r in mine if r["target_forwards"] is not None]
            after_prefill = sum(r["new_tokens"] - 1 for r in forwards)
            steps = sum(r["target_forwards"] - 1 for r in forwards)
            stats = {"samples": len(mine), "new_tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                     "mean_accepted": after_prefill / steps if steps > 0 else None,
                     "same_as_hf": sum(r["same_as_hf"] for r in mine),
                     "mismatches": [f"{r['id']}#{r['turn']}@{r['first_difference']}" for r in mine
                                    if not r["same_as_hf"]]}
            rounds = sum(r["rounds"] or 0 for r in mine)
            if method in (*ADAPTER_METHODS, "lookup", "vllm_ngram", "vllm_kangaroo") and rounds:
                width = max((len(r["drafted_at"]) for r in mine), default=0)
                drafted = [sum(r["drafted_at"][j] for r in mine if j < len(r["drafted_at"])) for j in range(width)]
                accepted = [sum(r["accepted_at"][j] for r in mine if j < len(r["accepted_at"])) for j in range(width)]
                stats["acceptance_rate"] = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
                drafts = sum(r["draft_steps"] for r in mine)
                stats["drafts_per_round"] = drafts / rounds
                stats["copied_share"] = sum(r.get("lookup_drafts") or 0 for r in mine) / drafts if drafts else 0.0
            per_method[method] = stats
        for method, stats in per_method.items():
            for base in ("hf", "vanilla"):
                ref = per_method.get(base)
                stats[f"speedup_vs_{base}"] = (stats["tokens_per_s"] / ref["tokens_per_s"]
                                               if ref and ref["tokens_per_s"] > 0 else None)
        summary[category] = per_method
    return summary



def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The overall table (one row per method) and a speedup-over-HF matrix (methods x categories)."""
    summary, methods = result["summary"], result["methods"]
    overall = summary["overall"]
    lines = ["| method | tokens/s | × HF greedy | × vanilla | #MAT | drafts/round | acceptance per position "
             "| = HF greedy |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        s = overall[m]
        rates = " ".join(f"{a:.2f}" for a in s.get("acceptance_rate", [])) or "–"
        same = f"{s['same_as_hf']}/{s['samples']}" + ("" if s["same_as_hf"] == s["samples"] else " **MISMATCH**")
        lines.append(f"| {METHOD_LABELS[m]} | {s['tokens_per_s']:.1f} | {_fmt(s['speedup_vs_hf'])} | "
                     f"{_fmt(s['speedup_vs_vanilla'])} | {_fmt(s['mean_accepted'])} | "
                     f"{_fmt(s.get('drafts_per_round'))} | {rates} | {same} |")
    for m, reason in result.get("unavailable", {}).items():
        lines.append(f"| {METHOD_LABELS[m]} | not available on this platform: {reason} | | | | | | |")
    categories = [c for c in summary if c != "overall"] + ["overall"]
    header = ["| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    lines += ["", "Speedup over HF greedy (tokens/s ratio) and #MAT per category:", "", *header]
    for m in methods:
        cells = [f"{_fmt(summary[c][m]['speedup_vs_hf'])} ({_fmt(summary[c][m]['mean_accepted'])})"
                 for c in categories]
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Tokens/s per category:", "", *header]
    for m in methods:
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(f"{summary[c][m]['tokens_per_s']:.1f}"
                                                             for c in categories) + " |")
    s = result["settings"]
    notes = [f"{s['dtype']} on {s['device']}, max_new_tokens={s['max_new_tokens']}"]
    if {*ADAPTER_METHODS, "hf_early_exit"} & set(methods):
        notes[0] += f", exit layer {s['exit_layer']}"
    if set(ADAPTER_METHODS) & set(methods):
        notes[0] += f", η={s['threshold']}, γ={s['max_draft_steps']}, context lookup {s.get('lookup', 0)}"
    if "kangaroo_paper" in methods:
        notes[0] += " (paper drafting: none)"
    if "hf_prompt_lookup" in methods:
        notes[0] += f", prompt lookup {s['prompt_lookup_num_tokens']} tokens"
    notes[0] += (". tokens/s: all new tokens over all seconds of the generate calls (prefill included); "
                 "#MAT: tokens per target forward after the prefill.")
    if result.get("compile_s") is not None and "hf_compile" in methods:
        notes.append(f"torch.compile warm-up (not in the timings): {result['compile_s']:.1f} s.")
    if result.get("warm_up_s"):
        notes.append(f"This engine's {result.get('backend', '')} backend compiled its decode steps before the timings: "
                     f"{result['warm_up_s']:.1f} s.")
    mismatched = [m for m in methods if overall[m]["mismatches"]]
    if mismatched:
        notes.append("Outputs differing from HF greedy (id#turn@first differing token): " + "; ".join(
            f"{METHOD_LABELS[m]}: {', '.join(overall[m]['mismatches'])}" for m in mismatched))
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    if result.get("batch"):
        text += "\n" + batch_markdown(result["batch"])
    return text


def write_results(result: dict, output_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem``.json (everything) and ``stem``.md (the tables); the plot and the document's block are the bench
    tooling's (``bench/report.py``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(result))
    return paths



def batch_markdown(batch: dict) -> str:
    with_vllm = any("speedup_vs_vllm" in r for r in batch["rows"])
    lines = [f"Batch sizes ({batch['prompts']} first turns, {batch['max_new_tokens']} new tokens; speedups are "
             "tokens/s ratios; a vLLM method's batch is that many concurrent requests):", "",
             "| batch | method | tokens/s | × vanilla (same batch) | × vanilla batch 1 |"
             + (" × vLLM (same batch) |" if with_vllm else "") + " = batch-1 output |",
             "|---|---|---|---|---|" + ("---|" if with_vllm else "") + "---|"]
    for r in batch["rows"]:
        lines.append(f"| {r['batch_size']} | {METHOD_LABELS[r['method']]} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_vanilla']:.2f} | {r['speedup_vs_vanilla_batch_1']:.2f} | "
                     + (f"{r['speedup_vs_vllm']:.2f} | " if with_vllm else "")
                     + f"{r['same_as_batch_1']}/{batch['prompts']} |")
    return "\n".join(lines) + "\n"



def tune_markdown(result: dict) -> str:
    lines = ["| category | adapter | exit layer | η | γ | lookup | × vanilla | #MAT | drafts/round | ≠ vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [c for c in result["best"] if c != "overall"] + ["overall"]
    for category in order:
        b = result["best"][category]
        lines.append(f"| {category} | {b['adapter']} | {b['exit_layer']} | {b['threshold']} | {b['max_draft_steps']} "
                     f"| {b.get('lookup', 0)} | {b['speedup_vs_vanilla']:.2f} | {b['mean_accepted']:.2f} "
                     f"| {b['drafts_per_round']:.2f} "
                     f"| {b['mismatches_vs_vanilla']} |")
    lines += ["", "Every setting, overall (fastest first):", "",
              "| adapter | exit layer | η | γ | lookup | × vanilla | #MAT | drafts/round | ≠ vanilla |",
              "|---|---|---|---|---|---|---|---|---|"]
    overall = sorted((r for r in result["rows"] if r["category"] == "overall"), key=lambda r: -r["speedup_vs_vanilla"])
    for r in overall:
        lines.append(f"| {r['adapter']} | {r['exit_layer']} | {r['threshold']} | {r['max_draft_steps']} "
                     f"| {r.get('lookup', 0)} | {r['speedup_vs_vanilla']:.2f} | {r['mean_accepted']:.2f} "
                     f"| {r['drafts_per_round']:.2f} "
                     f"| {r['mismatches_vs_vanilla']} |")
    return "\n".join(lines) + "\n"

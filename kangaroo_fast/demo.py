"""`make demo`: the embedded SmolLM2-135M-Instruct with its shipped adapter, on a mixed prompt set.

For each prompt, interleaved so machine drift hits every method alike: HF ``generate`` (greedy, same dtype),
this engine without drafting (vanilla), and Kangaroo. Prints a table per category and writes a JSON record.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ROOT / "bench" / "prompts.jsonl"
FALLBACK_PROMPTS = [
    {"id": "qa", "category": "qa", "turns": ["Explain how rainbows form, step by step."]},
    {"id": "math", "category": "math", "turns": ["A train travels 60 km per hour for 3 hours. How far does it go?"]},
    {"id": "translation", "category": "translation", "turns": ["Translate into French: The cat sleeps on the warm windowsill."]},
]


def load_prompts(path: Path | None, per_category: int | None) -> list[dict]:
    if path is None or not path.exists():
        return FALLBACK_PROMPTS
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if per_category is None:
        return rows
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for row in rows:
        if taken[row["category"]] < per_category:
            taken[row["category"]] += 1
            chosen.append(row)
    return chosen


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    import transformers
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit.stdout.strip() or None}


def run(model, prompts: list[dict], max_new_tokens: int, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    records = []
    warm = model.encode(prompts[0]["turns"][0])
    model.generate(warm, max_new_tokens=8)
    model.hf_model.generate(warm, max_new_tokens=8, do_sample=False)
    for row in tqdm(prompts, desc="prompts", disable=not progress):
        ids = model.encode(row["turns"][0])
        eos = sorted(model.eos_ids())
        start = time.perf_counter()
        hf_out = model.hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                         pad_token_id=eos[0])
        hf_s = time.perf_counter() - start
        hf_tokens = hf_out[0, ids.shape[1]:].tolist()
        vanilla = model.generate(ids, max_new_tokens=max_new_tokens, speculate=False)
        kangaroo = model.generate(ids, max_new_tokens=max_new_tokens)
        records.append({
            "id": row["id"], "category": row["category"], "tokens": kangaroo.stats.new_tokens,
            "hf_s": hf_s, "vanilla_s": vanilla.stats.time_s, "kangaroo_s": kangaroo.stats.time_s,
            "rounds": kangaroo.stats.rounds, "mean_accepted": kangaroo.stats.mean_accepted,
            "draft_steps": kangaroo.stats.draft_steps,
            "same_as_vanilla": kangaroo.tokens == vanilla.tokens, "same_as_hf": kangaroo.tokens == hf_tokens})
    return summarise(records)


def summarise(records: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    groups["overall"] = records

    def agg(rows):
        tokens = sum(r["tokens"] for r in rows)
        after_prefill = sum(r["tokens"] - 1 for r in rows)
        rounds = sum(r["rounds"] for r in rows)
        return {"prompts": len(rows), "tokens": tokens,
                "hf_tok_s": tokens / sum(r["hf_s"] for r in rows),
                "vanilla_tok_s": tokens / sum(r["vanilla_s"] for r in rows),
                "kangaroo_tok_s": tokens / sum(r["kangaroo_s"] for r in rows),
                "speedup_vs_vanilla": sum(r["vanilla_s"] for r in rows) / sum(r["kangaroo_s"] for r in rows),
                "speedup_vs_hf": sum(r["hf_s"] for r in rows) / sum(r["kangaroo_s"] for r in rows),
                "mean_accepted": after_prefill / max(rounds, 1),
                "drafts_per_round": sum(r["draft_steps"] for r in rows) / max(rounds, 1),
                "same_as_vanilla": sum(r["same_as_vanilla"] for r in rows),
                "same_as_hf": sum(r["same_as_hf"] for r in rows)}

    return {"categories": {name: agg(rows) for name, rows in groups.items()}, "records": records}


def table(summary: dict) -> str:
    lines = ["| category | prompts | HF tok/s | vanilla tok/s | Kangaroo tok/s | × vanilla | × HF | tokens/round "
             "| drafts/round | = vanilla | = HF |", "|" + "---|" * 11]
    for name, c in summary["categories"].items():
        lines.append(f"| {name} | {c['prompts']} | {c['hf_tok_s']:.1f} | {c['vanilla_tok_s']:.1f} | "
                     f"{c['kangaroo_tok_s']:.1f} | {c['speedup_vs_vanilla']:.2f} | {c['speedup_vs_hf']:.2f} | "
                     f"{c['mean_accepted']:.2f} | {c['drafts_per_round']:.2f} | {c['same_as_vanilla']}/{c['prompts']} "
                     f"| {c['same_as_hf']}/{c['prompts']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--per-category", type=int, default=2, help="prompts per category (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "demo.json")
    args = parser.parse_args(argv)

    import kangaroo_fast as kf

    model = kf.load(dtype=args.dtype)
    if model.adapter is None:
        raise SystemExit("no shipped adapter found: run `make train-default` first")
    out = model.generate("Explain in two sentences what speculative decoding is.", max_new_tokens=80)
    print(out.text)
    print(f"-- {out.stats.new_tokens} tokens, {out.stats.tokens_per_s:.1f} tokens/s, "
          f"{out.stats.mean_accepted:.2f} tokens per verification round, {out.stats.dtype}\n")
    prompts = load_prompts(args.prompts, args.per_category or None)
    summary = run(model, prompts, args.max_new_tokens)
    summary.update({"machine": machine(), "dtype": str(model.dtype).replace("torch.", ""),
                    "settings": model.default_settings(), "max_new_tokens": args.max_new_tokens,
                    "command": "make demo"})
    print(table(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

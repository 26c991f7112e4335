"""Choose the shipped adapter's exit layer, threshold and draft steps by measuring wall-clock speedup.

Runs the embedded model on held-out training-style instructions (never the benchmark prompts): for every
(adapter, threshold, max_draft_steps) in the grid, Kangaroo against the same engine's vanilla mode, interleaved
per prompt. Writes a JSON file with one row per setting.

    python bench/choose_settings.py --adapters work/adapter-l2 work/adapter-l4 --output choice.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", type=Path, required=True)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--steps", nargs="+", type=int, default=[4, 6, 8])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--skip", type=int, default=1000, help="instructions the recipe trained on (seed 0)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    import kangaroo_fast as kf
    from kangaroo_fast.train.instructions import training_instructions

    base = kf.load(adapter=args.adapters[0])
    prompts = training_instructions(args.skip + args.prompts)[args.skip:]
    models = {path: kf.KangarooModel(base.hf_model, base.tokenizer, kf.Adapter.load(path, base.config))
              for path in args.adapters}
    grid = list(itertools.product(args.adapters, args.thresholds, args.steps))
    vanilla_s = 0.0
    rows = {setting: {"time_s": 0.0, "tokens": 0, "rounds": 0, "drafts": 0} for setting in grid}
    for text in prompts:
        ids = base.encode(text)
        vanilla = models[args.adapters[0]].generate(ids, max_new_tokens=args.max_new_tokens, speculate=False)
        vanilla_s += vanilla.stats.time_s
        for setting in grid:
            path, threshold, steps = setting
            out = models[path].generate(ids, max_new_tokens=args.max_new_tokens, threshold=threshold,
                                        max_draft_steps=steps)
            if out.tokens != vanilla.tokens:
                rows[setting]["mismatch"] = rows[setting].get("mismatch", 0) + 1
            row = rows[setting]
            row["time_s"] += out.stats.time_s
            row["tokens"] += out.stats.new_tokens - 1
            row["rounds"] += out.stats.rounds
            row["drafts"] += out.stats.draft_steps
    result = []
    for (path, threshold, steps), row in rows.items():
        result.append({"adapter": str(path), "exit_layer": models[path].adapter.config.exit_layer,
                       "threshold": threshold, "max_draft_steps": steps,
                       "speedup_vs_vanilla": vanilla_s / row["time_s"],
                       "mean_accepted": row["tokens"] / row["rounds"], "drafts_per_round": row["drafts"] / row["rounds"],
                       "mismatches": row.get("mismatch", 0)})
    result.sort(key=lambda r: -r["speedup_vs_vanilla"])
    args.output.write_text(json.dumps({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                       "dtype": str(base.dtype), "threads": torch.get_num_threads(),
                                       "rows": result}, indent=1) + "\n")
    for r in result[:10]:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

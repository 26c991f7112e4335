"""How often an adapter's draft agrees with the full model on the benchmark prompts' own greedy answers.

    python bench/adapter_agreement.py [--adapter DIR] [--max-new-tokens 128] [--output FILE.json]

A diagnosis, never a training or tuning input: for the first turn of every prompt in ``bench/prompts.jsonl`` the
embedded model's greedy answer is decoded, the adapter is run teacher-forced over it (as in training), and the
draft's top-1 is compared with the full model's at every answer position. Prints the agreement per category and the
simulated tokens per round (the engine's draft/accept rule replayed, ``train.distill.simulate_rounds``) for a few
settings. It tells a distribution gap (training instructions vs these prompts) from an engine problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 2:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 2")

    import kangaroo_fast as kf
    from kangaroo_fast.train.data import chat_ids, generate_answers, teacher_features
    from kangaroo_fast.train.distill import draft_predictions, simulate_rounds
    from kangaroo_fast.train.instructions import bench_prompts

    model = kf.load(adapter=args.adapter)
    if model.adapter is None:
        raise SystemExit("no adapter: pass --adapter DIR")
    prompts = bench_prompts()
    texts = [p["turns"][0] for p in prompts]
    sequences = generate_answers(model.packed, model.tokenizer, texts, args.max_new_tokens, 32, set(model.eos_ids()))
    starts = [len(chat_ids(model.tokenizer, t)) for t in texts]
    layer = model.adapter.config.exit_layer
    features = teacher_features(model.hf_model, sequences, [layer], 32, 8)
    predictions = draft_predictions(model.adapter.float(), features, list(range(len(sequences))),
                                    model.packed.lm_head.float(), model.packed.rope_cos, model.packed.rope_sin)
    by_category: dict[str, list[torch.Tensor]] = {}
    for (correct, _), start, p in zip(predictions, starts, prompts):
        by_category.setdefault(p["category"], []).append(correct[start:-1].float())
    result = {"adapter": args.adapter or "shipped", "max_new_tokens": args.max_new_tokens,
              "top1_by_category": {c: float(torch.cat(v).mean()) for c, v in by_category.items()},
              "top1": float(torch.cat([t for v in by_category.values() for t in v]).mean()),
              "simulated": [simulate_rounds(predictions, starts, t, g) for t in (0.0, 0.3, 0.5) for g in (4, 8)]}
    for category, value in result["top1_by_category"].items():
        print(f"{category:14s} top-1 agreement {value:.3f}")
    print(f"{'all':14s} top-1 agreement {result['top1']:.3f}")
    for row in result["simulated"]:
        print(f"η={row['threshold']:.1f} γ={row['max_draft_steps']}: {row['mean_accepted']:.2f} tokens per round, "
              f"{row['drafts_per_round']:.2f} drafts per round")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

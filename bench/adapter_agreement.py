"""How often an adapter's draft agrees with the full model on the benchmark prompts' own greedy answers.

    python bench/adapter_agreement.py [--adapter DIR] [--max-new-tokens 128] [--output FILE.json]

A diagnosis, never a training or tuning input: for the first turn of every prompt of the benchmark set
(``kangaroo_fast/data/prompts.jsonl``) the embedded model's greedy answer is decoded, the adapter is run
teacher-forced over it (as in training), and the draft's top-1 is compared with the full model's at every answer
position. Prints the agreement per category and the simulated tokens per round (the engine's draft/accept rule
replayed, ``train.distill.simulate_rounds``) for a few settings. It tells a distribution gap (training
instructions vs these prompts) from an engine problem.

It also measures how much of each answer repeats its context: ``copy`` is the share of answer positions where the
token after the latest earlier occurrence of the current token (prompt and answer so far) is the full model's next
token, and ``top-1 where copy is right`` the adapter's agreement at those positions (what the context lookup,
``kangaroo_fast/lookup.py``, is for).
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
    features = teacher_features(model.packed, sequences, [layer], 32, 8)
    predictions = draft_predictions(model.adapter.float(), features, list(range(len(sequences))),
                                    model.packed.lm_head.float(), model.packed.rope_cos, model.packed.rope_sin)
    by_category: dict[str, list[torch.Tensor]] = {}
    copies: dict[str, list[torch.Tensor]] = {}
    for (correct, _), start, p, seq, top in zip(predictions, starts, prompts, sequences, features.top_ids):
        by_category.setdefault(p["category"], []).append(correct[start:-1].float())
        copies.setdefault(p["category"], []).append(context_copy_right(seq, start, top[:, 0].tolist()))
    agree = {c: torch.cat(v) for c, v in by_category.items()}
    copy = {c: torch.cat(v) for c, v in copies.items()}
    result = {"adapter": args.adapter or "shipped", "max_new_tokens": args.max_new_tokens,
              "top1_by_category": {c: float(v.mean()) for c, v in agree.items()},
              "top1": float(torch.cat(list(agree.values())).mean()),
              "copy_by_category": {c: float(v.float().mean()) for c, v in copy.items()},
              "top1_where_copy_right_by_category": {c: float(agree[c][v].mean()) if bool(v.any()) else None
                                                    for c, v in copy.items()},
              "simulated": [simulate_rounds(predictions, starts, t, g) for t in (0.0, 0.3, 0.5) for g in (4, 8)]}
    for category, value in result["top1_by_category"].items():
        where = result["top1_where_copy_right_by_category"][category]
        print(f"{category:14s} top-1 agreement {value:.3f}; copy {result['copy_by_category'][category]:.3f}, "
              f"top-1 where copy is right {'–' if where is None else f'{where:.3f}'}")
    print(f"{'all':14s} top-1 agreement {result['top1']:.3f}")
    for row in result["simulated"]:
        print(f"η={row['threshold']:.1f} γ={row['max_draft_steps']}: {row['mean_accepted']:.2f} tokens per round, "
              f"{row['drafts_per_round']:.2f} drafts per round")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def context_copy_right(sequence: list[int], start: int, targets: list[int]) -> torch.Tensor:
    """Per answer position t (start..len-2): is the token after the latest earlier occurrence of sequence[t] the
    target (the full model's next token at t)? [len - 1 - start] bool."""
    from kangaroo_fast.lookup import NgramLookup

    lookup = NgramLookup(sequence[:start + 1], 1)
    right = []
    for t in range(start, len(sequence) - 1):
        right.append(lookup.propose() == targets[t])
        lookup.extend([sequence[t + 1]])
    return torch.tensor(right, dtype=torch.bool)


if __name__ == "__main__":
    sys.exit(main())

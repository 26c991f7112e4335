"""How often an adapter's draft agrees with the full model on the benchmark prompts' own greedy answers.

    python bench/adapter_agreement.py [--adapter DIR] [--max-new-tokens 128] [--split all|tune|report]
                                      [--draft-cost 0.28] [--full-vocab] [--output FILE.json]

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

Stop rules: the confidence's calibration (accuracy of the draft per confidence bin) and, for the per-step rule
(stop when the newest draft's confidence < η, the paper's) and the cumulative one (stop when the product of the
round's confidences < τ), the replayed tokens and drafts per round and a modelled speed over vanilla,
tokens / (1 + c * drafts) per round, with ``--draft-cost`` c the cost of one draft (its draft step and its share of
a wider verification) in vanilla steps. The default 0.28 is what the report split's paper drafting measured on a
2-core AVX2 EPYC (``bench/results/bench-avx2-eta06-cpu.md``: 1.41 tokens per round at 1.04x vanilla with 1.28 drafts
per round: (1.41 / 1.04 - 1) / 1.28). Choose a rule on ``--split tune`` only. It also reports the share of the
full model's tokens the draft head can propose at all (those in its draft vocabulary); ``--full-vocab`` scores the
whole vocabulary instead of the adapter's draft vocabulary (is the pruned vocabulary what limits the draft?).
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
    parser.add_argument("--split", default="all", choices=["all", "tune", "report"],
                        help="the prompts' split (default: all)")
    parser.add_argument("--draft-cost", type=float, default=0.28,
                        help="one draft's cost in vanilla steps, for the modelled speed (default 0.28)")
    parser.add_argument("--full-vocab", action="store_true",
                        help="let the draft head score the whole vocabulary, not the adapter's draft vocabulary")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 2:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 2")
    if not 0 <= args.draft_cost < float("inf"):
        parser.error(f"--draft-cost={args.draft_cost} must be a finite number >= 0")

    import kangaroo_fast as kf
    from kangaroo_fast.train.data import chat_ids, generate_answers, teacher_features
    from kangaroo_fast.train.distill import draft_predictions, simulate_rounds
    from kangaroo_fast.train.instructions import bench_prompts

    model = kf.load(adapter=args.adapter)
    if model.adapter is None:
        raise SystemExit("no adapter: pass --adapter DIR")
    adapter = model.adapter.float()
    if args.full_vocab:
        adapter.draft_vocab = None
    prompts = [p for p in bench_prompts() if args.split == "all" or p.get("split") == args.split]
    if not prompts:
        raise SystemExit(f"no benchmark prompts in split {args.split!r}")
    texts = [p["turns"][0] for p in prompts]
    sequences = generate_answers(model.packed, model.tokenizer, texts, args.max_new_tokens, 32, set(model.eos_ids()))
    starts = [len(chat_ids(model.tokenizer, t)) for t in texts]
    layer = model.adapter.config.exit_layer
    features = teacher_features(model.packed, sequences, [layer], 32, 8)
    predictions = draft_predictions(adapter, features, list(range(len(sequences))),
                                    model.packed.lm_head.float(), model.packed.rope_cos, model.packed.rope_sin)
    by_category: dict[str, list[torch.Tensor]] = {}
    copies: dict[str, list[torch.Tensor]] = {}
    covered: dict[str, list[torch.Tensor]] = {}
    for (correct, _), start, p, seq, top in zip(predictions, starts, prompts, sequences, features.top_ids):
        by_category.setdefault(p["category"], []).append(correct[start:-1].float())
        copies.setdefault(p["category"], []).append(context_copy_right(seq, start, top[:, 0].tolist()))
        covered.setdefault(p["category"], []).append(in_draft_vocab(top[start:-1, 0], adapter.draft_vocab))
    agree = {c: torch.cat(v) for c, v in by_category.items()}
    copy = {c: torch.cat(v) for c, v in copies.items()}
    vocab = {c: torch.cat(v).float() for c, v in covered.items()}
    result = {"adapter": args.adapter or "shipped", "max_new_tokens": args.max_new_tokens,
              "full_vocab": args.full_vocab,
              "top1_by_category": {c: float(v.mean()) for c, v in agree.items()},
              "top1": float(torch.cat(list(agree.values())).mean()),
              "copy_by_category": {c: float(v.float().mean()) for c, v in copy.items()},
              "top1_where_copy_right_by_category": {c: float(agree[c][v].mean()) if bool(v.any()) else None
                                                    for c, v in copy.items()},
              "draft_vocab_coverage_by_category": {c: float(v.mean()) for c, v in vocab.items()},
              "draft_vocab_coverage": float(torch.cat(list(vocab.values())).mean()),
              "split": args.split, "prompts": len(prompts),
              "simulated": [simulate_rounds(predictions, starts, t, g) for t in (0.0, 0.3, 0.5) for g in (4, 8)],
              "calibration": calibration(predictions, starts),
              "stop_rules": stop_rules(predictions, starts, args.draft_cost), "draft_cost": args.draft_cost}
    for category, value in result["top1_by_category"].items():
        where = result["top1_where_copy_right_by_category"][category]
        print(f"{category:14s} top-1 agreement {value:.3f}; copy {result['copy_by_category'][category]:.3f}, "
              f"top-1 where copy is right {'–' if where is None else f'{where:.3f}'}")
    print(f"{'all':14s} top-1 agreement {result['top1']:.3f}")
    print(f"targets in the draft vocabulary: {result['draft_vocab_coverage']:.3f} (per category: "
          + ", ".join(f"{c} {v:.3f}" for c, v in result["draft_vocab_coverage_by_category"].items()) + ")")
    for row in result["simulated"]:
        print(f"η={row['threshold']:.1f} γ={row['max_draft_steps']}: {row['mean_accepted']:.2f} tokens per round, "
              f"{row['drafts_per_round']:.2f} drafts per round")
    for row in result["calibration"]:
        print(f"confidence {row['low']:.1f}-{row['high']:.1f}: {row['count']:6d} drafts, "
              f"accepted {row['accuracy']:.3f}")
    best = {}
    for row in result["stop_rules"]:
        rule = "cumulative" if row["cumulative"] else "per-step"
        if row["modelled_speed"] > best.get(rule, {"modelled_speed": 0})["modelled_speed"]:
            best[rule] = row
    for rule, row in best.items():
        print(f"best {rule} rule: threshold {row['threshold']}, γ={row['max_draft_steps']}: "
              f"{row['mean_accepted']:.2f} tokens, {row['drafts_per_round']:.2f} drafts per round, "
              f"modelled {row['modelled_speed']:.3f}x vanilla at c={args.draft_cost}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def in_draft_vocab(targets: torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """Per target token id: can the draft head propose it at all (is it in the draft vocabulary; all are without
    one)? [T] bool."""
    if draft_vocab is None:
        return torch.ones(targets.shape, dtype=torch.bool)
    return torch.isin(targets.long(), draft_vocab.long())


def calibration(predictions, starts: list[int], bins: int = 10) -> list[dict]:
    """Per confidence bin: how many answer positions' drafts fell in it and the share that were right."""
    conf = torch.cat([c[s:-1].float() for (_, c), s in zip(predictions, starts)])
    right = torch.cat([r[s:-1].float() for (r, _), s in zip(predictions, starts)])
    which = (conf * bins).long().clamp(max=bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                     "accuracy": float(right[mask].mean()) if count else 0.0})
    return rows


def stop_rules(predictions, starts: list[int], draft_cost: float) -> list[dict]:
    """Both stop rules over a grid, each with its modelled speed over vanilla (see the module's docstring)."""
    from kangaroo_fast.train.distill import simulate_rounds

    rows = []
    for cumulative in (False, True):
        for threshold in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            for steps in (1, 2, 3, 4, 6, 8):
                row = simulate_rounds(predictions, starts, threshold, steps, cumulative)
                row["modelled_speed"] = row["mean_accepted"] / (1 + draft_cost * row["drafts_per_round"])
                rows.append(row)
    return rows


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

"""kangaroo-fast generate | train"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _settings(args) -> dict:
    return {k: v for k, v in {"exit_layer": args.exit_layer, "threshold": args.threshold,
                              "max_draft_steps": args.max_draft_steps, "seed": args.seed}.items() if v is not None}


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    import kangaroo_fast as kf

    model = kf.load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if model.tokenizer is not None and not args.json else None
    out = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, speculate=not args.no_speculate,
                         streamer=streamer, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         **_settings(args))
    stats = out.stats.as_dict()
    if args.json:
        print(json.dumps({"text": out.text, "tokens": out.tokens, "stats": stats}))
    else:
        rates = ", ".join(f"{r:.2f}" for r in stats["acceptance_rate"])
        print(f"\n[{stats['mode']} | {stats['dtype']} on {stats['device']}] {stats['new_tokens']} tokens in "
              f"{stats['prefill_s'] + stats['decode_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s), "
              f"{stats['rounds']} rounds, {stats['mean_accepted']:.2f} tokens/round"
              + (f", acceptance per draft position: {rates}" if rates else ""), file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    import torch.distributed as dist

    from .train.distill import Recipe
    from .train.recipe import run_recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    for key in ("exit_layer", "epochs", "n_instructions"):
        value = getattr(args, key)
        if value is not None:
            setattr(recipe, key, value)
    if args.exit_layer is not None:
        recipe.candidate_exit_layers = [args.exit_layer]
    distributed = "LOCAL_RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        report = run_recipe(recipe, Path(args.output), model=args.model,
                            work_dir=Path(args.work_dir) if args.work_dir else None, resume=not args.no_resume)
    finally:
        if distributed:
            dist.destroy_process_group()
    best = {layer: max(r["simulated"], key=lambda s: s["mean_accepted"]) for layer, r in report["layers"].items()}
    print(json.dumps({"output": args.output, "best_simulated": best}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (streams it) and print the statistics")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    gen.add_argument("--adapter", default=None, help="adapter directory (official Kangaroo format)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--exit-layer", type=int, default=None)
    gen.add_argument("--threshold", type=float, default=None)
    gen.add_argument("--max-draft-steps", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample (lossless)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default=None)
    gen.add_argument("--no-speculate", action="store_true", help="the same engine without drafting")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="distil an adapter (see kangaroo_fast/train/default_recipe.json)")
    train.add_argument("--recipe", default=None, help="recipe JSON (default: built-in defaults)")
    train.add_argument("--output", required=True, help="directory to write the adapter to")
    train.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    train.add_argument("--work-dir", default=None, help="cache for corpus and checkpoints")
    train.add_argument("--exit-layer", type=int, default=None)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--n-instructions", type=int, default=None)
    train.add_argument("--no-resume", action="store_true")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"kangaroo-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

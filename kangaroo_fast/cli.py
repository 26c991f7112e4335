"""kangaroo-fast generate | train | bench | tune"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _settings(args) -> dict:
    return {k: v for k, v in {"exit_layer": args.exit_layer, "threshold": args.threshold,
                              "max_draft_steps": args.max_draft_steps,
                              "lookup": args.lookup}.items() if v is not None}


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    import kangaroo_fast as kf

    model = kf.load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if model.tokenizer is not None and not args.json else None
    out = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, speculate=not args.no_speculate,
                         streamer=streamer, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, drafter=args.drafter, **_settings(args))
    stats = out.stats.as_dict()
    if args.json:
        print(json.dumps({"text": out.text, "tokens": out.tokens, "stats": stats}))
    else:
        rates = ", ".join(f"{r:.2f}" for r in stats["acceptance_rate"])
        print(f"\n[{stats['mode']} | {stats['dtype']} on {stats['device']}] {stats['new_tokens']} tokens in "
              f"{stats['prefill_s'] + stats['decode_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s), "
              f"{stats['rounds']} rounds, {stats['mean_accepted']:.2f} tokens/round"
              + (f", {stats['draft_steps']} drafts ({stats['lookup_drafts']} copied from the context)"
                 if stats["draft_steps"] else "")
              + (f", acceptance per draft position: {rates}" if rates else ""), file=sys.stderr)
    return 0


#: ``kangaroo-fast train``'s exit status when it stopped at its time limit with work left (EX_TEMPFAIL: run again).
TIME_LIMIT_EXIT = 75


def cmd_train(args) -> int:
    import torch.distributed as dist

    from .train.distill import Recipe, TimeLimit
    from .train.recipe import run_recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    for key in ("exit_layer", "epochs", "n_instructions"):
        value = getattr(args, key)
        _check_positive(key, value)
        if value is not None:
            setattr(recipe, key, value)
    if args.exit_layer is not None:
        recipe.candidate_exit_layers = [args.exit_layer]
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit={args.time_limit:g} must be > 0 minutes")
    distributed = "LOCAL_RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        report = run_recipe(recipe, Path(args.output), model=args.model,
                            work_dir=Path(args.work_dir) if args.work_dir else None, resume=not args.no_resume,
                            time_limit=args.time_limit)
    except TimeLimit as stop:
        print(f"kangaroo-fast train: time limit of {args.time_limit:g} min reached after saving ({stop}); "
              "run the same command again to resume", file=sys.stderr)
        return TIME_LIMIT_EXIT
    finally:
        if distributed:
            dist.destroy_process_group()
    best = {layer: max(r["simulated"], key=lambda s: s["mean_accepted"]) for layer, r in report["layers"].items()}
    print(json.dumps({"output": args.output, "best_simulated": best, "stage_seconds": report["stage_seconds"]},
                     indent=1))
    return 0


QUICK = {"per_category": 1, "max_new_tokens": 64}


def _bench_samples(args, all_turns: bool):
    from . import benchmark

    if args.questions is not None:  # a Spec-Bench file has no splits: --split does not apply
        return benchmark.per_category(benchmark.load_questions(args.questions), args.per_category)
    samples = benchmark.select_split(benchmark.load_prompts(args.prompts, all_turns=all_turns), args.split)
    return benchmark.per_category(samples, args.per_category)


def _split_used(args) -> str | None:
    """The split the results were measured on (None for a Spec-Bench file or held-out instructions)."""
    return None if args.questions is not None or getattr(args, "held_out", None) else args.split


def _model_name(args) -> str:
    from .models import DEFAULT_MODEL_NAME

    return Path(args.model).name if args.model else f"{DEFAULT_MODEL_NAME} (embedded)"


def _check_positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")


def run_bench(args) -> dict[str, Path]:
    """``kangaroo-fast bench``: run, write the results files, print the tables; the paths written (json, markdown).
    The checkout's ``bench/report.py`` (``make bench``) calls this too, then adds the commit, plot and the
    benchmark block of docs/measurements.md."""
    import kangaroo_fast as kf
    from . import benchmark

    if args.max_new_tokens is None:
        args.max_new_tokens = QUICK["max_new_tokens"] if args.quick else 128
    if args.per_category is None and args.quick:
        args.per_category = QUICK["per_category"]
    for name in ("per_category", "max_new_tokens", "prompt_lookup_tokens"):
        _check_positive(name, getattr(args, name))
    for size in args.batch_sizes or []:
        _check_positive("batch_sizes", size)
    methods = benchmark.check_methods(args.methods)
    samples = _bench_samples(args, all_turns=not (args.quick or args.first_turn))
    model = kf.load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    result = benchmark.run_benchmark(model, samples, methods, args.max_new_tokens, _settings(args),
                                     prompt_lookup_tokens=args.prompt_lookup_tokens, progress=True)
    if args.batch_sizes:
        result["batch"] = benchmark.run_batch_sizes(model, samples, args.batch_sizes, args.max_new_tokens,
                                                    _settings(args), progress=True, peers=methods,
                                                    prompt_lookup_tokens=args.prompt_lookup_tokens)
    result = {"command": "kangaroo-fast " + " ".join(args.argv),
              "model": _model_name(args), "prompts": str(args.questions or args.prompts), "split": _split_used(args),
              "quick": args.quick,
              "machine": benchmark.machine_info(), **result}
    stem = args.name or ("bench-quick" if args.quick else "bench") + "-" + result["settings"]["device"].split(":")[0]
    paths = benchmark.write_results(result, Path(args.output_dir), stem)
    print(benchmark.markdown_table(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths


def cmd_bench(args) -> int:
    run_bench(args)
    return 0


def cmd_tune(args) -> int:
    import kangaroo_fast as kf
    from . import benchmark

    for name in ("per_category", "max_new_tokens", "held_out"):
        _check_positive(name, getattr(args, name))
    if args.held_out:
        from .train.instructions import training_instructions

        skip = args.skip
        if skip is None:  # what the shipped adapter's recipe trained on
            from .train.distill import Recipe

            skip = Recipe.load(Path(__file__).parent / "train" / "default_recipe.json").n_instructions
        texts = training_instructions(skip + args.held_out)[skip:]
        samples = [benchmark.Sample(f"held-out-{i}", "held-out", [t]) for i, t in enumerate(texts)]
    else:
        samples = _bench_samples(args, all_turns=False)
    adapters = args.adapters or [None]
    base = kf.load(args.model, adapter=adapters[0], dtype=args.dtype, device=args.device)
    if base.adapter is None:
        raise ValueError("tune needs an adapter: pass --adapters DIR [DIR ...]")
    models = {str(adapters[0] or "shipped"): base}
    for path in adapters[1:]:
        models[str(path)] = kf.KangarooModel(base.hf_model, base.tokenizer, kf.Adapter.load(path, base.config))
    result = benchmark.run_tune(models, samples, args.thresholds, args.steps, args.max_new_tokens,
                                benchmark.chat_encoder(base), progress=True, lookups=args.lookups)
    result = {"command": "kangaroo-fast " + " ".join(args.argv), "model": _model_name(args),
              "prompts": "held-out training instructions" if args.held_out else str(args.questions or args.prompts),
              "split": _split_used(args),
              "machine": benchmark.machine_info(), **result}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "tune-" + result["device"].split(":")[0]
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(benchmark.tune_markdown(result))
    print(benchmark.tune_markdown(result))
    print(f"written: {out / (stem + '.json')}, {out / (stem + '.md')}")
    return 0


#: Errors a user's input causes (arguments, files): one line and exit code 2. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError)
DTYPE_HELP = "weights and activations dtype (default: bfloat16 where the device computes it natively, else float32)"
DEVICE_HELP = "cpu, cuda or cuda:N (default: cpu)"


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to every optional flag whose help does not say its default itself."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return text
        return text + (" (default: off)" if action.nargs == 0 and action.default is False else " (default: %(default)s)")


def _add_model_args(parser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def _add_prompt_args(parser, default_output: str, default_split: str) -> None:
    from .benchmark import DEFAULT_OUTPUT_DIR, DEFAULT_PROMPTS, SPLITS

    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt set (id, category, turns)")
    parser.add_argument("--split", choices=[*SPLITS, "all"], default=default_split,
                        help=f"part of the prompt set: tune (choose settings), report (the README's numbers) or all "
                             f"(default: {default_split}; a file naming no split is used whole)")
    parser.add_argument("--questions", type=Path, default=None,
                        help="a Spec-Bench question.jsonl (first turn of each; no splits) instead of --prompts "
                             "(default: none, --prompts is used)")
    parser.add_argument("--per-category", type=int, default=None,
                        help="at most this many prompts per category (default: all)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="folder the results are written to")
    parser.add_argument("--name", default=None, help=f"file stem of the results (default: {default_output})")


def cmd_vllm_config(args) -> int:
    """Print vLLM's ``--speculative-config`` JSON for Kangaroo drafts (``kangaroo_fast.vllm.config``)."""
    import json

    from .vllm import config

    print(json.dumps(config(adapter=args.adapter, num_speculative_tokens=args.num_speculative_tokens,
                            threshold=args.threshold, lookup=args.lookup, exit_layer=args.exit_layer,
                            adapter_steps=args.adapter_steps, backend=args.backend)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-fast", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (streams it) and print the statistics",
                         formatter_class=HelpFormatter)
    gen.add_argument("prompt", help="the user message (sent through the model's chat template)")
    gen.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    gen.add_argument("--adapter", default=None,
                     help="adapter directory, official Kangaroo format (default: the shipped one for the embedded "
                          "model, none otherwise)")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    gen.add_argument("--exit-layer", type=int, default=None,
                     help="layers the adapter reads from, 1..L-1 (default: the adapter's setting)")
    gen.add_argument("--threshold", type=float, default=None,
                     help="stop drafting below this draft confidence, in [0, 1] (default: the adapter's setting)")
    gen.add_argument("--max-draft-steps", type=int, default=None,
                     help="most drafts per round, up to the cache length - 2 (default: the adapter's setting)")
    gen.add_argument("--lookup", type=int, default=None,
                     help="context lookup: longest n-gram copied from the context as a draft (0: off; "
                          "default: the adapter's setting)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; >= 1e-4: sample (lossless)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the sampling generator, 0..2**64-1 (default: none, not reproducible)")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    gen.add_argument("--device", default=None, help=DEVICE_HELP)
    gen.add_argument("--drafter", default="kangaroo", choices=["kangaroo", "lookup"],
                     help="what drafts: the adapter (after the context lookup when --lookup > 0), or the context "
                          "lookup alone, which needs no adapter (default: kangaroo)")
    gen.add_argument("--no-speculate", action="store_true", help="the same engine without drafting")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="distil an adapter (see kangaroo_fast/train/default_recipe.json)",
                           formatter_class=HelpFormatter)
    train.add_argument("--recipe", default=None, help="recipe JSON (default: built-in defaults)")
    train.add_argument("--output", required=True, help="directory to write the adapter to (required)")
    train.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    train.add_argument("--work-dir", default=None,
                       help="cache for corpus and checkpoints, each rebuilt when the recipe or model that made it "
                            "changed (default: ~/.cache/kangaroo_fast/train/default)")
    train.add_argument("--exit-layer", type=int, default=None,
                       help="train only an adapter for this exit layer (default: the recipe's)")
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    train.add_argument("--n-instructions", type=int, default=None,
                       help="instructions the base model answers for the corpus (default: the recipe's)")
    train.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                       help="stop at the first save point after this many minutes (a batch of answers, a shard "
                            "of teacher features, an epoch), exit status 75; the same command resumes "
                            "(default: none)")
    train.add_argument("--no-resume", action="store_true",
                       help="train from scratch even where a checkpoint of the same recipe exists")
    train.set_defaults(func=cmd_train)

    from .benchmark import METHODS, PEER_METHODS, default_methods

    bench = sub.add_parser("bench", help="end-to-end comparison with HF generate and its speculative methods",
                           formatter_class=HelpFormatter)
    _add_model_args(bench)
    bench.add_argument("--adapter", default=None,
                       help="adapter directory, official Kangaroo format (default: the shipped one)")
    _add_prompt_args(bench, "bench[-quick]-DEVICE", "report")
    bench.add_argument("--quick", action="store_true",
                       help=f"{QUICK['per_category']} prompt per category, first turn, "
                            f"{QUICK['max_new_tokens']} new tokens (unless given)")
    bench.add_argument("--first-turn", action="store_true", help="only the first turn of multi-turn prompts")
    bench.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per prompt (default: 128; quick: 64)")
    bench.add_argument("--methods", nargs="+", default=default_methods(),
                       help=f"any of {' '.join(METHODS + PEER_METHODS)} (default: all; the vLLM ones where vLLM "
                            "is installed)")
    bench.add_argument("--exit-layer", type=int, default=None,
                       help="layers the adapter reads from (default: the adapter's setting)")
    bench.add_argument("--threshold", type=float, default=None,
                       help="draft confidence threshold (default: the adapter's setting)")
    bench.add_argument("--max-draft-steps", type=int, default=None,
                       help="most drafts per round (default: the adapter's setting)")
    bench.add_argument("--lookup", type=int, default=None,
                       help="Kangaroo's context lookup n-gram (0: off; default: the adapter's setting)")
    bench.add_argument("--prompt-lookup-tokens", type=int, default=10,
                       help="HF prompt lookup decoding's prompt_lookup_num_tokens")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                       help="also decode the first turns in batches of these sizes: vanilla, Kangaroo and the vLLM "
                            "methods asked for (as concurrent requests) (default: no batches)")
    bench.set_defaults(func=cmd_bench)

    tune = sub.add_parser("tune", help="speedup over a grid of thresholds, draft steps and adapters",
                          formatter_class=HelpFormatter)
    _add_model_args(tune)
    tune.add_argument("--adapters", nargs="+", default=None, help="adapter directories (default: the shipped one)")
    _add_prompt_args(tune, "tune-DEVICE", "tune")
    tune.add_argument("--held-out", type=int, default=None,
                      help="tune on this many held-out training instructions instead of a prompt set "
                           "(default: the prompt set)")
    tune.add_argument("--skip", type=int, default=None,
                      help="training instructions the adapter saw (seed 0; default: the default recipe's count)")
    tune.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.45, 0.6, 0.75],
                      help="draft confidence thresholds to try")
    tune.add_argument("--steps", nargs="+", type=int, default=[4, 6], help="max draft steps to try")
    tune.add_argument("--lookups", nargs="+", type=int, default=[0],
                      help="context lookup n-gram sizes to try (0: off)")
    tune.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per prompt")
    tune.set_defaults(func=cmd_tune)

    vcfg = sub.add_parser("vllm-config", formatter_class=HelpFormatter,
                          help="print the --speculative-config JSON that runs Kangaroo drafts in vLLM: "
                               "vllm serve MODEL --speculative-config \"$(kangaroo-fast vllm-config)\"")
    vcfg.add_argument("--adapter", default=None,
                      help="adapter directory, official Kangaroo format (default: the shipped one for the embedded "
                           "model)")
    vcfg.add_argument("--num-speculative-tokens", type=int, default=None,
                      help="most drafts per step (default: the settings tuned for vLLM, see kangaroo_fast.vllm)")
    vcfg.add_argument("--threshold", type=float, default=None,
                      help="stop the adapter's drafting below this confidence (default: tuned for vLLM)")
    vcfg.add_argument("--adapter-steps", type=int, default=None,
                      help="the adapter drafts only the first this many positions; the context lookup may copy "
                           "further (default: tuned for vLLM)")
    vcfg.add_argument("--lookup", type=int, default=None,
                      help="context lookup n-gram (0: off; default: the adapter's setting)")
    vcfg.add_argument("--exit-layer", type=int, default=None,
                      help="layers the adapter reads from (default: the adapter's setting)")
    vcfg.add_argument("--backend", default=None, help="the draft's backend, torch or triton (default: the device's)")
    vcfg.set_defaults(func=cmd_vllm_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"kangaroo-fast: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the embedded SmolLM2-135M-Instruct with its shipped adapter, on a mixed prompt set.

For each prompt (first turn), interleaved so machine drift hits every method alike: HF ``generate`` (greedy, same
dtype), this engine without drafting (vanilla), and Kangaroo; the runner of ``kangaroo-fast bench``
(``kangaroo_fast.benchmark``) with three of its methods. Prints its tables and writes a JSON record.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import benchmark

DEMO_METHODS = ("hf", "vanilla", "kangaroo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=benchmark.DEFAULT_PROMPTS)
    parser.add_argument("--per-category", type=int, default=2, help="prompts per category (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", type=Path, default=benchmark.DEFAULT_OUTPUT_DIR / "demo.json")
    args = parser.parse_args(argv)

    import kangaroo_fast as kf

    report_split = benchmark.select_split(benchmark.load_prompts(args.prompts, all_turns=False), "report")
    samples = benchmark.per_category(report_split, args.per_category or None)
    model = kf.load(dtype=args.dtype)
    if model.adapter is None:
        raise SystemExit("no shipped adapter found: run `make train-default` first")
    model.warm_up()  # where the decode steps are compiled (bfloat16 on CPU), says so and compiles them now
    out = model.generate("Explain in two sentences what speculative decoding is.", max_new_tokens=80)
    print(out.text)
    print(f"-- {out.stats.new_tokens} tokens, {out.stats.tokens_per_s:.1f} tokens/s, "
          f"{out.stats.mean_accepted:.2f} tokens per verification round, {out.stats.dtype}\n")
    result = benchmark.run_benchmark(model, samples, DEMO_METHODS, args.max_new_tokens, progress=True)
    result = {"command": "make demo", "model": "SmolLM2-135M-Instruct (embedded)", "prompts": str(args.prompts),
              "split": "report", "machine": benchmark.machine_info(), **result}
    print(benchmark.markdown_table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

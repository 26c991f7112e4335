"""bfloat16 against float32 on this CPU: the embedded model loaded once in each dtype (each with its default
backend), vanilla and Kangaroo decoding interleaved per prompt, so that machine drift hits all four alike. The
evidence behind ``models.default_dtype`` on CPUs without bf16 products; it runs on the tune split by default.

    python bench/dtype_ab.py [--split tune] [--per-category 1] [--max-new-tokens 128]

Prints each dtype's backend, warm-up seconds and peak resident memory so far, then the running tokens/s (all new
tokens over all seconds of the generate calls, prefill included) after each prompt; compare within one run only.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    import kangaroo_fast as kf
    from kangaroo_fast.benchmark import load_prompts, per_category, select_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="tune", choices=["tune", "report", "all"], help="(default: tune)")
    parser.add_argument("--per-category", type=int, default=1, help="prompts per category (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    args = parser.parse_args()
    samples = per_category(select_split(load_prompts(all_turns=False), args.split), args.per_category)
    models = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = kf.load(dtype=dtype)
        start = time.perf_counter()
        model.warm_up()
        name = str(dtype).removeprefix("torch.")
        models[name] = model
        print(f"{name}: backend {model.engine.ops.name}, warm-up {time.perf_counter() - start:.0f} s, peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)
    totals: dict[str, list[float]] = {}
    for sample in samples:
        for name, model in models.items():
            for speculate in (False, True):
                start = time.perf_counter()
                out = model.generate(sample.turns[0], max_new_tokens=args.max_new_tokens, speculate=speculate)
                seconds = time.perf_counter() - start
                total = totals.setdefault(f"{name} {'Kangaroo' if speculate else 'vanilla'}", [0, 0.0])
                total[0] += len(out.tokens)
                total[1] += seconds
        print(sample.id, "  ".join(f"{key} {n / s:.1f}" for key, (n, s) in totals.items()), flush=True)


if __name__ == "__main__":
    main()

"""Batched decoding with a batch's attention as grouped float32 products against the reference's SDPA call.

    python bench/batch_scaling.py [--batch-sizes 1 4 8 16] [--max-new-tokens 64] [--output FILE]

One process, the embedded model in bfloat16 with its adapter, two engines whose compiled steps differ only in a
batch's attention (``InductorBackend.grouped_batches`` True or False; both compiled in the process, step cache off).
The report split's first turns (3 per category, 18 prompts) go in consecutive groups of each batch size; per group
both engines run vanilla and Kangaroo (order rotating), each one ``generate`` call on the whole group. Reports
tokens/s (all new tokens over all seconds, prefill included) per engine, mode and batch size, and how many outputs
equal the other engine's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "batch-scaling-cpu.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from report import git_info

    import kangaroo_fast as kf
    from kangaroo_fast import benchmark
    from kangaroo_fast.backend.inductor import InductorBackend
    from kangaroo_fast.step_cache import cpu_flags

    class ReferenceBatchAttention(InductorBackend):
        grouped_batches = False

    engines = {"grouped": kf.load(backend="inductor", step_cache=False),
               "reference": kf.load(backend=ReferenceBatchAttention(), step_cache=False)}
    samples = benchmark.per_category(benchmark.select_split(benchmark.load_prompts(all_turns=False), "report"), 3)
    encode = benchmark.chat_encoder(engines["grouped"])
    prompts = [encode([{"role": "user", "content": s.turns[0]}])[0] for s in samples]
    for model in engines.values():
        model.warm_up(batch_sizes=tuple(args.batch_sizes))
    tokens, seconds, outputs = defaultdict(int), defaultdict(float), {}
    runs = [(name, spec) for name in engines for spec in (False, True)]
    rotation = 0
    for b in args.batch_sizes:
        for start in range(0, len(prompts), b):
            group = prompts[start:start + b]
            rotation += 1
            for name, spec in runs[rotation % len(runs):] + runs[:rotation % len(runs)]:
                begin = time.perf_counter()
                outs = engines[name].generate(group, max_new_tokens=args.max_new_tokens, speculate=spec)
                seconds[b, name, spec] += time.perf_counter() - begin
                tokens[b, name, spec] += sum(len(o.tokens) for o in outs)
                outputs.setdefault((b, name, spec), []).extend(o.tokens for o in outs)
    rows = [{"batch_size": b, "attention": name, "mode": "kangaroo" if spec else "vanilla",
             "tokens_per_s": tokens[b, name, spec] / seconds[b, name, spec],
             "same_as_other": sum(x == y for x, y in zip(outputs[b, name, spec],
                                                         outputs[b, "reference" if name == "grouped" else "grouped",
                                                                 spec]))}
            for b in args.batch_sizes for name, spec in runs]
    result = {"command": "python bench/batch_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {**benchmark.machine_info(), **git_info(), "cpu_flags": cpu_flags()},
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"B={r['batch_size']:>2} {r['attention']:>9} {r['mode']:>8}: {r['tokens_per_s']:6.1f} tokens/s "
              f"(= other {r['same_as_other']}/{len(prompts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

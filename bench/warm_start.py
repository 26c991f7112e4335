"""How long a process takes until its decode steps are ready, and how fast they decode, with the step cache.

    python bench/warm_start.py [--output bench/results/warm-start-cpu.json] [--max-new-tokens 64]

Each phase is a process of its own over the embedded model in bfloat16 (the CPU default: inductor backend):
``cold``, ``kf.load()`` and ``warm_up()`` over an empty step cache (a temporary folder: every step is exported
and compiled into a package); ``warm``, the same in a later process, which loads the packages; then ``decode``: one
process with both the packaged steps (from that cache) and steps compiled in the process (``step_cache=False``, the
engine before the cache), timing greedy decodes of the same prompts with each, interleaved, vanilla and Kangaroo,
and checking that both give the same tokens (and timing the in-process compile: ``decode.warm_up_s``). Decode
speed is new tokens over the decode seconds (prefill apart).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Explain RoPE.", "Write a haiku about the sea.", "What is 17 times 23? Show the steps.",
           "Translate into French: the weather is nice today and we will walk to the market."]

READY = """
import json, sys, time
t0 = time.perf_counter()
import kangaroo_fast as kf
m = kf.load(step_cache=sys.argv[1])
t1 = time.perf_counter()
m.warm_up()
t2 = time.perf_counter()
steps = [(s.built, s.loaded) for s in m.engine.steps.graphs.values()]
print(json.dumps({"import_and_load_s": t1 - t0, "warm_up_s": t2 - t1, "ready_s": t2 - t0,
                  "built": sum(b for b, _l in steps), "loaded": sum(l for _b, l in steps)}))
"""

DECODE = """
import json, sys
import kangaroo_fast as kf
prompts, n, rounds = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
models = {"packaged": kf.load(step_cache=sys.argv[1]), "compiled_in_process": kf.load(step_cache=False)}
warm_up_s = {name: m.warm_up() for name, m in models.items()}  # the packaged ones load from the cache
totals = {(name, spec): [0, 0.0] for name in models for spec in (False, True)}
tokens = {}
for r in range(rounds):
    for p in prompts:
        for spec in (False, True):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                out = models[name].generate(p, max_new_tokens=n, speculate=spec)
                totals[name, spec][0] += out.stats.new_tokens - 1
                totals[name, spec][1] += out.stats.decode_s
                tokens.setdefault((name, spec, p), out.tokens)
rows = [{"steps": name, "mode": "kangaroo" if spec else "vanilla", "decode_tokens_per_s": t / s}
        for (name, spec), (t, s) in totals.items()]
same = {("kangaroo" if spec else "vanilla"): sum(tokens["packaged", spec, p] == tokens["compiled_in_process", spec, p]
                                              for p in prompts) for spec in (False, True)}
print(json.dumps({"rows": rows, "same_tokens": same, "prompts": len(prompts), "warm_up_s": warm_up_s}))
"""


def run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"the phase failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "warm-start-cpu.json")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from report import git_info

    from kangaroo_fast.benchmark import machine_info
    from kangaroo_fast.step_cache import cpu_flags

    with tempfile.TemporaryDirectory(prefix="kangaroo-steps-") as cache:
        started = time.perf_counter()
        cold = run(READY, cache)
        warm = run(READY, cache)
        decode = run(DECODE, cache, json.dumps(PROMPTS), str(args.max_new_tokens), str(args.rounds))
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    result = {"command": "python bench/warm_start.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {**machine_info(), **git_info(), "cpu_flags": cpu_flags()},
              "cold": cold, "warm": warm, "decode": decode, "cache_bytes": size,
              "max_new_tokens": args.max_new_tokens, "seconds": time.perf_counter() - started}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("cold", "warm", "decode", "cache_bytes")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Settings of the Kangaroo draft inside vLLM, side by side: one vLLM engine per setting, each in its own process
(``kangaroo_fast/benchmark/vllm_peer.py``), all alive at once, the prompts interleaved with the order rotating, greedy.

    python bench/vllm_tune.py --split tune --per-category 3 \
        --setting plain=none \
        --setting 'ngram10={"method": "ngram", "num_speculative_tokens": 10, "prompt_lookup_min": 2, "prompt_lookup_max": 3}' \
        --setting 'e6k10a4={"threshold": 0.6, "num_speculative_tokens": 10, "adapter_steps": 4}'

A setting is ``name=none`` (vLLM without speculation), a vLLM ``speculative_config`` with a "method", or keyword
arguments of ``kangaroo_fast.vllm.config``. The first setting is the baseline of the ratios. Every engine costs about
3-4 GB of RAM with ``VLLM_CPU_KVCACHE_SPACE=1``: five fit in 24 GB. Prints a markdown table (tokens/s, ratio to the
first, verification steps with drafts, accepted drafts per such step, the ratio per category) and writes it with
``--output``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_setting(text: str) -> tuple[str, dict | None]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise ValueError(f"setting {text!r} must be name=none or name=<JSON object>")
    return name, None if value == "none" else json.loads(value)


def speculative_config(spec: dict | None) -> dict | None:
    import kangaroo_fast.vllm as kv

    if spec is None or "method" in spec:
        return spec
    return kv.config(**spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", required=True, help="name=none | name=<JSON>; repeatable")
    parser.add_argument("--split", default="tune", choices=["tune", "report", "all"])
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = dict(parse_setting(s) for s in args.setting)

    from transformers import AutoTokenizer

    from kangaroo_fast.benchmark import load_prompts, per_category, select_split
    from kangaroo_fast.models import default_model_dir
    from kangaroo_fast.benchmark.vllm_peer import _Worker

    path = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = per_category(select_split(load_prompts(all_turns=False), args.split), args.per_category)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": s.turns[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for s in samples]
    workers = {}
    try:
        for name, spec in settings.items():
            config = speculative_config(spec)
            kwargs = {"model": path, "dtype": args.dtype, "max_model_len": 2048, "max_num_seqs": 1, "seed": 0,
                      "speculative_config": config}
            if config is not None:
                kwargs["per_request_spec_decode_metrics"] = "detailed"
            workers[name] = _Worker(name, kwargs)
            workers[name].generate([prompts[0]], {"temperature": 0.0, "max_tokens": 16})  # warm-up
        table = run(workers, samples, prompts, args.max_new_tokens)
    finally:
        for worker in workers.values():
            worker.close()
    header = (f"`python bench/vllm_tune.py {' '.join(_quoted(a) for a in (argv or sys.argv[1:]))}`\n\n"
              f"{len(samples)} prompts ({args.split} split, first turns), {args.max_new_tokens} new tokens, "
              f"{args.dtype}, greedy, one request at a time.\n\n")
    print(header + table)
    if args.output:
        args.output.write_text(header + table)
    return 0


def _quoted(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}\"") else arg


def run(workers: dict, samples, prompts, max_new_tokens: int) -> str:
    names = list(workers)
    totals = {n: {"tokens": 0, "seconds": 0.0, "steps": 0, "accepted": 0} for n in names}
    per_category: dict[tuple[str, str], list[float]] = {}
    params = {"temperature": 0.0, "max_tokens": max_new_tokens, "detokenize": False}
    for i, (sample, prompt) in enumerate(zip(samples, prompts)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            outputs, seconds = workers[name].generate([prompt], params)
            out, t = outputs[0], totals[name]
            t["tokens"] += len(out["tokens"])
            t["seconds"] += seconds
            if out["drafted"] is not None:
                t["steps"] += sum(d > 0 for d in out["drafted"])
                t["accepted"] += sum(out["accepted"])
            c = per_category.setdefault((name, sample.category), [0, 0.0])
            c[0] += len(out["tokens"])
            c[1] += seconds
    categories = sorted({s.category for s in samples})
    rate = lambda n: totals[n]["tokens"] / totals[n]["seconds"]  # noqa: E731
    cat_rate = lambda n, c: per_category[n, c][0] / per_category[n, c][1]  # noqa: E731
    lines = [f"| setting | tokens/s | × {names[0]} | steps with drafts | accepted per such step | "
             + " | ".join(categories) + " |", "|---" * (5 + len(categories)) + "|"]
    for n in names:
        t = totals[n]
        lines.append(f"| {n} | {rate(n):.1f} | {rate(n) / rate(names[0]):.3f} | {t['steps']} | "
                     f"{t['accepted'] / max(t['steps'], 1):.2f} | "
                     + " | ".join(f"{cat_rate(n, c) / cat_rate(names[0], c):.2f}" for c in categories) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

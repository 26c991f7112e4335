"""The benchmark's runs: every method on the same prompts, interleaved per prompt with the order rotating (so that
machine drift hits all of them alike), and the batch-size axis; each run's machine and versions."""
from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch

from .methods import ADAPTER_METHODS, METHODS, Methods, check_methods
from .prompts import Sample, chat_encoder
from .report import summarise
from .vllm_peer import PEER_METHODS, VLLMPeer, check_peer_methods, vllm_version

# relative to the working directory: the checkout's bench/results when run from its root (`make bench`)
DEFAULT_OUTPUT_DIR = Path("bench") / "results"


def machine_info() -> dict:
    """The machine and the library versions, for every results file. The source's git commit is not the library's
    to know (an installed wheel has none): the bench tooling of the checkout adds it (``bench/report.py``)."""
    import transformers

    from .. import __version__

    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "kangaroo_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["vllm"] = vllm_version()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_benchmark(model, samples: list[Sample], methods: Iterable[str] = METHODS, max_new_tokens: int = 128,
                  settings: dict | None = None, encode: Callable[[list[dict]], torch.Tensor] | None = None,
                  decode: Callable[[list[int]], str] | None = None, prompt_lookup_tokens: int = 10,
                  progress: bool = False) -> dict:
    """Decode every turn of every sample with every method, interleaved; return records and summaries.

    A later turn of a multi-turn sample sees the earlier turns answered by ``hf`` (the same context for every
    method); it needs ``decode`` (token ids -> text), the tokenizer's by default.
    """
    methods = check_methods(methods)
    if not samples:
        raise ValueError("no prompts to benchmark")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not isinstance(prompt_lookup_tokens, int) or prompt_lookup_tokens < 1:
        raise ValueError(f"prompt_lookup_tokens={prompt_lookup_tokens!r} must be an integer >= 1")
    settings = {**model.default_settings(), **(settings or {})}
    from ..config import DecodeSettings

    DecodeSettings(**settings, max_new_tokens=max_new_tokens).validate(model.config.num_layers)  # before any run
    for method in ADAPTER_METHODS:
        if method in methods and model.adapter is None:
            raise ValueError(f"the {method} method needs a model with an adapter")
    encode = encode or chat_encoder(model)
    if decode is None and model.tokenizer is not None:
        decode = lambda tokens: model.tokenizer.decode(tokens, skip_special_tokens=True)
    runner = Methods(model, max_new_tokens, settings, prompt_lookup_tokens)
    if set(methods) & set(PEER_METHODS):
        runner.peer = VLLMPeer(model, max_new_tokens, settings, prompt_lookup_tokens)
    try:
        return _run(runner, model, samples, methods, max_new_tokens, settings, encode, decode, prompt_lookup_tokens,
                    progress)
    finally:
        if runner.peer is not None:
            runner.peer.close()


def _run(runner: Methods, model, samples, methods, max_new_tokens, settings, encode, decode, prompt_lookup_tokens,
         progress) -> dict:
    """``run_benchmark`` once its arguments are checked and its runner is built."""
    first_ids = [encode([{"role": "user", "content": s.turns[0]}]) for s in samples]
    warm = min(first_ids, key=lambda t: t.shape[1])
    if "hf_compile" in methods:
        # room for the longest conversation: all its user turns plus an answer of max_new_tokens to each
        longest = max(encode([{"role": "user", "content": t} for t in s.turns]).shape[1] + len(s.turns) * (
            max_new_tokens + 16) for s in samples)
        runner.prepare_compile([max(first_ids, key=lambda t: t.shape[1]), warm], longest)
    active = [m for m in methods if m not in runner.unavailable]
    # compiled decode steps compile here, outside the timings (0 s where nothing is compiled)
    warm_up_s = model.warm_up(exit_layer=settings["exit_layer"])
    for name in active:  # one untimed call each: lazy initialisation stays out of the numbers
        runner.run(name, warm)

    from tqdm.auto import tqdm

    records = []
    rotation = 0
    for sample in tqdm(samples, desc="prompts", disable=not progress):
        messages: list[dict] = []
        turns = sample.turns if decode is not None else sample.turns[:1]
        for turn_index, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            ids = encode(messages)
            order = active[rotation % len(active):] + active[:rotation % len(active)]
            rotation += 1
            results = {name: runner.run(name, ids) for name in order}
            baseline = results["hf"].tokens
            for name in active:
                r = results[name]
                first_diff = _first_difference(r.tokens, baseline)
                records.append({"id": sample.id, "category": sample.category, "turn": turn_index, "method": name,
                                "prompt_tokens": ids.shape[1], "new_tokens": len(r.tokens), "seconds": r.seconds,
                                "target_forwards": r.target_forwards, "rounds": r.rounds,
                                "draft_steps": r.draft_steps, "lookup_drafts": r.lookup_drafts,
                                "drafted_at": r.drafted_at,
                                "accepted_at": r.accepted_at, "same_as_hf": first_diff is None,
                                "first_difference": first_diff})
            if turn_index + 1 < len(turns):
                messages.append({"role": "assistant", "content": decode(baseline)})

    return {"methods": active, "unavailable": runner.unavailable, "compile_s": runner.compile_s,
            "warm_up_s": warm_up_s, "backend": model.engine.ops.name,
            "settings": {**settings, "max_new_tokens": max_new_tokens, "prompt_lookup_num_tokens": prompt_lookup_tokens,
                         "hf_early_exit": {"num_assistant_tokens": settings["max_draft_steps"],
                                           "assistant_confidence_threshold": settings["threshold"],
                                           "num_assistant_tokens_schedule": "constant"},
                         "static_cache_len": runner.static_cache_len,
                         "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
                         **({"vllm": runner.peer.describe()} if runner.peer is not None else {})},
            "summary": summarise(records, active), "records": records}


def _first_difference(tokens: list[int], reference: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))



BATCH_METHODS = ("vanilla", "kangaroo")


def run_batch_sizes(model, samples: list[Sample], batch_sizes: Iterable[int], max_new_tokens: int,
                    settings: dict | None = None, encode: Callable[[list[dict]], torch.Tensor] | None = None,
                    progress: bool = False, peers: Iterable[str] = (), prompt_lookup_tokens: int = 10) -> dict:
    """This engine's vanilla mode and Kangaroo on the samples' first turns, decoded in batches of each size, and
    the vLLM methods in ``peers`` (``vllm_peer.py``) with the same groups as concurrent requests.

    For batch size B the prompts go in consecutive groups of B (the last group may be smaller); per group the
    methods run one after the other (the order rotating), each as one ``generate`` call on the whole group, timed
    from the call to its return. Reports per B and method: tokens/s (all new tokens over all seconds), the speedup
    over vanilla at the same B, the speedup over vanilla at batch 1, and how many sequences equal the
    same method's batch-1 output token for token (float32 guarantees it; bf16 may round differently per batch).
    """
    sizes = list(batch_sizes)
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch size {b!r} must be an integer >= 1")
    if not samples:
        raise ValueError("no prompts to benchmark")
    if model.adapter is None:
        raise ValueError("the batch-size axis compares with Kangaroo: the model needs an adapter")
    sizes = sorted(set(sizes) | {1})  # batch 1: the reference for equality and for the speedup over batch 1
    settings = {**model.default_settings(), **(settings or {})}
    encode = encode or chat_encoder(model)
    prompts = [encode([{"role": "user", "content": s.turns[0]}])[0] for s in samples]
    peers = [m for m in PEER_METHODS if m in set(peers)]
    check_peer_methods(peers)
    methods = list(BATCH_METHODS) + peers
    model.warm_up(sizes, exit_layer=settings["exit_layer"])  # compiled steps compile here (untimed)
    model.generate(prompts[:min(2, len(prompts))], max_new_tokens=2, speculate=True, **settings)  # warm-up
    peer = VLLMPeer(model, max_new_tokens, settings, prompt_lookup_tokens, max_num_seqs=max(sizes)) if peers else None
    try:
        outputs, seconds = _batch_runs(model, prompts, sizes, methods, max_new_tokens, settings, peer, progress)
    finally:
        if peer is not None:
            peer.close()
    rows = []
    for b in sizes:
        for method in methods:
            tokens = sum(len(t) for t in outputs[b, method])
            rate = tokens / seconds[b, method] if seconds[b, method] > 0 else 0.0
            rows.append({"batch_size": b, "method": method, "new_tokens": tokens, "seconds": seconds[b, method],
                         "tokens_per_s": rate,
                         "same_as_batch_1": sum(x == y for x, y in zip(outputs[b, method], outputs[1, method]))})
    by_key = {(r["batch_size"], r["method"]): r for r in rows}
    for r in rows:
        vanilla_same_b, vanilla_1 = by_key[r["batch_size"], "vanilla"], by_key[1, "vanilla"]
        r["speedup_vs_vanilla"] = r["tokens_per_s"] / vanilla_same_b["tokens_per_s"]
        r["speedup_vs_vanilla_batch_1"] = r["tokens_per_s"] / vanilla_1["tokens_per_s"]
        if "vllm" in methods:
            r["speedup_vs_vllm"] = r["tokens_per_s"] / by_key[r["batch_size"], "vllm"]["tokens_per_s"]
    return {"prompts": len(prompts), "batch_sizes": sizes, "max_new_tokens": max_new_tokens, "rows": rows,
            **({"vllm": peer.describe()} if peer is not None else {})}


def _batch_runs(model, prompts, sizes, methods, max_new_tokens, settings, peer, progress):
    """``run_batch_sizes``' decoding: per size, per group, every method in rotating order; outputs and seconds."""
    from tqdm.auto import tqdm

    if peer is not None:
        for method in methods[len(BATCH_METHODS):]:  # start each engine (and its compile) before any timing
            peer.run_group(method, [prompts[0].tolist()])
    outputs: dict[tuple[int, str], list[list[int]]] = {}
    seconds: dict[tuple[int, str], float] = defaultdict(float)
    rotation = 0
    for b in tqdm(sizes, desc="batch sizes", disable=not progress):
        for start in range(0, len(prompts), b):
            group = prompts[start:start + b]
            order = methods[rotation % len(methods):] + methods[:rotation % len(methods)]
            rotation += 1
            for method in order:
                if method in BATCH_METHODS:
                    begin = time.perf_counter()
                    outs = model.generate(group, max_new_tokens=max_new_tokens, speculate=method == "kangaroo",
                                          **settings)
                    seconds[b, method] += time.perf_counter() - begin
                    tokens = [o.tokens for o in outs]
                else:
                    tokens, took = peer.run_group(method, [p.tolist() for p in group])
                    seconds[b, method] += took
                outputs.setdefault((b, method), []).extend(tokens)
    return outputs, seconds


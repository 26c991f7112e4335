"""End-to-end benchmark (``kangaroo-fast bench``) and settings sweep (``kangaroo-fast tune``).

Eight methods decode the same prompts with the same model, dtype and ``max_new_tokens``, one after another for each
prompt (the order rotating from prompt to prompt) so that machine drift hits all of them alike:

    hf              HF ``generate``, greedy: the baseline every speedup is quoted against
    hf_compile      HF ``generate`` with a static cache and a ``torch.compile``-d forward (compile time apart)
    hf_early_exit   HF assisted generation with ``assistant_early_exit`` at the Kangaroo exit layer (and its γ, η)
    hf_prompt_lookup HF prompt-lookup decoding
    vanilla         this engine without drafting
    kangaroo        this engine with Kangaroo drafting
    kangaroo_paper  the same without the context lookup: the adapter's drafts alone, the paper's drafting
    lookup          this engine with the context lookup as its only drafter (prompt-lookup decoding, no adapter)

and, when vLLM is installed, vLLM without and with its n-gram speculation and with Kangaroo drafts (``vllm``,
``vllm_ngram``, ``vllm_kangaroo``: ``kangaroo_fast/vllm/bench.py``).

Definitions (per method, per category and overall):
    tokens/s        new tokens / wall-clock seconds of the generate calls (prefill included)
    speedup         tokens/s of the method / tokens/s of ``hf`` (or of ``vanilla``), on the same prompts
    #MAT            mean tokens per target forward after the prefill: (new tokens - 1) / (target forwards - 1);
                    1.0 for greedy decoding. Target forwards of HF methods are counted by a hook on the last decoder
                    layer (an early-exit draft never reaches it); Kangaroo's are its verification rounds.
    acceptance      per draft position j: rounds that accepted a (j+1)-th draft / rounds that proposed one
    equality        every method's tokens are compared with ``hf``'s; a differing output is flagged, with the
                    index of its first differing token.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .vllm.bench import PEER_LABELS, PEER_METHODS, VLLMPeer, check_peer_methods, vllm_available, vllm_version

# the prompt set ships in the package, so an installed wheel benchmarks without the source checkout
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
# relative to the working directory: the checkout's bench/results when run from its root (`make bench`)
DEFAULT_OUTPUT_DIR = Path("bench") / "results"

METHODS = ("hf", "hf_compile", "hf_early_exit", "hf_prompt_lookup", "vanilla", "kangaroo", "kangaroo_paper",
           "lookup")
#: The methods that draft with the adapter; ``kangaroo_paper`` is the paper's drafting alone (no context lookup).
ADAPTER_METHODS = ("kangaroo", "kangaroo_paper")
METHOD_LABELS = {"hf": "HF greedy", "hf_compile": "HF static+compile", "hf_early_exit": "HF early-exit assisted",
                 "hf_prompt_lookup": "HF prompt lookup", "vanilla": "kangaroo_fast vanilla",
                 "kangaroo": "kangaroo_fast Kangaroo", "kangaroo_paper": "kangaroo_fast Kangaroo, paper drafting",
                 "lookup": "kangaroo_fast lookup only", **PEER_LABELS}
GREEDY_METHODS = ("hf", "hf_compile", "vanilla")


# ---- prompts ------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One benchmark item: an id, a category and its user turns (only the first is used unless asked); ``split``
    names the part of the prompt set it belongs to where the file says (None where it does not)."""

    id: str
    category: str
    turns: list[str]
    split: str | None = None


def _parse_jsonl(path: Path, id_key: str) -> list[Sample]:
    """Read ``path`` line by line; every problem is reported as ``path:line: what is wrong``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file {str(path)!r} does not exist")
    samples = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if id_key not in row:
            raise ValueError(f"{where}: missing {id_key!r}")
        if not isinstance(row[id_key], (int, str)) or isinstance(row[id_key], bool):
            raise ValueError(f"{where}: {id_key!r} must be an integer or a string, got {row[id_key]!r}")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings, got {turns!r}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise ValueError(f"{where}: turn {i} must be a non-empty string, got {turn!r}")
        category = row.get("category", "questions")
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{where}: 'category' must be a non-empty string, got {category!r}")
        split = row.get("split")
        if split is not None and (not isinstance(split, str) or not split.strip()):
            raise ValueError(f"{where}: 'split' must be a non-empty string where given, got {split!r}")
        sample_id = str(row[id_key])
        if sample_id in seen:
            raise ValueError(f"{where}: {id_key} {sample_id!r} repeats line {seen[sample_id]}")
        seen[sample_id] = number
        samples.append(Sample(sample_id, category, list(turns), split))
    if not samples:
        raise ValueError(f"{path}: no questions in the file")
    return samples


def load_questions(path: str | Path) -> list[Sample]:
    """A Spec-Bench ``question.jsonl`` (``question_id``, ``category``, ``turns``): the first turn of each."""
    return [Sample(s.id, s.category, s.turns[:1], s.split) for s in _parse_jsonl(Path(path), "question_id")]


def load_prompts(path: str | Path = DEFAULT_PROMPTS, all_turns: bool = True) -> list[Sample]:
    """This project's prompt set (``id``, ``category``, ``turns``, optionally ``split``); only the first turns
    unless ``all_turns``."""
    samples = _parse_jsonl(Path(path), "id")
    return samples if all_turns else [Sample(s.id, s.category, s.turns[:1], s.split) for s in samples]


# the shipped prompt set's two parts: settings are chosen on "tune" only, and the README reports "report"
SPLITS = ("report", "tune")


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    """The samples of ``split`` ("report", "tune", or "all" for every sample), in file order. A file that names no
    split at all is taken whole, whatever ``split`` says."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}, all")
    if split == "all" or all(s.split is None for s in samples):
        return samples
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        named = sorted({s.split for s in samples if s.split is not None})
        raise ValueError(f"no prompts in split {split!r} (the file names {', '.join(named)})")
    return chosen


def per_category(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples of each category, in file order (all of them for None)."""
    if limit is None:
        return samples
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"per_category={limit!r} must be an integer >= 1")
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for sample in samples:
        if taken[sample.category] < limit:
            taken[sample.category] += 1
            chosen.append(sample)
    return chosen


# ---- machine ------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """The machine and the library versions, for every results file. The source's git commit is not the library's
    to know (an installed wheel has none): the bench tooling of the checkout adds it (``bench/report.py``)."""
    import transformers

    from . import __version__

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


# ---- methods ------------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    tokens: list[int]
    seconds: float
    target_forwards: int | None = None  # including the prefill
    rounds: int | None = None
    draft_steps: int | None = None
    lookup_drafts: int | None = None  # drafts copied from the context (Kangaroo's context lookup)
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)


class _ForwardCounter:
    """Counts forwards of the last decoder layer: full-model (target) forwards, never early-exit drafts."""

    def __init__(self, hf_model):
        self.count = 0
        self.layer = hf_model.model.layers[-1]

    def _hook(self, *_):
        self.count += 1

    @contextlib.contextmanager
    def counting(self):
        self.count = 0
        handle = self.layer.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


class Methods:
    """The six ways to decode a prompt, each returning the new tokens, its wall time and its statistics."""

    def __init__(self, model, max_new_tokens: int, settings: dict, prompt_lookup_tokens: int = 10):
        self.model = model
        self.hf = model.hf_model
        self.max_new_tokens = max_new_tokens
        self.settings = dict(settings)
        self.prompt_lookup_tokens = prompt_lookup_tokens
        eos = sorted(model.eos_ids())
        pad = self.hf.generation_config.pad_token_id
        self.hf_kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "eos_token_id": eos or None,
                          "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
                          "temperature": None, "top_p": None, "top_k": None}
        self.counter = _ForwardCounter(self.hf)
        self.compiled_forward = None
        self.compile_s: float | None = None
        self.static_cache_len: int | None = None
        self.unavailable: dict[str, str] = {}
        self.peer: VLLMPeer | None = None

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    def _timed(self, fn: Callable):
        self._sync()
        start = time.perf_counter()
        out = fn()
        self._sync()
        return out, time.perf_counter() - start

    def _hf_generate(self, ids: torch.Tensor, count: bool = True, **extra) -> MethodResult:
        kwargs = {**self.hf_kwargs, **extra}
        mask = torch.ones_like(ids)
        with torch.no_grad(), (self.counter.counting() if count else contextlib.nullcontext()):
            out, seconds = self._timed(lambda: self.hf.generate(ids, attention_mask=mask, **kwargs))
        return MethodResult(out[0, ids.shape[1]:].tolist(), seconds,
                            target_forwards=self.counter.count if count else None)

    def hf_greedy(self, ids):
        return self._hf_generate(ids)

    def hf_early_exit(self, ids):
        """Self-speculation without an adapter, with Kangaroo's own settings: at most γ drafts per round, drafting
        stops below η, and a constant schedule (HF's adaptive ones carry state from call to call)."""
        return self._hf_generate(ids, assistant_early_exit=self.settings["exit_layer"],
                                 num_assistant_tokens=self.settings["max_draft_steps"],
                                 assistant_confidence_threshold=self.settings["threshold"],
                                 num_assistant_tokens_schedule="constant")

    def hf_prompt_lookup(self, ids):
        return self._hf_generate(ids, prompt_lookup_num_tokens=self.prompt_lookup_tokens)

    @contextlib.contextmanager
    def _compiled(self):
        """Swap the compiled forward in for one call, so that no other method runs it."""
        self.hf.forward = self.compiled_forward
        try:
            yield
        finally:
            del self.hf.forward

    def prepare_compile(self, warmup_ids: list[torch.Tensor], static_cache_len: int) -> None:
        """Compile the forward and warm it up on ``warmup_ids`` (two prompt lengths, so that later prompts reuse a
        dynamic-length prefill graph); the static cache has ``static_cache_len`` positions for every call, so it
        never changes shape. The time spent is ``compile_s``. Where the platform cannot compile, the reason is
        kept in ``unavailable`` and the method is skipped."""
        self.static_cache_len = static_cache_len
        start = time.perf_counter()
        try:
            mode = "reduce-overhead" if self.model.device.type == "cuda" else "default"
            self.compiled_forward = torch.compile(self.hf.forward, mode=mode)
            for ids in warmup_ids:
                self.hf_compile(ids)
        except Exception as err:  # noqa: BLE001 - any compiler failure means "not available here", recorded
            self.compiled_forward = None
            first_line = str(err).splitlines()[0][:300] if str(err) else ""
            self.unavailable["hf_compile"] = f"{type(err).__name__}: {first_line}"
        self.compile_s = time.perf_counter() - start

    def hf_compile(self, ids):
        if self.compiled_forward is None:
            raise RuntimeError("hf_compile needs prepare_compile() first")
        with self._compiled():
            result = self._hf_generate(ids, count=False, cache_implementation="static",
                                         max_cache_len=self.static_cache_len, disable_compile=True)
        result.target_forwards = len(result.tokens)  # greedy: one forward per token
        return result

    def _engine(self, ids, speculate: bool, drafter: str = "kangaroo", **overrides) -> MethodResult:
        settings = {**self.settings, **overrides} if speculate else {}
        out, seconds = self._timed(lambda: self.model.generate(ids, max_new_tokens=self.max_new_tokens,
                                                               speculate=speculate, drafter=drafter, **settings))
        s = out.stats
        return MethodResult(out.tokens, seconds, target_forwards=s.rounds + 1, rounds=s.rounds,
                            draft_steps=s.draft_steps, lookup_drafts=s.lookup_drafts, drafted_at=list(s.drafted_at),
                            accepted_at=list(s.accepted_at))

    def vanilla(self, ids):
        return self._engine(ids, speculate=False)

    def kangaroo(self, ids):
        return self._engine(ids, speculate=True)

    def kangaroo_paper(self, ids):
        """The paper's double early exit alone: the adapter's drafts, no context lookup."""
        return self._engine(ids, speculate=True, lookup=0)

    def lookup(self, ids):
        return self._engine(ids, speculate=True, drafter="lookup")

    def run(self, name: str, ids: torch.Tensor) -> MethodResult:
        if name in PEER_METHODS:
            return self.peer.run(name, ids)
        return {"hf": self.hf_greedy, "hf_compile": self.hf_compile, "hf_early_exit": self.hf_early_exit,
                "hf_prompt_lookup": self.hf_prompt_lookup, "vanilla": self.vanilla,
                "kangaroo": self.kangaroo, "kangaroo_paper": self.kangaroo_paper, "lookup": self.lookup}[name](ids)


def default_methods() -> list[str]:
    """Every method; the vLLM ones only where vLLM can be imported."""
    return list(METHODS) + (list(PEER_METHODS) if vllm_available() else [])


def check_methods(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    known = METHODS + PEER_METHODS
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}: choose from {', '.join(known)}")
    if "hf" not in methods:
        raise ValueError("the methods must include 'hf': every output is checked against it")
    check_peer_methods(methods)
    return [m for m in known if m in methods]


# ---- the run ------------------------------------------------------------------------------------------------------
def chat_encoder(model) -> Callable[[list[dict]], torch.Tensor]:
    """messages -> [1, n] ids through the tokenizer's chat template (plain text when it has none)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass an encoder for its prompts")

    def encode(messages: list[dict]) -> torch.Tensor:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.int64, device=model.device)

    return encode


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
    from .config import DecodeSettings

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


def summarise(records: list[dict], methods: list[str]) -> dict:
    """{category (and "overall"): {method: statistics}}; see the module docstring for the definitions."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    groups["overall"] = list(records)
    summary = {}
    for category, rows in groups.items():
        per_method = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            tokens = sum(r["new_tokens"] for r in mine)
            seconds = sum(r["seconds"] for r in mine)
            forwards = [r for r in mine if r["target_forwards"] is not None]
            after_prefill = sum(r["new_tokens"] - 1 for r in forwards)
            steps = sum(r["target_forwards"] - 1 for r in forwards)
            stats = {"samples": len(mine), "new_tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                     "mean_accepted": after_prefill / steps if steps > 0 else None,
                     "same_as_hf": sum(r["same_as_hf"] for r in mine),
                     "mismatches": [f"{r['id']}#{r['turn']}@{r['first_difference']}" for r in mine
                                    if not r["same_as_hf"]]}
            rounds = sum(r["rounds"] or 0 for r in mine)
            if method in (*ADAPTER_METHODS, "lookup", "vllm_ngram", "vllm_kangaroo") and rounds:
                width = max((len(r["drafted_at"]) for r in mine), default=0)
                drafted = [sum(r["drafted_at"][j] for r in mine if j < len(r["drafted_at"])) for j in range(width)]
                accepted = [sum(r["accepted_at"][j] for r in mine if j < len(r["accepted_at"])) for j in range(width)]
                stats["acceptance_rate"] = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
                drafts = sum(r["draft_steps"] for r in mine)
                stats["drafts_per_round"] = drafts / rounds
                stats["copied_share"] = sum(r.get("lookup_drafts") or 0 for r in mine) / drafts if drafts else 0.0
            per_method[method] = stats
        for method, stats in per_method.items():
            for base in ("hf", "vanilla"):
                ref = per_method.get(base)
                stats[f"speedup_vs_{base}"] = (stats["tokens_per_s"] / ref["tokens_per_s"]
                                               if ref and ref["tokens_per_s"] > 0 else None)
        summary[category] = per_method
    return summary


# ---- output -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The overall table (one row per method) and a speedup-over-HF matrix (methods x categories)."""
    summary, methods = result["summary"], result["methods"]
    overall = summary["overall"]
    lines = ["| method | tokens/s | × HF greedy | × vanilla | #MAT | drafts/round | acceptance per position "
             "| = HF greedy |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        s = overall[m]
        rates = " ".join(f"{a:.2f}" for a in s.get("acceptance_rate", [])) or "–"
        same = f"{s['same_as_hf']}/{s['samples']}" + ("" if s["same_as_hf"] == s["samples"] else " **MISMATCH**")
        lines.append(f"| {METHOD_LABELS[m]} | {s['tokens_per_s']:.1f} | {_fmt(s['speedup_vs_hf'])} | "
                     f"{_fmt(s['speedup_vs_vanilla'])} | {_fmt(s['mean_accepted'])} | "
                     f"{_fmt(s.get('drafts_per_round'))} | {rates} | {same} |")
    for m, reason in result.get("unavailable", {}).items():
        lines.append(f"| {METHOD_LABELS[m]} | not available on this platform: {reason} | | | | | | |")
    categories = [c for c in summary if c != "overall"] + ["overall"]
    header = ["| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    lines += ["", "Speedup over HF greedy (tokens/s ratio) and #MAT per category:", "", *header]
    for m in methods:
        cells = [f"{_fmt(summary[c][m]['speedup_vs_hf'])} ({_fmt(summary[c][m]['mean_accepted'])})"
                 for c in categories]
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Tokens/s per category:", "", *header]
    for m in methods:
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(f"{summary[c][m]['tokens_per_s']:.1f}"
                                                             for c in categories) + " |")
    s = result["settings"]
    notes = [f"{s['dtype']} on {s['device']}, max_new_tokens={s['max_new_tokens']}"]
    if {*ADAPTER_METHODS, "hf_early_exit"} & set(methods):
        notes[0] += f", exit layer {s['exit_layer']}"
    if set(ADAPTER_METHODS) & set(methods):
        notes[0] += f", η={s['threshold']}, γ={s['max_draft_steps']}, context lookup {s.get('lookup', 0)}"
    if "kangaroo_paper" in methods:
        notes[0] += " (paper drafting: none)"
    if "hf_prompt_lookup" in methods:
        notes[0] += f", prompt lookup {s['prompt_lookup_num_tokens']} tokens"
    notes[0] += (". tokens/s: all new tokens over all seconds of the generate calls (prefill included); "
                 "#MAT: tokens per target forward after the prefill.")
    if result.get("compile_s") is not None and "hf_compile" in methods:
        notes.append(f"torch.compile warm-up (not in the timings): {result['compile_s']:.1f} s.")
    if result.get("warm_up_s"):
        notes.append(f"This engine's {result.get('backend', '')} backend compiled its decode steps before the timings: "
                     f"{result['warm_up_s']:.1f} s.")
    mismatched = [m for m in methods if overall[m]["mismatches"]]
    if mismatched:
        notes.append("Outputs differing from HF greedy (id#turn@first differing token): " + "; ".join(
            f"{METHOD_LABELS[m]}: {', '.join(overall[m]['mismatches'])}" for m in mismatched))
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    if result.get("batch"):
        text += "\n" + batch_markdown(result["batch"])
    return text


def write_results(result: dict, output_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem``.json (everything) and ``stem``.md (the tables); the plot and the README block are the bench
    tooling's (``bench/report.py``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(result))
    return paths


# ---- batch sizes --------------------------------------------------------------------------------------------------
BATCH_METHODS = ("vanilla", "kangaroo")


def run_batch_sizes(model, samples: list[Sample], batch_sizes: Iterable[int], max_new_tokens: int,
                    settings: dict | None = None, encode: Callable[[list[dict]], torch.Tensor] | None = None,
                    progress: bool = False, peers: Iterable[str] = (), prompt_lookup_tokens: int = 10) -> dict:
    """This engine's vanilla mode and Kangaroo on the samples' first turns, decoded in batches of each size, and
    the vLLM methods in ``peers`` (``vllm/bench.py``) with the same groups as concurrent requests.

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


def batch_markdown(batch: dict) -> str:
    with_vllm = any("speedup_vs_vllm" in r for r in batch["rows"])
    lines = [f"Batch sizes ({batch['prompts']} first turns, {batch['max_new_tokens']} new tokens; speedups are "
             "tokens/s ratios; a vLLM method's batch is that many concurrent requests):", "",
             "| batch | method | tokens/s | × vanilla (same batch) | × vanilla batch 1 |"
             + (" × vLLM (same batch) |" if with_vllm else "") + " = batch-1 output |",
             "|---|---|---|---|---|" + ("---|" if with_vllm else "") + "---|"]
    for r in batch["rows"]:
        lines.append(f"| {r['batch_size']} | {METHOD_LABELS[r['method']]} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_vanilla']:.2f} | {r['speedup_vs_vanilla_batch_1']:.2f} | "
                     + (f"{r['speedup_vs_vllm']:.2f} | " if with_vllm else "")
                     + f"{r['same_as_batch_1']}/{batch['prompts']} |")
    return "\n".join(lines) + "\n"


# ---- tune ---------------------------------------------------------------------------------------------------------
def run_tune(models: dict[str, object], samples: list[Sample], thresholds: Iterable[float], steps: Iterable[int],
             max_new_tokens: int, encode: Callable[[list[dict]], torch.Tensor], progress: bool = False,
             lookups: Iterable[int] = (0,)) -> dict:
    """Kangaroo against the same engine's vanilla mode over the grid adapters x thresholds x max_draft_steps x
    context lookups (``lookup.py``; 0: off).

    ``models`` maps an adapter name to a KangarooModel (all on the same base model). For every prompt (first turn)
    vanilla runs once, then every setting; speedup = vanilla seconds / Kangaroo seconds summed over the
    prompts of a category. Returns the rows and the best setting per category and overall.
    """
    thresholds, steps, lookups = list(thresholds), list(steps), list(lookups)
    if not models or not thresholds or not steps or not lookups:
        raise ValueError("tune needs at least one adapter, one threshold, one max_draft_steps and one lookup value")
    grid = list(itertools.product(models, thresholds, steps, lookups))
    from .config import DecodeSettings

    for name, threshold, max_steps, lookup in grid:  # a bad value fails here, not half-way through the sweep
        model = models[name]
        if model.adapter is None:
            raise ValueError(f"tune: the model for {name!r} has no adapter")
        DecodeSettings(model.adapter.config.exit_layer, threshold, max_steps, max_new_tokens,
                       lookup).validate(model.config.num_layers)
    first = next(iter(models.values()))
    from tqdm.auto import tqdm

    totals: dict = defaultdict(lambda: {"seconds": 0.0, "tokens": 0, "rounds": 0, "drafts": 0, "mismatches": 0})
    vanilla_s: dict[str, float] = defaultdict(float)
    prompt_ids = [encode([{"role": "user", "content": s.turns[0]}]) for s in samples]
    warm = min(prompt_ids, key=lambda t: t.shape[1])
    first.generate(warm, max_new_tokens=4, speculate=False)
    for model in models.values():
        model.warm_up()
        model.generate(warm, max_new_tokens=4)
    for sample, ids in tqdm(list(zip(samples, prompt_ids)), desc="prompts", disable=not progress):
        vanilla = first.generate(ids, max_new_tokens=max_new_tokens, speculate=False)
        for category in (sample.category, "overall"):
            vanilla_s[category] += vanilla.stats.time_s
        for name, threshold, max_steps, lookup in grid:
            out = models[name].generate(ids, max_new_tokens=max_new_tokens, threshold=threshold,
                                        max_draft_steps=max_steps, lookup=lookup)
            for category in (sample.category, "overall"):
                row = totals[(name, threshold, max_steps, lookup, category)]
                row["seconds"] += out.stats.time_s
                row["tokens"] += out.stats.new_tokens_after_prefill
                row["rounds"] += out.stats.rounds
                row["drafts"] += out.stats.draft_steps
                row["mismatches"] += int(out.tokens != vanilla.tokens)
    rows = []
    for (name, threshold, max_steps, lookup, category), t in totals.items():
        rows.append({"adapter": name, "exit_layer": models[name].adapter.config.exit_layer, "threshold": threshold,
                     "max_draft_steps": max_steps, "lookup": lookup, "category": category,
                     "speedup_vs_vanilla": vanilla_s[category] / t["seconds"] if t["seconds"] > 0 else 0.0,
                     "mean_accepted": t["tokens"] / t["rounds"] if t["rounds"] else 0.0,
                     "drafts_per_round": t["drafts"] / t["rounds"] if t["rounds"] else 0.0,
                     "mismatches_vs_vanilla": t["mismatches"]})
    best = {}
    for row in rows:
        if row["category"] not in best or row["speedup_vs_vanilla"] > best[row["category"]]["speedup_vs_vanilla"]:
            best[row["category"]] = row
    return {"rows": rows, "best": best, "max_new_tokens": max_new_tokens, "prompts": len(samples),
            "dtype": str(first.dtype).replace("torch.", ""), "device": str(first.device)}


def tune_markdown(result: dict) -> str:
    lines = ["| category | adapter | exit layer | η | γ | lookup | × vanilla | #MAT | drafts/round | ≠ vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [c for c in result["best"] if c != "overall"] + ["overall"]
    for category in order:
        b = result["best"][category]
        lines.append(f"| {category} | {b['adapter']} | {b['exit_layer']} | {b['threshold']} | {b['max_draft_steps']} "
                     f"| {b.get('lookup', 0)} | {b['speedup_vs_vanilla']:.2f} | {b['mean_accepted']:.2f} "
                     f"| {b['drafts_per_round']:.2f} "
                     f"| {b['mismatches_vs_vanilla']} |")
    lines += ["", "Every setting, overall (fastest first):", "",
              "| adapter | exit layer | η | γ | lookup | × vanilla | #MAT | drafts/round | ≠ vanilla |",
              "|---|---|---|---|---|---|---|---|---|"]
    overall = sorted((r for r in result["rows"] if r["category"] == "overall"), key=lambda r: -r["speedup_vs_vanilla"])
    for r in overall:
        lines.append(f"| {r['adapter']} | {r['exit_layer']} | {r['threshold']} | {r['max_draft_steps']} "
                     f"| {r.get('lookup', 0)} | {r['speedup_vs_vanilla']:.2f} | {r['mean_accepted']:.2f} "
                     f"| {r['drafts_per_round']:.2f} "
                     f"| {r['mismatches_vs_vanilla']} |")
    return "\n".join(lines) + "\n"

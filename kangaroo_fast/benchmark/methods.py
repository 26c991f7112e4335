"""The benchmark's methods: HF ``generate`` (greedy, compiled, early-exit assisted, prompt lookup) and this engine
(vanilla, Kangaroo, the paper's drafting, lookup only), each decoding one prompt and returning a ``MethodResult``;
the vLLM methods are ``vllm_peer.py``'s."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch

from .result import MethodResult
from . import vllm_peer
from .vllm_peer import PEER_LABELS, PEER_METHODS, VLLMPeer, check_peer_methods

METHODS = ("hf", "hf_compile", "hf_early_exit", "hf_prompt_lookup", "vanilla", "kangaroo", "kangaroo_paper",
           "lookup")
#: The methods that draft with the adapter; ``kangaroo_paper`` is the paper's drafting alone (no context lookup).
ADAPTER_METHODS = ("kangaroo", "kangaroo_paper")
METHOD_LABELS = {"hf": "HF greedy", "hf_compile": "HF static+compile", "hf_early_exit": "HF early-exit assisted",
                 "hf_prompt_lookup": "HF prompt lookup", "vanilla": "kangaroo_fast vanilla",
                 "kangaroo": "kangaroo_fast Kangaroo", "kangaroo_paper": "kangaroo_fast Kangaroo, paper drafting",
                 "lookup": "kangaroo_fast lookup only", **PEER_LABELS}
GREEDY_METHODS = ("hf", "hf_compile", "vanilla")


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
    return list(METHODS) + (list(PEER_METHODS) if vllm_peer.vllm_available() else [])


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


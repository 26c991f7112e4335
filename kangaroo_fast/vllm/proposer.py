"""The Kangaroo draft as a vLLM ``custom_class`` proposer (vLLM 0.32, V1 model runner).

vLLM builds the proposer in the worker process as ``Class(vllm_config)``, calls ``load_model(target_model)`` once
the target is loaded, and after every step that sampled tokens (``GPUModelRunner.propose_draft_token_ids``):

    propose(sampled_token_ids: list[list[int]],     # per batch row: the tokens this step emitted ([] = none)
            num_tokens_no_spec: np.ndarray,          # [max_num_reqs] committed tokens per row (prompt + output)
            token_ids_cpu: np.ndarray,               # [max_num_reqs, max_model_len] int32, the rows' tokens
            slot_mappings=None) -> list[list[int]]   # per row: up to k draft tokens ([] = no speculation)

It sees token ids only: no request ids, positions, hidden states or the target's KV cache. So the proposer keeps
its own static caches (layers 0..l-1 and the adapter) with one cache row per batch row, and knows which tokens each
cache row holds. Each call it compares a row's committed tokens with its cache row: the common prefix stays (after
a round it is the context up to the accepted drafts that ran through the shallow layers: vLLM verifies, so a draft
runs here only where the draft head needed it), the rest, the newest token included, is run again in one forward.
A row whose tokens no longer fit its cache row (a new request, or vLLM moved requests between rows) takes the cache
row with the longest common prefix, so the proposer is correct whatever vLLM does with its rows; only the work it
redoes changes. Then ``Engine.draft`` proposes for all rows at once, with
the engine's own default drafter (``drafting.py``: Kangaroo's confidence stop, the context lookup) and EOS, as in
this project's own loop.

The settings travel in the class name, because ``speculative_config`` forbids extra keys and the proposer is built
in another process: ``kangaroo_fast.vllm.proposer.Kangaroo_<hex of JSON>``, made by ``kangaroo_fast.vllm.config``;
``__getattr__`` below turns such a name into a subclass carrying them.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..adapter import Adapter
from ..backend import resolve_backend
from ..cache import StaticKVCache
from ..config import DecodeSettings, ModelConfig
from ..drafting import AdapterDrafter, ContextLookup, Drafter, FirstOf
from ..engine import Engine, RoundDrafts
from ..lookup import NgramLookup
from ..models import model_eos_ids, pack_model, quiet_hf_loading

CLASS_PREFIX = "Kangaroo_"
PROFILE_ENV = "KANGAROO_VLLM_PROFILE"  # every this many calls, the proposer prints where its time went (stderr)


class ProposerTimes:
    """Where the proposer's time goes, per vLLM call: catching up on tokens its cache lacks (the shallow layers vLLM
    also ran in verification) and drafting. Printed every ``every`` calls when ``KANGAROO_VLLM_PROFILE`` is set."""

    def __init__(self, every: int):
        self.every, self.calls, self.drafts = every, 0, 0
        self.seconds = {"call": 0.0, "catch_up": 0.0, "draft": 0.0}

    @contextlib.contextmanager
    def timing(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def count(self, drafts: int) -> None:
        self.calls += 1
        self.drafts += drafts
        if self.every and self.calls % self.every == 0:
            per = {k: 1000 * v / self.calls for k, v in self.seconds.items()}
            print(f"kangaroo_fast.vllm proposer: {self.calls} calls, per call {per['call']:.2f} ms (catch-up "
                  f"{per['catch_up']:.2f} ms, drafting {per['draft']:.2f} ms), {self.drafts / self.calls:.2f} "
                  "drafts", file=sys.stderr, flush=True)


def encode_settings(settings: dict) -> str:
    """Settings -> the proposer's class name (an identifier: vLLM checks every dotted part)."""
    return CLASS_PREFIX + json.dumps(settings, sort_keys=True).encode().hex()


def decode_settings(name: str) -> dict:
    if not name.startswith(CLASS_PREFIX):
        raise AttributeError(name)
    return json.loads(bytes.fromhex(name[len(CLASS_PREFIX):]).decode())


class ShallowEngine(Engine):
    """The engine over the target's first ``exit_layer`` layers only: its caches hold those layers and the adapter."""

    def __init__(self, packed, backend, max_len: int, adapter: Adapter, max_draft_steps: int, batch: int):
        self.exit_layer = adapter.config.exit_layer
        self.batch = batch
        super().__init__(packed, backend, max_len, adapter, max_draft_steps, graphs=False)

    def _allocate(self, batch: int, max_len: int, max_draft_steps: int) -> None:
        c, device = self.cfg, self.w.device
        dtype = self.ops.cache_dtype(self.w.dtype, device)
        batch = max(batch, self.batch)
        self.cache = StaticKVCache(self.exit_layer, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        self.adapter_cache = StaticKVCache(1, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        self._grow_draft_buffer(max_draft_steps)


def load_shallow(path: str | Path, exit_layer: int, dtype: torch.dtype, device: torch.device, max_positions: int):
    """The target checkpoint's first ``exit_layer`` layers, embedding, final norm and LM head, packed with RoPE
    tables for ``max_positions``; with the full model's config (the adapter checks its exit layer against it) and its
    EOS ids. Only those tensors are read from disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    full = ModelConfig.from_hf(hf_config)
    overrides = {"num_hidden_layers": exit_layer}
    if getattr(hf_config, "layer_types", None):
        overrides["layer_types"] = list(hf_config.layer_types[:exit_layer])
    with quiet_hf_loading(errors_only=True):  # the deeper layers' weights are left out on purpose: no load report
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides).to(device).eval()
    packed = pack_model(hf_model, max_positions)
    packed.config = full
    return packed, model_eos_ids(hf_model)


class KangarooProposer:
    """Kangaroo drafts for vLLM; built by vLLM from ``speculative_config`` (see ``kangaroo_fast.vllm.config``)."""

    settings: dict = {}

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.batch = vllm_config.scheduler_config.max_num_seqs
        self.model_path = vllm_config.model_config.model
        self.dtype = vllm_config.model_config.dtype
        self.device = torch.device(vllm_config.device_config.device)
        self.engine: ShallowEngine | None = None
        self.rows: list[np.ndarray] = []  # per cache row: the tokens its cache holds, position by position
        self.lookups: list[NgramLookup | None] = []
        self.times = ProposerTimes(int(os.environ.get(PROFILE_ENV) or 0))

    def load_model(self, *_target_model) -> None:
        """Read the shallow layers from the target checkpoint and the adapter (vLLM's target model is not used)."""
        s = self.settings
        adapter = Adapter.load(s["adapter"])
        c = adapter.config
        if "exit_layer" in s:
            c.exit_layer = s["exit_layer"]
        packed, self.eos = load_shallow(self.model_path, c.exit_layer, self.dtype, self.device, self.max_model_len)
        c.check_matches(packed.config)
        self.decode = DecodeSettings(exit_layer=c.exit_layer, threshold=s.get("threshold", c.threshold),
                                     max_draft_steps=self.k, lookup=s.get("lookup", c.lookup)
                                     ).validate(packed.config.num_layers)
        # budgets keep every draft input below max_model_len; padding past the cache is dropped by the ops
        self.engine = ShallowEngine(packed, resolve_backend(s.get("backend"), self.device), self.max_model_len,
                                    adapter.to(self.device).eval(), self.k, self.batch)
        self.rows = [np.zeros(0, dtype=np.int64) for _ in range(self.engine.cache.batch)]
        self.lookups = [None] * self.engine.cache.batch

    # ---- cache rows ----------------------------------------------------------------------------------------------
    @staticmethod
    def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
        n = min(len(a), len(b))
        differ = np.flatnonzero(a[:n] != b[:n])
        return int(differ[0]) if len(differ) else n

    def _swap(self, i: int, j: int) -> None:
        for cache in (self.engine.cache, self.engine.adapter_cache):
            for buf in (cache.k, cache.v):
                buf[:, [i, j]] = buf[:, [j, i]]
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self.lookups[i], self.lookups[j] = self.lookups[j], self.lookups[i]

    def _place(self, slot: int, tokens: np.ndarray) -> int:
        """Put into cache row ``slot`` the cached tokens that best fit ``tokens``; return how many it holds."""
        held = self._common_prefix(self.rows[slot], tokens)
        if held < len(tokens) - 1:  # more than the newest token missing: another cache row may fit better
            best, best_held = slot, held
            for other in range(slot + 1, len(self.rows)):
                h = self._common_prefix(self.rows[other], tokens)
                if h > best_held:
                    best, best_held = other, h
            if best != slot:
                self._swap(slot, best)
                held = best_held
        return held

    def _lookup(self, slot: int, tokens: np.ndarray, held: int) -> NgramLookup | None:
        if not self.decode.lookup:
            return None
        lookup = self.lookups[slot]
        if lookup is None or len(lookup.tokens) > held:
            lookup = self.lookups[slot] = NgramLookup(tokens.tolist(), self.decode.lookup)
        else:
            lookup.extend(tokens[len(lookup.tokens):].tolist())
        return lookup

    # ---- vLLM's call ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings=None) -> list[list[int]]:
        with self.times.timing("call"):
            out = self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        self.times.count(sum(len(d) for d in out))
        return out

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[list[int]]:
        engine = self.engine
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [i for i, new in enumerate(sampled_token_ids)
                if new and num_tokens_no_spec[i] < self.max_model_len]
        if not rows:
            return out
        if len(rows) > engine.cache.batch:
            raise RuntimeError(f"{len(rows)} requests exceed the proposer's {engine.cache.batch} cache rows")
        contexts = [token_ids_cpu[i, :num_tokens_no_spec[i]].astype(np.int64) for i in rows]
        held = [min(self._place(slot, tokens), len(tokens) - 1) for slot, tokens in enumerate(contexts)]
        engine.cache.active = engine.adapter_cache.active = len(rows)
        with self.times.timing("catch_up"):
            self._catch_up(contexts, held)
        pos = [len(t) - 1 for t in contexts]
        budget = [max(0, min(self.k, self.max_model_len - len(t))) for t in contexts]
        lookups = [self._lookup(slot, t, h) for slot, (t, h) in enumerate(zip(contexts, held))]
        # the catch-up ran the newest token: the first head reads its adapter output
        rnd = RoundDrafts.start([int(t[-1]) for t in contexts], pos, budget, ran=1)
        with self.times.timing("draft"):  # vLLM verifies: the drafts no head needed are not run here
            engine.draft(rnd, self._drafter(lookups), list(range(len(rows))), self.decode, self.eos, run_last=False)
        for slot, (i, tokens, d, ran) in enumerate(zip(rows, contexts, rnd.tokens, rnd.ran)):
            self.rows[slot] = np.concatenate([tokens, np.asarray(d[:ran - 1], dtype=np.int64)])  # what the cache holds
            out[i] = d
        return out

    def _drafter(self, lookups: list[NgramLookup | None]) -> Drafter:
        """The engine's default drafter over this call's cache rows: the adapter, after the context lookup when the
        settings have one (its per-row indexes are the proposer's own, extended call by call, not rebuilt)."""
        adapter = AdapterDrafter(self.settings.get("adapter_steps"))
        adapter.begin((), self.decode.threshold)
        if not self.decode.lookup:
            return adapter
        copy = ContextLookup(self.decode.lookup)
        copy.indexes = lookups
        return FirstOf(copy, adapter)

    def _catch_up(self, contexts: list[np.ndarray], held: list[int]) -> None:
        """Run each row's tokens its cache lacks, the newest included (``held`` < its length), in one forward; the
        newest token's adapter output goes where the draft head reads it (``engine.newest``)."""
        engine = self.engine
        missing = [t[h:] for t, h in zip(contexts, held)]
        width = max(len(m) for m in missing)
        ids = torch.zeros(len(missing), width, dtype=torch.int64)
        for b, m in enumerate(missing):
            ids[b, :len(m)] = torch.from_numpy(m)
        # a row with fewer missing tokens writes padding past them, at positions its draft overwrites before reading
        # (or past the cache, where the ops drop the writes)
        _h, out = engine.steps.shallow(ids.to(engine.w.device), held, self.decode.exit_layer, True)
        for b, m in enumerate(missing):
            engine.newest[b] = out[b, len(m) - 1]


def __getattr__(name: str):
    """``Kangaroo_<hex>``: a KangarooProposer subclass with those settings (see ``encode_settings``)."""
    settings = decode_settings(name)
    cls = type(name, (KangarooProposer,), {"settings": settings})
    globals()[name] = cls
    return cls

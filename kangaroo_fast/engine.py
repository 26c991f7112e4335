"""The decode loop: prefill, draft, verify, accept, commit, and the same engine without drafting (vanilla).

Round state (batch 1): ``pos`` tokens have keys/values in every layer; ``last`` is the newest token, emitted but
not yet run through the model; it sits at position ``pos``.

    draft   last, d1, d2 ... run through layers 0..l-1 and the adapter one at a time (their layer-l states kept);
            the draft head proposes the next token; drafting stops after the first proposal whose top-1
            probability is below the threshold (that proposal is still verified), after max_draft_steps
            proposals, at EOS, or where the cache or max_new_tokens leave no room.
    verify  the kept layer-l states of [last, d1..dk] run through layers l..L-1 in one forward -> targets t0..tk.
    accept  a = longest prefix with d_i == t_{i-1}; emit d1..da and the bonus token t_a.
    commit  pos += a + 1; last = t_a. Rejected positions are simply overwritten later.

Every draft token also runs through the adapter, so the adapter cache is complete even when all drafts pass.
Host syncs per round on the reference backend: one per draft proposal (the confidence test) and one for the
accepted length; on CPU these cost nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import Adapter
from .backend import resolve_backend
from .cache import StaticKVCache
from .config import DecodeSettings
from .models import PackedModel


@dataclass
class GenerationStats:
    new_tokens: int = 0
    rounds: int = 0
    draft_steps: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    dtype: str = ""
    device: str = ""
    mode: str = "kangaroo"
    stop_reason: str = ""
    drafted_at: list[int] = field(default_factory=list)   # drafted_at[j]: rounds that proposed a (j+1)-th token
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[j]: rounds that accepted it

    @property
    def mean_accepted(self) -> float:
        """#MAT: mean tokens emitted per verification round (vanilla = 1.0)."""
        return self.new_tokens_after_prefill / self.rounds if self.rounds else 0.0

    @property
    def new_tokens_after_prefill(self) -> int:
        return max(self.new_tokens - 1, 0)

    @property
    def acceptance_rate(self) -> list[float]:
        """Per draft position, accepted / drafted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def time_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "rounds": self.rounds, "mean_accepted": self.mean_accepted,
                "draft_steps": self.draft_steps, "acceptance_rate": self.acceptance_rate,
                "prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "tokens_per_s": self.tokens_per_s, "dtype": self.dtype, "device": self.device, "mode": self.mode,
                "stop_reason": self.stop_reason}


class Engine:
    """Kangaroo decoding over packed weights, a static cache and one backend."""

    def __init__(self, packed: PackedModel, backend, max_len: int, adapter: Adapter | None = None,
                 max_draft_steps: int = 6):
        """``backend``: a backend object, its name, or None for the device's default (triton on CUDA)."""
        self.w = packed
        self.cfg = packed.config
        self.ops = resolve_backend(backend, packed.device)
        dtype, device = packed.dtype, packed.device
        if max_len > packed.rope_cos.shape[0]:
            raise ValueError(f"max_len={max_len} exceeds the RoPE table ({packed.rope_cos.shape[0]} positions)")
        self.cos = packed.rope_cos[:max_len].to(dtype)
        self.sin = packed.rope_sin[:max_len].to(dtype)
        c = self.cfg
        self.cache = StaticKVCache(c.num_layers, 1, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        self.adapter = None
        if adapter is not None:
            adapter.config.check_matches(c)
            self.adapter = adapter
            self.adapter_cache = StaticKVCache(1, 1, c.num_kv_heads, max_len, c.head_dim, dtype, device)
            with torch.no_grad():
                self.a_input_norm = adapter.input_norm.detach().to(device, dtype)
                self.a_qkv = adapter.qkv_weight().detach().to(device, dtype)
                self.a_o = adapter.o_proj.weight.detach().to(device, dtype)
                self.a_norm = adapter.norm.detach().to(device, dtype)
                self.draft_head = adapter.head_weight(packed.lm_head).to(device, dtype).contiguous()
                vocab = adapter.draft_vocab
                self.draft_vocab = None if vocab is None else vocab.to(device)
        self._grow_draft_buffer(max_draft_steps)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _grow_draft_buffer(self, steps: int) -> None:
        self.shallow_states = torch.empty(1, steps + 1, self.cfg.hidden_size, dtype=self.w.dtype,
                                          device=self.w.device)

    # ---- model pieces ----------------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, start: int, first: int, stop: int) -> torch.Tensor:
        """Run decoder layers first..stop-1 on x [1, T, H] at positions start..start+T-1, writing their caches.

        ``start`` is an int, or (triton backend, e.g. in a CUDA graph) a [B] integer device tensor."""
        ops, c = self.ops, self.cfg
        for i in range(first, stop):
            w = self.w.layers[i]
            k_cache, v_cache = self.cache.layer(i)
            q = ops.qkv_rope_cache_write(x, w.input_norm, c.rms_norm_eps, w.w_qkv, w.b_qkv, self.cos, self.sin,
                                         k_cache, v_cache, start, c.num_heads, c.num_kv_heads)
            x = ops.linear_residual(ops.attention(q, k_cache, v_cache, start, c.layer_windows[i]), w.w_o, x)
            x = ops.norm_mlp_residual(x, w.post_norm, c.rms_norm_eps, w.w_gate_up, w.w_down)
        return x

    def _adapter(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """The adapter block (before its final norm) on layer-l states h [1, T, H], writing its cache."""
        ops, c = self.ops, self.cfg
        k_cache, v_cache = self.adapter_cache.layer(0)
        q = ops.qkv_rope_cache_write(h, self.a_input_norm, c.rms_norm_eps, self.a_qkv, None, self.cos, self.sin,
                                     k_cache, v_cache, start, c.num_heads, c.num_kv_heads)
        return ops.linear_residual(ops.attention(q, k_cache, v_cache, start), self.a_o, h)

    def _propose(self, adapter_out: torch.Tensor) -> tuple[int, float]:
        """Draft head on the adapter's newest output: (token id, top-1 probability). One host sync."""
        token, prob, _ = self.ops.draft_propose(adapter_out[:, -1], self.a_norm, self.cfg.rms_norm_eps,
                                                self.draft_head, self.draft_vocab)
        return int(token[0]), float(prob[0])

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.verify_head(x, self.w.final_norm, self.cfg.rms_norm_eps, self.w.lm_head)

    # ---- phases ----------------------------------------------------------------------------------------------
    def prefill(self, prompt: torch.Tensor, exit_layer: int | None) -> int:
        """Run the prompt [1, n] through the full model (and the adapter when drafting); return the first token."""
        n = prompt.shape[1]
        x = self.ops.embed(prompt, self.w.embed)
        if exit_layer is None:
            x = self._layers(x, 0, 0, self.cfg.num_layers)
        else:
            h = self._layers(x, 0, 0, exit_layer)
            self._adapter(h, 0)
            x = self._layers(h, 0, exit_layer, self.cfg.num_layers)
        self.cache.lengths.fill_(n)
        return int(self._targets(x[:, -1:])[0, 0])

    def draft(self, last: int, pos: int, settings: DecodeSettings, budget: int, eos: set[int]) -> list[int]:
        """Propose up to ``budget`` tokens after ``last`` (at ``pos``); keep each input's layer-l state."""
        l = settings.exit_layer
        drafts: list[int] = []
        token, confidence = last, 1.0
        while True:
            i = len(drafts)
            ids = torch.tensor([[token]], device=self.w.device)
            h = self._layers(self.ops.embed(ids, self.w.embed), pos + i, 0, l)
            self.shallow_states[:, i:i + 1] = h
            out = self._adapter(h, pos + i)
            if i == budget or confidence < settings.threshold or token in eos and i > 0:
                return drafts
            token, confidence = self._propose(out)
            drafts.append(token)

    def verify(self, pos: int, num_drafts: int, exit_layer: int) -> list[int]:
        """Layers l..L-1 on the kept states of [last, d1..dk]; return the full model's k+1 greedy tokens."""
        x = self._layers(self.shallow_states[:, :num_drafts + 1], pos, exit_layer, self.cfg.num_layers)
        return self._targets(x)[0].tolist()

    @staticmethod
    def accept(drafts: list[int], targets: list[int]) -> int:
        """Longest prefix of drafts equal to the targets before them."""
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        return accepted

    def commit(self, pos: int, accepted: int) -> int:
        pos += accepted + 1
        self.cache.lengths.fill_(pos)
        if self.adapter is not None:
            self.adapter_cache.lengths.fill_(pos)
        return pos

    # ---- the loop --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, settings: DecodeSettings, eos: set[int], speculate: bool = True,
                 callback: Callable[[list[int]], None] | None = None) -> tuple[list[int], GenerationStats]:
        """Greedy decoding of ``prompt`` [1, n] int64; returns (new tokens, statistics)."""
        n = prompt.shape[1]
        if n + 1 > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the cache of {self.max_len} positions "
                             "(it needs prompt + 1)")
        if speculate and self.adapter is None:
            raise ValueError("speculative decoding needs an adapter: pass adapter=..., or speculate=False")
        if speculate and settings.max_draft_steps + 1 > self.shallow_states.shape[1]:
            self._grow_draft_buffer(settings.max_draft_steps)
        stats = GenerationStats(prompt_tokens=n, dtype=str(self.w.dtype).replace("torch.", ""),
                                device=str(self.w.device), mode="kangaroo" if speculate else "vanilla")
        self.cache.reset()
        if self.adapter is not None:
            self.adapter_cache.reset()
        exit_layer = settings.exit_layer if speculate else None

        start = time.perf_counter()
        last = self.prefill(prompt, exit_layer)
        stats.prefill_s = time.perf_counter() - start
        tokens = [last]
        if callback:
            callback([last])
        pos = n
        start = time.perf_counter()
        while True:
            if last in eos:
                stats.stop_reason = "eos"
                break
            if len(tokens) >= settings.max_new_tokens:
                stats.stop_reason = "max_new_tokens"
                break
            if pos + 1 >= self.max_len:
                stats.stop_reason = "cache_full"
                break
            # room for k drafts: k + 1 new tokens within max_new_tokens and within the cache
            budget = min(settings.max_draft_steps, settings.max_new_tokens - len(tokens) - 1, self.max_len - pos - 2)
            if speculate and budget > 0:
                drafts = self.draft(last, pos, settings, budget, eos)
                targets = self.verify(pos, len(drafts), settings.exit_layer)
            else:
                drafts = []
                x = self._layers(self.ops.embed(torch.tensor([[last]], device=self.w.device), self.w.embed),
                                 pos, 0, self.cfg.num_layers)
                targets = self._targets(x)[0].tolist()
            accepted = self.accept(drafts, targets)
            new = drafts[:accepted] + [targets[accepted]]
            for j in range(len(drafts)):
                if j >= len(stats.drafted_at):
                    stats.drafted_at.append(0)
                    stats.accepted_at.append(0)
                stats.drafted_at[j] += 1
                stats.accepted_at[j] += int(j < accepted)
            stats.rounds += 1
            stats.draft_steps += len(drafts)
            for j, token in enumerate(new):
                if token in eos:
                    new = new[:j + 1]
                    break
            pos = self.commit(pos, accepted)
            last = new[-1]
            tokens.extend(new)
            if callback:
                callback(new)
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = len(tokens)
        return tokens, stats

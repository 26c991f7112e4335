"""The decode loop: prefill, draft, verify, accept, commit, and the same engine without drafting (vanilla).

Round state, per sequence b of a batch: ``pos[b]`` tokens have keys/values in every layer; ``last[b]`` is the
newest token, emitted but not yet run through the model; it sits at position ``pos[b]``.

    draft   last, d1, d2 ... run through layers 0..l-1 and the adapter (their layer-l states kept); the draft
            head proposes each sequence's next token. A sequence stops drafting after its first proposal whose
            top-1 probability is below the threshold (that proposal is still verified), after max_draft_steps
            proposals, at EOS, or where the cache or max_new_tokens leave no room; drafting goes on while any
            sequence still drafts (the others' extra inputs are padding). With the context lookup (``lookup.py``)
            a sequence first copies drafts from its context while the lookup finds them (confident by definition),
            and each forward runs every sequence's inputs not yet run, at its own offset: a copied span costs one
            forward, and the head runs only for proposals the lookup did not make.
    verify  the kept layer-l states of [last, d1..dk] run through layers l..L-1 in one forward for the whole
            batch, each sequence at its own positions -> targets t0..tk (greedy) or distributions p1..p_{k+1}.
    accept  greedy: a = longest prefix with d_i == t_{i-1}; emit d1..da and the bonus token t_a.
            sampling: the speculative rule of ``sampling.speculative_accept`` (lossless in distribution).
    commit  pos += a + 1; last = the emitted token. Rejected and padding positions are overwritten later.

Every draft token also runs through the adapter, so the adapter cache is complete even when all drafts pass.
Sequences of a batch keep their own positions; a finished sequence's cache rows are dropped (``keep_rows``), so
it costs nothing afterwards. Batch 1 passes positions as plain ints, as before batching existed.
Host syncs per round on the reference backend: one per adapter proposal (the confidence test) and one for the accepted
lengths (per-sequence attention adds one per call); on CPU these cost nothing. Greedy decoding on CUDA replays the
draft, verify and vanilla steps as CUDA graphs (``graphs.py``, ``_graph_round``): one sync per draft step and one
for the verification's targets, the minimum while the confidence test decides on the host whether to draft on.
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
from .lookup import NgramLookup
from .models import PackedModel
from .sampling import sample, speculative_accept, target_probs


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
    stop_reason: str = ""  # eos | max_new_tokens | cache_full
    lookup_drafts: int = 0  # drafts taken from the context lookup instead of the adapter
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
                "draft_steps": self.draft_steps, "lookup_drafts": self.lookup_drafts,
                "acceptance_rate": self.acceptance_rate,
                "prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "tokens_per_s": self.tokens_per_s, "dtype": self.dtype, "device": self.device, "mode": self.mode,
                "stop_reason": self.stop_reason}


class Engine:
    """Kangaroo decoding over packed weights, a static cache and one backend."""

    def __init__(self, packed: PackedModel, backend, max_len: int, adapter: Adapter | None = None,
                 max_draft_steps: int = 6, graphs: bool | str | None = None):
        """``backend``: a backend object, its name, or None for the device's default (triton on CUDA).

        ``graphs``: greedy decode steps replayed as CUDA graphs (``graphs.py``). None: on where the backend is
        triton on a CUDA device; True: on (an error elsewhere); False: off; ``"eager"``: the same graph loop
        without capturing (runs anywhere; how the tests check that loop on CPU)."""
        self.w = packed
        self.cfg = packed.config
        self.ops = resolve_backend(backend, packed.device)
        self.graph_mode = self._graph_mode(graphs)
        dtype, device = packed.dtype, packed.device
        if max_len > packed.rope_cos.shape[0]:
            raise ValueError(f"max_len={max_len} exceeds the RoPE table ({packed.rope_cos.shape[0]} positions)")
        self.cos = packed.rope_cos[:max_len].to(dtype)
        self.sin = packed.rope_sin[:max_len].to(dtype)
        self.adapter = None
        if adapter is not None:
            adapter.config.check_matches(self.cfg)
            self.adapter = adapter
            with torch.no_grad():
                self.a_input_norm = adapter.input_norm.detach().to(device, dtype)
                self.a_qkv = adapter.qkv_weight().detach().to(device, dtype)
                self.a_o = adapter.o_proj.weight.detach().to(device, dtype)
                self.a_norm = adapter.norm.detach().to(device, dtype)
                self.draft_head = adapter.head_weight(packed.lm_head).to(device, dtype).contiguous()
                vocab = adapter.draft_vocab
                self.draft_vocab = None if vocab is None else vocab.to(device)
        self._allocate(1, max_len, max_draft_steps)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _graph_mode(self, graphs: bool | str | None) -> str:
        """"cuda", "eager" or "off" (see ``__init__``)."""
        from .backend.triton_backend import TritonBackend

        capturable = isinstance(self.ops, TritonBackend) and self.w.device.type == "cuda"
        if graphs is None:
            return "cuda" if capturable else "off"
        if graphs is True:
            if not capturable:
                raise ValueError(f"graphs=True needs the triton backend on a CUDA device, not the {self.ops.name} "
                                 f"backend on {self.w.device}")
            return "cuda"
        if graphs is False:
            return "off"
        if graphs == "eager":
            return "eager"
        raise ValueError(f"graphs={graphs!r} must be None, True, False or 'eager'")

    def decode_graphs(self, exit_layer: int | None, threshold: float = 0.0):
        """The replayable steps for one exit layer (None: the vanilla step), made on first use."""
        from .graphs import DecodeGraphs

        key = (exit_layer, threshold)
        if key not in self._graph_sets:
            self._graph_sets[key] = DecodeGraphs(self, exit_layer, threshold, capture=self.graph_mode == "cuda")
        return self._graph_sets[key]

    def _allocate(self, batch: int, max_len: int, max_draft_steps: int) -> None:
        """The static buffers for ``batch`` sequences: caches and the kept layer-l states of one round."""
        c, dtype, device = self.cfg, self.w.dtype, self.w.device
        self.cache = StaticKVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        if self.adapter is not None:
            self.adapter_cache = StaticKVCache(1, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        self._grow_draft_buffer(max_draft_steps)

    def _grow_draft_buffer(self, steps: int) -> None:
        # graphs hold pointers into the caches and this buffer (``_allocate`` comes here too): new buffers, new graphs
        self._graph_sets: dict = {}
        # zeros, not empty: a sequence with fewer drafts than the batch's longest leaves stale rows that verification
        # reads as padding, and they must be finite
        self.shallow_states = torch.zeros(self.cache.batch, steps + 1, self.cfg.hidden_size, dtype=self.w.dtype,
                                          device=self.w.device)

    # ---- positions -------------------------------------------------------------------------------------------
    def _starts(self, pos: list[int], offset: int = 0) -> int | torch.Tensor:
        """Start positions for the ops: an int for one sequence, a [B] int64 tensor for a batch."""
        if len(pos) == 1:
            return pos[0] + offset
        return torch.tensor(pos, dtype=torch.int64, device=self.w.device) + offset

    # ---- model pieces ----------------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, start: int | torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """Run decoder layers first..stop-1 on x [B, T, H] at positions start..start+T-1, writing their caches.

        ``start`` is an int (one sequence), or a [B] int64 device tensor: per sequence in a batch, and the form the
        triton backend takes inside a CUDA graph."""
        ops, c = self.ops, self.cfg
        for i in range(first, stop):
            w = self.w.layers[i]
            k_cache, v_cache = self.cache.layer(i)
            q = ops.qkv_rope_cache_write(x, w.input_norm, c.rms_norm_eps, w.w_qkv, w.b_qkv, self.cos, self.sin,
                                         k_cache, v_cache, start, c.num_heads, c.num_kv_heads)
            x = ops.linear_residual(ops.attention(q, k_cache, v_cache, start, c.layer_windows[i]), w.w_o, x)
            x = ops.norm_mlp_residual(x, w.post_norm, c.rms_norm_eps, w.w_gate_up, w.w_down)
        return x

    def _adapter(self, h: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """The adapter block (before its final norm) on layer-l states h [B, T, H], writing its cache."""
        ops, c = self.ops, self.cfg
        k_cache, v_cache = self.adapter_cache.layer(0)
        q = ops.qkv_rope_cache_write(h, self.a_input_norm, c.rms_norm_eps, self.a_qkv, None, self.cos, self.sin,
                                     k_cache, v_cache, start, c.num_heads, c.num_kv_heads)
        return ops.linear_residual(ops.attention(q, k_cache, v_cache, start), self.a_o, h)

    def _propose(self, adapter_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft head on the adapter's newest outputs: (token ids [B], top-1 probabilities [B]), on the device."""
        token, prob, _ = self.ops.draft_propose(adapter_out[:, -1], self.a_norm, self.cfg.rms_norm_eps,
                                                self.draft_head, self.draft_vocab)
        return token, prob

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.verify_head(x, self.w.final_norm, self.cfg.rms_norm_eps, self.w.lm_head)

    # ---- sampling pieces (temperature > 0) -------------------------------------------------------------------
    def _propose_sampled(self, adapter_out: torch.Tensor, settings: DecodeSettings,
                         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw draft tokens from the processed draft distributions q: (token ids [B], the raw distribution's
        top-1 probability [B] for the confidence stop, q over the full vocabulary [B, V])."""
        c = self.cfg
        logits = self.ops.linear(self.ops.rms_norm(adapter_out[:, -1], self.a_norm, c.rms_norm_eps),
                                 self.draft_head).float()
        confidence = logits.softmax(-1).amax(-1)
        q = target_probs(logits, settings)
        index = sample(q, generator)
        if self.draft_vocab is None:
            return index, confidence, q
        full = q.new_zeros(q.shape[0], c.vocab_size)
        full[:, self.draft_vocab] = q
        return self.draft_vocab[index], confidence, full

    def _target_probs(self, x: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
        """Deep states [B, T, H] -> the full model's processed next-token distributions p [B, T, V]."""
        logits = self.ops.linear(self.ops.rms_norm(x, self.w.final_norm, self.cfg.rms_norm_eps), self.w.lm_head)
        return target_probs(logits.float(), settings)

    def _next_tokens(self, x: torch.Tensor, settings: DecodeSettings,
                     generator: torch.Generator | None) -> list[int]:
        """One token per sequence from deep states x [B, 1, H]: greedy, or sampled from p."""
        if settings.greedy:
            return self._targets(x)[:, 0].tolist()
        return sample(self._target_probs(x, settings)[:, 0], generator).tolist()

    # ---- phases ----------------------------------------------------------------------------------------------
    def prefill(self, prompts: torch.Tensor, lengths: list[int], exit_layer: int | None) -> torch.Tensor:
        """Run prompts [B, N] (sequence b is prompts[b, :lengths[b]], padded on the right) through the full model
        (and the adapter when drafting); return the deep states at each sequence's last prompt position [B, 1, H].

        Causal attention keeps every real position blind to the padding after it; the padding's keys/values sit
        past the sequence's length and are overwritten before they could be read."""
        x = self.ops.embed(prompts, self.w.embed)
        if exit_layer is None:
            x = self._layers(x, 0, 0, self.cfg.num_layers)
        else:
            h = self._layers(x, 0, 0, exit_layer)
            self._adapter(h, 0)
            x = self._layers(h, 0, exit_layer, self.cfg.num_layers)
        self._set_lengths(lengths)
        if len(lengths) == 1:
            return x[:, lengths[0] - 1:lengths[0]]
        last = torch.tensor(lengths, device=x.device) - 1
        return x[torch.arange(len(lengths), device=x.device), last][:, None]

    def draft(self, last: list[int], pos: list[int], settings: DecodeSettings, budget: list[int], eos: set[int],
              generator: torch.Generator | None = None, lookups: list[NgramLookup] | None = None,
              from_context: list[int] | None = None) -> tuple[list[list[int]], torch.Tensor | None]:
        """Propose up to ``budget[b]`` tokens after ``last[b]`` (at ``pos[b]``) for every sequence b, keeping each
        input's layer-l state. Returns the drafts per sequence and, when sampling, the processed draft
        distributions q [B, K, V] (K = the longest draft). One host sync per adapter proposal.

        ``lookups[b]``: sequence b's context lookup (``lookup.py``). Before each forward, every drafting sequence
        takes the lookup's continuation of its drafts (point masses when sampling; ``from_context[b]`` counts
        them), and one forward runs layers 0..l-1 and the adapter over all its inputs not yet run, so a copied span
        costs one forward, not one per token. The adapter's head proposes only where the lookup found nothing."""
        l, n, device = settings.exit_layer, len(pos), self.w.device
        drafting = [k > 0 for k in budget]
        drafts: list[list[int]] = [[] for _ in range(n)]
        ran = [0] * n  # inputs [last, d1, d2, ...] of each sequence already through layers 0..l-1 and the adapter
        dists: list[list[torch.Tensor | None]] = [[] for _ in range(n)]  # per draft: q [V], or None (a copy)
        while True:
            if lookups is not None:
                self._copy_spans(lookups, drafts, drafting, budget, eos, from_context,
                                 None if settings.greedy else dists)
            inputs = [([t] + d)[k:] for t, d, k in zip(last, drafts, ran)]
            width = max(len(x) for x in inputs)
            if width == 0:
                break
            ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], dtype=torch.int64, device=device)
            start = self._starts([p + k for p, k in zip(pos, ran)])
            h = self._layers(self.ops.embed(ids, self.w.embed), start, 0, l)
            out = self._adapter(h, start)
            for b, x in enumerate(inputs):  # a sequence's padding (past its own inputs) is never kept
                self.shallow_states[b, ran[b]:ran[b] + len(x)] = h[b, :len(x)]
                ran[b] += len(x)
            if not any(drafting):
                continue  # the last inputs ran; the next pass finds none
            newest = out[torch.arange(n, device=device), torch.tensor([max(len(x) - 1, 0) for x in inputs],
                                                                       device=device)][:, None]
            if settings.greedy:
                token, prob = self._propose(newest)
            else:
                token, prob, q = self._propose_sampled(newest, settings, generator)
                for b, go in enumerate(drafting):
                    if go:
                        dists[b].append(q[b])
            self._extend_drafts(drafts, drafting, token.tolist(), prob.tolist(), budget, settings, eos)
        if settings.greedy:
            return drafts, None
        return drafts, self._draft_dists(drafts, dists, device)

    @staticmethod
    def _copy_spans(lookups: list[NgramLookup], drafts: list[list[int]], drafting: list[bool], budget: list[int],
                    eos: set[int], from_context: list[int] | None, dists: list[list] | None = None) -> None:
        """Every drafting sequence extends its drafts by its context lookup's proposals while they come, within its
        budget and up to an EOS (a copied draft counts as confident)."""
        for b, lookup in enumerate(lookups):
            while drafting[b]:
                hit = lookup.propose(drafts[b])
                if hit is None:
                    break
                drafts[b].append(hit)
                drafting[b] = len(drafts[b]) < budget[b] and hit not in eos
                if from_context is not None:
                    from_context[b] += 1
                if dists is not None:
                    dists[b].append(None)

    def _draft_dists(self, drafts: list[list[int]], dists: list[list[torch.Tensor | None]],
                     device) -> torch.Tensor:
        """Per sequence and draft, q over the full vocabulary as [B, K, V]: the adapter's processed distribution,
        or a point mass on a copied draft; zero past a sequence's drafts."""
        k = max(len(d) for d in drafts)
        q = torch.zeros(len(drafts), k, self.cfg.vocab_size, dtype=torch.float32, device=device)
        for b, (tokens, rows) in enumerate(zip(drafts, dists)):
            for j, (token, row) in enumerate(zip(tokens, rows)):
                if row is None:
                    q[b, j, token] = 1.0
                else:
                    q[b, j] = row
        return q

    def verify(self, pos: list[int], num_drafts: int, exit_layer: int) -> torch.Tensor:
        """Layers l..L-1 on the kept states of [last, d1..dk] of every sequence -> deep states [B, k + 1, H]."""
        n = len(pos)
        return self._layers(self.shallow_states[:n, :num_drafts + 1], self._starts(pos), exit_layer,
                            self.cfg.num_layers)

    def _graph_round(self, last: list[int], pos: list[int], settings: DecodeSettings, budget: list[int],
                     eos: set[int], lookups: list[NgramLookup] | None = None,
                     from_context: list[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """``draft`` then ``verify`` (greedy) as replays of the draft and verify steps' graphs: the drafts per
        sequence and the targets [B][k + 1]. Host syncs: one per draft step, one for the targets."""
        graphs = self.decode_graphs(settings.exit_layer, settings.threshold)
        n, device = len(pos), self.w.device
        position = torch.tensor(pos, dtype=torch.int64, device=device)
        token = torch.tensor(last, dtype=torch.int64, device=device)[:, None]
        drafting = [k > 0 for k in budget]
        drafts: list[list[int]] = [[] for _ in range(n)]
        i = 0
        while True:
            h, draft, prob, _keep = graphs.draft_step(token, position + i)
            self.shallow_states[:n, i:i + 1] = h
            if not any(drafting):
                break
            i += 1
            graphs.syncs += 1
            hits = self._lookup_hits(lookups, drafts, drafting)
            self._extend_drafts(drafts, drafting, draft.tolist(), prob.tolist(), budget, settings, eos, hits,
                                from_context)
            # stays on the device (copied into the step's static input before the replay) unless the lookup proposed
            token = (draft if hits is None else self._newest(drafts, last, device))[:, None]
        k = max(len(d) for d in drafts)
        targets, _accepted, _bonus = graphs.verify_step(self.shallow_states[:n, :k + 1],
                                                        self._padded(drafts, k, device), position)
        graphs.syncs += 1
        return drafts, targets.tolist()

    @staticmethod
    def _lookup_hits(lookups: list[NgramLookup] | None, drafts: list[list[int]],
                     drafting: list[bool]) -> list[int | None] | None:
        """Per sequence still drafting, the token its context lookup proposes after its drafts (or None); None
        without lookups."""
        if lookups is None:
            return None
        return [lookup.propose(d) if go else None for lookup, d, go in zip(lookups, drafts, drafting)]

    @staticmethod
    def _extend_drafts(drafts: list[list[int]], drafting: list[bool], tokens: list[int], confidences: list[float],
                       budget: list[int], settings: DecodeSettings, eos: set[int],
                       hits: list[int | None] | None = None, from_context: list[int] | None = None) -> None:
        """Append a draft step's proposals of the sequences still drafting, and decide which draft on:
        not past their budget, not after a proposal below the threshold, not after EOS. A lookup hit
        (``hits[b]`` not None) takes the adapter's place, counts as confident and is counted in ``from_context``."""
        for b, (t, conf) in enumerate(zip(tokens, confidences)):
            if drafting[b]:
                if hits is not None and hits[b] is not None:
                    t, conf = hits[b], 1.0
                    if from_context is not None:
                        from_context[b] += 1
                drafts[b].append(t)
                drafting[b] = len(drafts[b]) < budget[b] and conf >= settings.threshold and t not in eos

    @staticmethod
    def _newest(drafts: list[list[int]], last: list[int], device) -> torch.Tensor:
        """Every sequence's newest token: its last draft, or ``last`` before its first: the next step's input."""
        return torch.tensor([d[-1] if d else t for d, t in zip(drafts, last)], dtype=torch.int64, device=device)

    @staticmethod
    def _padded(drafts: list[list[int]], k: int, device) -> torch.Tensor:
        """Drafts as a [B, k] int64 tensor, zero-padded after each sequence's own drafts."""
        return torch.tensor([d + [0] * (k - len(d)) for d in drafts], dtype=torch.int64,
                            device=device).view(len(drafts), k)

    @staticmethod
    def accept(drafts: list[int], targets: list[int]) -> int:
        """Longest prefix of drafts equal to the targets before them."""
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        return accepted

    @classmethod
    def _emitted(cls, drafts: list[int], targets: list[int]) -> list[int]:
        """Greedy: the accepted drafts plus the target after them (the bonus token)."""
        accepted = cls.accept(drafts, targets)
        return drafts[:accepted] + [targets[accepted]]

    def commit(self, pos: list[int], emitted: list[int]) -> list[int]:
        """Every sequence moves on by the tokens it emitted this round (accepted drafts + 1)."""
        pos = [p + e for p, e in zip(pos, emitted)]
        self._set_lengths(pos)
        return pos

    def _set_lengths(self, lengths: list[int]) -> None:
        values = torch.tensor(lengths, dtype=torch.int64, device=self.w.device)
        self.cache.lengths[:len(lengths)] = values
        if self.adapter is not None:
            self.adapter_cache.lengths[:len(lengths)] = values

    def _keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        if self.adapter is not None:
            self.adapter_cache.keep_rows(rows)

    def _stop_reason(self, tokens: list[int], pos: int, settings: DecodeSettings, eos: set[int]) -> str:
        if tokens[-1] in eos:
            return "eos"
        if len(tokens) >= settings.max_new_tokens:
            return "max_new_tokens"
        if pos + 1 >= self.max_len:
            return "cache_full"
        return ""

    # ---- the loop --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, settings: DecodeSettings, eos: set[int], speculate: bool = True,
                 callback: Callable[[list[int]], None] | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[int], GenerationStats]:
        """Decode one prompt [1, n] int64; returns (new tokens, statistics)."""
        on_tokens = None if callback is None else (lambda _index, new: callback(new))
        return self.generate_batch([prompt[0]], settings, eos, speculate, on_tokens, generator)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[torch.Tensor], settings: DecodeSettings, eos: set[int],
                       speculate: bool = True, callback: Callable[[int, list[int]], None] | None = None,
                       generator: torch.Generator | None = None) -> list[tuple[list[int], GenerationStats]]:
        """Decode prompts (1-D int64 tensors of any lengths) together; returns (new tokens, statistics) per prompt.

        Greedy when ``settings.temperature == 0``, else lossless speculative sampling drawing from ``generator``.
        ``callback(index, new_tokens)`` follows each sequence. A sequence's ``decode_s`` runs until it finished.
        """
        if not prompts:
            raise ValueError("no prompts to decode")
        lengths = [int(p.shape[0]) for p in prompts]
        for n in lengths:
            if n + 1 > self.max_len:
                raise ValueError(f"prompt of {n} tokens does not fit the cache of {self.max_len} positions "
                                 "(it needs prompt + 1)")
        if speculate and self.adapter is None:
            raise ValueError("speculative decoding needs an adapter: pass adapter=..., or speculate=False")
        batch = len(prompts)
        if batch > self.cache.batch:
            self._allocate(batch, self.max_len, settings.max_draft_steps)
        if speculate and settings.max_draft_steps + 1 > self.shallow_states.shape[1]:
            self._grow_draft_buffer(settings.max_draft_steps)
        self.cache.reset(batch)
        if self.adapter is not None:
            self.adapter_cache.reset(batch)
        exit_layer = settings.exit_layer if speculate else None
        all_stats = [GenerationStats(prompt_tokens=n, dtype=str(self.w.dtype).replace("torch.", ""),
                                     device=str(self.w.device), mode="kangaroo" if speculate else "vanilla")
                     for n in lengths]

        start = time.perf_counter()
        padded = torch.zeros(batch, max(lengths), dtype=torch.int64, device=self.w.device)
        for b, p in enumerate(prompts):
            padded[b, :lengths[b]] = p
        last = self._next_tokens(self.prefill(padded, lengths, exit_layer), settings, generator)
        prefill_s = time.perf_counter() - start
        for b, stats in enumerate(all_stats):
            stats.prefill_s = prefill_s
            if callback:
                callback(b, [last[b]])
        tokens = [[t] for t in last]
        rows = list(range(batch))  # rows[r]: the prompt index decoded in cache row r
        contexts = [NgramLookup(p.tolist() + [t], settings.lookup) for p, t in zip(prompts, last)] \
            if speculate and settings.lookup else None
        pos = list(lengths)
        graphed = self.graph_mode != "off" and settings.greedy
        start = time.perf_counter()
        while True:
            reasons = [self._stop_reason(tokens[i], p, settings, eos) for i, p in zip(rows, pos)]
            if any(reasons):
                for i, reason in zip(rows, reasons):
                    if reason:
                        all_stats[i].stop_reason = reason
                        all_stats[i].decode_s = time.perf_counter() - start
                keep = [r for r, reason in enumerate(reasons) if not reason]
                if not keep:
                    break
                self._keep_rows(keep)
                rows, pos, last = ([values[r] for r in keep] for values in (rows, pos, last))
            # room for k drafts: k + 1 new tokens within max_new_tokens and within the cache
            budget = [min(settings.max_draft_steps, settings.max_new_tokens - len(tokens[i]) - 1,
                          self.max_len - p - 2) for i, p in zip(rows, pos)]
            lookups = None if contexts is None else [contexts[i] for i in rows]
            from_context = [0] * len(rows)
            if speculate and max(budget) > 0 and graphed:
                drafts, targets = self._graph_round(last, pos, settings, budget, eos, lookups, from_context)
                emitted = [self._emitted(d, t) for d, t in zip(drafts, targets)]
            elif graphed:
                drafts = [[] for _ in rows]
                ids = torch.tensor(last, device=self.w.device)[:, None]
                graphs = self.decode_graphs(None)
                emitted = graphs.vanilla_step(ids, torch.tensor(pos, device=self.w.device)).tolist()
                graphs.syncs += 1
            else:
                if speculate and max(budget) > 0:
                    drafts, q = self.draft(last, pos, settings, budget, eos, generator, lookups, from_context)
                    x = self.verify(pos, max(len(d) for d in drafts), settings.exit_layer)
                else:
                    drafts, q = [[] for _ in rows], None
                    ids = torch.tensor(last, device=self.w.device)[:, None]
                    x = self._layers(self.ops.embed(ids, self.w.embed), self._starts(pos), 0, self.cfg.num_layers)
                emitted = self._accept_round(x, drafts, q, settings, generator)
            for r, (i, new) in enumerate(zip(rows, emitted)):
                self._record(all_stats[i], len(drafts[r]), len(new) - 1)
                all_stats[i].lookup_drafts += from_context[r]
                for j, token in enumerate(new):
                    if token in eos:
                        new = new[:j + 1]
                        break
                tokens[i].extend(new)
                if contexts is not None:
                    contexts[i].extend(new)
                last[r] = new[-1]
                if callback:
                    callback(i, new)
            pos = self.commit(pos, [len(new) for new in emitted])
        for stats, new in zip(all_stats, tokens):
            stats.new_tokens = len(new)
        return list(zip(tokens, all_stats))

    def _accept_round(self, x: torch.Tensor, drafts: list[list[int]], q: torch.Tensor | None,
                      settings: DecodeSettings, generator: torch.Generator | None) -> list[list[int]]:
        """Per sequence, the accepted drafts plus one token, from the deep states x [B, K + 1, H]."""
        if settings.greedy:
            return [self._emitted(d, t) for d, t in zip(drafts, self._targets(x).tolist())]
        p = self._target_probs(x, settings)
        k = p.shape[1] - 1
        padded = self._padded(drafts, k, p.device)
        counts = torch.tensor([len(d) for d in drafts], dtype=torch.int64, device=p.device)
        q = p.new_zeros(len(drafts), 0, p.shape[-1]) if q is None else q[:, :k]
        accepted, token = speculative_accept(padded, counts, q, p, generator)
        return [d[:a] + [t] for d, a, t in zip(drafts, accepted.tolist(), token.tolist())]

    @staticmethod
    def _record(stats: GenerationStats, drafted: int, accepted: int) -> None:
        for j in range(drafted):
            if j >= len(stats.drafted_at):
                stats.drafted_at.append(0)
                stats.accepted_at.append(0)
            stats.drafted_at[j] += 1
            stats.accepted_at[j] += int(j < accepted)
        stats.rounds += 1
        stats.draft_steps += drafted

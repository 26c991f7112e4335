"""The decode loop: one round function (draft, verify, accept, commit) for every device and decode mode.

Round state, per sequence b of a batch: ``pos[b]`` tokens have keys/values in every layer; ``last[b]`` is the
newest token, emitted but not yet run through the model; it sits at position ``pos[b]``.

    draft   the drafter (``drafting.py``) proposes each sequence's drafts d1, d2, ... step by step, within the
            round's room (max_draft_steps, max_new_tokens, the cache) and up to EOS; a sequence drafts on while
            its proposals are confident. Every input (last, then the drafts) runs through layers 0..l-1 (and the
            adapter, where the drafter uses it) once, each sequence at its own offset, its layer-l state kept: the
            inputs not yet run go in one forward just before a drafter asks for the draft head, and at the end.
    verify  the kept layer-l states of [last, d1..dk] run through layers l..L-1 in one forward for the whole
            batch -> targets t0..tk with the accepted lengths (greedy) or distributions p1..p_{k+1} (sampling).
            Without a drafter (vanilla) the round verifies [last] from layer 0.
    accept  greedy: a = longest prefix with d_i == t_{i-1}; emit d1..da and the bonus token t_a.
            sampling: the speculative rule of ``sampling.speculative_accept`` (lossless in distribution).
    commit  pos += a + 1; last = the emitted token; the drafter sees the emitted tokens. Rejected and padding
            positions are overwritten later.

The steps (``graphs.DecodeSteps``) are the same on every device: plain calls, or static-shape steps replayed as
CUDA graphs (on CUDA with the triton backend) or eagerly over the same static buffers (``graphs="eager"``, how
the tests check that path on CPU). Sequences of a batch keep their own positions; a finished sequence's cache
rows are dropped (``keep_rows``), so it costs nothing afterwards.

Host syncs per round (counted in ``steps.syncs``): one per draft step in which a drafter asked for the draft head
(its tokens and probabilities decide whether drafting goes on) and one for the verification's result; the
reference backend's per-sequence attention adds one per call, which costs nothing on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import Adapter, adapter_block
from .backend import resolve_backend
from .backend.torch_ref import top1
from .cache import StaticKVCache
from .config import DecodeSettings
from .drafting import Drafter, HeadProposal, Proposal
from .graphs import DecodeSteps, graph_mode, warm_up
from .models import PackedModel
from .sampling import draft_distributions, sample, speculative_accept, target_probs
from .weights import EngineWeights

# Pads a row's drafts up to the round's widest in greedy verification, where acceptance compares drafts with the
# targets: no target equals it, so a row's acceptance ends with its own drafts (0, a token id, once let a row without
# drafts accept the padding when its target was token 0).
NO_TOKEN = -1


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

    def record_round(self, drafted: int, accepted: int) -> None:
        """One verification round that proposed ``drafted`` drafts and accepted ``accepted`` of them."""
        for j in range(drafted):
            if j >= len(self.drafted_at):
                self.drafted_at.append(0)
                self.accepted_at.append(0)
            self.drafted_at[j] += 1
            self.accepted_at[j] += int(j < accepted)
        self.rounds += 1
        self.draft_steps += drafted

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
                 max_draft_steps: int = 6, graphs: bool | str | None = None, step_cache=None):
        """``backend``: a backend object, its name, or None for the device's default (triton on CUDA).

        ``graphs``: decode steps replayed as CUDA graphs or compiled (``graphs.py``). None: CUDA graphs where the
        backend is triton on a CUDA device, compiled steps where it is inductor; True: CUDA graphs (an error
        elsewhere); ``"compile"``: compiled steps (the inductor backend only); False: off (the inductor backend
        then runs its ops eagerly: the reference the compiled steps are tested against); ``"eager"``: the CUDA
        graph loop without capturing (runs anywhere; how the tests check that loop on CPU).

        ``step_cache``: a ``step_cache.StepCache`` where compiled steps are kept as AOTInductor packages for later
        processes (``packaged.py``), or None (compiled in this process only)."""
        self.w = packed
        self.cfg = packed.config
        self.ops = resolve_backend(backend, packed.device, packed.dtype)
        self.graph_mode = graph_mode(self.ops, packed.device, graphs)
        self.step_cache = step_cache if self.graph_mode == "compile" else None
        dtype, device = packed.dtype, packed.device
        if max_len > packed.rope_cos.shape[0]:
            raise ValueError(f"max_len={max_len} exceeds the RoPE table ({packed.rope_cos.shape[0]} positions)")
        self.cos = packed.rope_cos[:max_len].to(dtype)
        self.sin = packed.rope_sin[:max_len].to(dtype)
        if adapter is not None:
            adapter.config.check_matches(self.cfg)
        self.adapter = adapter
        self.weights = EngineWeights.prepare(packed, adapter, self.ops.product_dtype(dtype, device),
                                             frozen=self.graph_mode == "compile")
        self.w, self.a = self.weights.model, self.weights.adapter
        self._allocate(1, max_len, max_draft_steps)

    def _weights(self, x: torch.Tensor) -> tuple:
        """(model weights, adapter weights) for products over the rows of x [..., H] (``EngineWeights.for_rows``)."""
        return self.weights.for_rows(several_rows=x.numel() > x.shape[-1])

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _allocate(self, batch: int, max_len: int, max_draft_steps: int) -> None:
        """The static buffers for ``batch`` sequences: caches and the kept layer-l states of one round."""
        c, device = self.cfg, self.w.device
        dtype = self.ops.cache_dtype(self.w.dtype, device)
        self.cache = StaticKVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        if self.adapter is not None:
            self.adapter_cache = StaticKVCache(1, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        self._grow_draft_buffer(max_draft_steps)

    def _grow_draft_buffer(self, steps: int) -> None:
        # graphs hold pointers into the caches and this buffer (``_allocate`` comes here too): new buffers, new graphs;
        # compiled steps read the engine's buffers afresh at each call and are kept (a compile takes long)
        previous = getattr(self, "steps", None)
        self.steps = DecodeSteps(self, {"off": "plain"}.get(self.graph_mode, self.graph_mode))
        if previous is not None and self.graph_mode == "compile":
            self.steps.graphs = previous.graphs
        # zeros, not empty: a sequence with fewer drafts than the batch's longest leaves stale rows that verification
        # reads as padding, and they must be finite
        self.shallow_states = torch.zeros(self.cache.batch, steps + 1, self.cfg.hidden_size, dtype=self.w.dtype,
                                          device=self.w.device)
        # each sequence's adapter output at its newest input run so far: the draft head's input
        self.newest = torch.zeros(self.cache.batch, self.cfg.hidden_size, dtype=self.w.dtype, device=self.w.device)

    # ---- positions -------------------------------------------------------------------------------------------
    def _starts(self, pos: list[int], offset: int = 0) -> int | torch.Tensor:
        """Start positions for the ops: an int for one sequence, a [B] int64 tensor for a batch."""
        if len(pos) == 1:
            return pos[0] + offset
        return torch.tensor(pos, dtype=torch.int64, device=self.w.device) + offset

    # ---- model pieces ----------------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, start: int | torch.Tensor, first: int, stop: int,
                end: int | None = None) -> torch.Tensor:
        """Run decoder layers first..stop-1 on x [B, T, H] at positions start..start+T-1, writing their caches.

        ``start`` is an int (one sequence), or a [B] int64 device tensor: per sequence in a batch, and the form the
        triton backend takes inside a CUDA graph and compiled steps take on CPU; ``end`` the host's bound on the
        keys attention reads (``TorchBackend.attention``)."""
        ops, c = self.ops, self.cfg
        layers = self._weights(x)[0].layers
        for i in range(first, stop):
            w = layers[i]
            k_cache, v_cache = self.cache.layer(i)
            q = ops.qkv_rope_cache_write(x, w.input_norm, c.rms_norm_eps, w.w_qkv, w.b_qkv, self.cos, self.sin,
                                         k_cache, v_cache, start, c.num_heads, c.num_kv_heads)
            x = ops.linear_residual(ops.attention(q, k_cache, v_cache, start, c.layer_windows[i], end), w.w_o, x)
            x = ops.norm_mlp_residual(x, w.post_norm, c.rms_norm_eps, w.w_gate_up, w.w_down)
        return x

    def _adapter(self, h: torch.Tensor, start: int | torch.Tensor, end: int | None = None) -> torch.Tensor:
        """The adapter block (before its final norm) on layer-l states h [B, T, H], writing its cache."""
        k_cache, v_cache = self.adapter_cache.layer(0)
        a = self._weights(h)[1]
        mlp = None if a.gate_up is None else (a.post_norm, a.gate_up, a.down)
        return adapter_block(self.ops, h, a.input_norm, a.qkv, a.o, self.cfg.rms_norm_eps, self.cos, self.sin,
                             k_cache, v_cache, start, self.cfg.num_heads, self.cfg.num_kv_heads, end, mlp)

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weights(x)[0]
        return self.ops.verify_head(x, w.final_norm, self.cfg.rms_norm_eps, w.lm_head)

    # ---- sampling pieces (temperature > 0) -------------------------------------------------------------------
    def _propose_sampled(self, adapter_out: torch.Tensor, settings: DecodeSettings,
                         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From adapter outputs [B, H], draw draft tokens from the processed draft distributions q: (token ids [B],
        the raw distribution's top-1 probability [B] for the confidence stop, q over the full vocabulary [B, V])."""
        c, a = self.cfg, self._weights(adapter_out)[1]
        logits = self.ops.linear(self.ops.rms_norm(adapter_out, a.norm, c.rms_norm_eps), a.head).float()
        confidence = top1(logits)[1]
        q = target_probs(logits, settings)
        index = sample(q, generator)
        if a.vocab is None:
            return index, confidence, q
        full = q.new_zeros(q.shape[0], c.vocab_size)
        full[:, a.vocab] = q
        return a.vocab[index], confidence, full

    def _target_probs(self, x: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
        """Deep states [B, T, H] -> the full model's processed next-token distributions p [B, T, V]."""
        w = self._weights(x)[0]
        logits = self.ops.linear(self.ops.rms_norm(x, w.final_norm, self.cfg.rms_norm_eps), w.lm_head)
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
        if exit_layer is None or self.adapter is None:
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

    def _budgets(self, seqs: "_Sequences", settings: DecodeSettings) -> list[int]:
        """Per row, the drafts a round has room for: k + 1 new tokens within max_new_tokens and the cache."""
        return [min(settings.max_draft_steps, settings.max_new_tokens - len(seqs.tokens[i]) - 1,
                    self.max_len - p - 2) for i, p in zip(seqs.rows, seqs.pos)]

    def draft(self, rnd: "RoundDrafts", drafter: Drafter, seqs: list[int], settings: DecodeSettings,
              eos: set[int], generator: torch.Generator | None = None, run_last: bool = True) -> None:
        """Ask ``drafter`` for every drafting row's next tokens (``seqs[r]``: row r's prompt index) until none
        drafts on; every input ends up run through layers 0..l-1 (and the adapter), its layer-l state kept.
        ``run_last=False`` leaves the inputs no head needed unrun (``rnd.ran`` says which ran): for a caller that
        verifies elsewhere (the vLLM proposer)."""
        while any(rnd.drafting):
            head = self._head_once(rnd, settings, generator)
            for r, go in enumerate(rnd.drafting):
                if go:
                    rnd.take(r, drafter.propose(seqs[r], rnd.tokens[r], rnd.room(r), lambda r=r: head(r)), eos)
        if run_last:
            self._run_pending(rnd, settings.exit_layer, drafter.uses_adapter)

    def _head_once(self, rnd: "RoundDrafts", settings: DecodeSettings,
                   generator: torch.Generator | None) -> Callable[[int], HeadProposal]:
        """Row r's draft-head proposal, computed for every row on the first ask of a draft step (one sync)."""
        computed: list = []

        def head(r: int) -> HeadProposal:
            if not computed:
                if self.adapter is None:
                    raise ValueError("the drafter asked for the draft head, and this model has no adapter")
                computed.extend(self._propose(rnd, settings, generator))
                self.steps.syncs += 1
            tokens, probs, q = computed
            return HeadProposal(tokens[r], probs[r], None if q is None else q[r])

        return head

    def _propose(self, rnd: "RoundDrafts", settings: DecodeSettings,
                 generator: torch.Generator | None) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Every row's inputs not yet run, then the draft head on each row's newest -> (tokens, top-1
        probabilities, q when sampling). Greedy, with one input pending in every row, both are one draft step
        (``DecodeSteps.draft``)."""
        if settings.greedy and all(len(rnd.pending(r)) == 1 for r in range(len(rnd.last))):
            token, prob = self._run_pending(rnd, settings.exit_layer, True, head=True)
            return token.tolist(), prob.tolist(), None
        self._run_pending(rnd, settings.exit_layer, True)
        newest = self.newest[:len(rnd.last)]
        if settings.greedy:
            token, prob = self.steps.head(newest)
            return token.tolist(), prob.tolist(), None
        token, prob, q = self._propose_sampled(newest, settings, generator)
        return token.tolist(), prob.tolist(), q

    def _run_pending(self, rnd: "RoundDrafts", exit_layer: int, adapter: bool,
                     head: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One forward of layers 0..l-1 (and the adapter) over every row's inputs not yet run, each at its own
        offset; their layer-l states go to ``shallow_states``, the newest adapter output to ``newest``. ``head``
        (one input pending in every row): the draft step, returning the head's (token [B], probability [B]) on
        each row's newest."""
        inputs = [rnd.pending(r) for r in range(len(rnd.last))]
        width = max(len(x) for x in inputs)
        if width == 0:
            return None
        ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], dtype=torch.int64, device=self.w.device)
        starts = [p + k for p, k in zip(rnd.pos, rnd.ran)]
        if head:
            h, out, token, prob = self.steps.draft(ids, starts, exit_layer)
        else:
            (h, out), token, prob = self.steps.shallow(ids, starts, exit_layer, adapter), None, None
        for r, x in enumerate(inputs):  # a row's padding (past its own inputs) is never kept
            if x:
                self.shallow_states[r, rnd.ran[r]:rnd.ran[r] + len(x)] = h[r, :len(x)]
                if out is not None:
                    self.newest[r] = out[r, len(x) - 1]
                rnd.ran[r] += len(x)
        return None if token is None else (token, prob)

    def verify(self, rnd: "RoundDrafts", first: int, settings: DecodeSettings,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """Layers first..L-1 over the kept states of [last, d1..dk] (first = 0: the embedded ``last`` alone, the
        vanilla step), then accept: per row the accepted drafts and one token of the full model's. One sync."""
        n, k = len(rnd.last), rnd.width
        if first == 0:
            states = self.ops.embed(torch.tensor(rnd.last, device=self.w.device)[:, None], self.w.embed)
        else:
            states = self.shallow_states[:n, :k + 1]
        if settings.greedy:  # accepted: the drafts matching the targets, so padding must match no target
            drafts = self._padded(rnd.tokens, k, fill=NO_TOKEN)
            _targets, accepted, bonus = self.steps.verify(states, drafts, rnd.pos, first)
        else:  # the counts bound acceptance; the padding only has to index the vocabulary
            drafts = self._padded(rnd.tokens, k)
            p = self._target_probs(self.steps.deep(states, rnd.pos, first), settings)
            counts = torch.tensor([len(d) for d in rnd.tokens], dtype=torch.int64, device=p.device)
            accepted, bonus = speculative_accept(drafts, counts, draft_distributions(rnd.tokens, rnd.q, rnd.width, p),
                                                  p, generator)
        self.steps.syncs += 1
        return [d[:a] + [t] for d, (a, t) in zip(rnd.tokens, torch.stack([accepted, bonus], 1).tolist())]

    def _padded(self, drafts: list[list[int]], k: int, fill: int = 0) -> torch.Tensor:
        """Drafts as a [B, k] int64 tensor, padded with ``fill`` after each row's own drafts."""
        return torch.tensor([d + [fill] * (k - len(d)) for d in drafts], dtype=torch.int64,
                            device=self.w.device).view(len(drafts), k)

    def commit(self, pos: list[int], emitted: list[int]) -> list[int]:
        """Every sequence moves on by the tokens it emitted this round (accepted drafts + 1)."""
        pos = [p + e for p, e in zip(pos, emitted)]
        self._set_lengths(pos)
        return pos

    def _caches(self) -> list[StaticKVCache]:
        """The model's KV cache and the adapter's (where there is one)."""
        return [self.cache] + ([self.adapter_cache] if self.adapter is not None else [])

    def _set_lengths(self, lengths: list[int]) -> None:
        values = torch.tensor(lengths, dtype=torch.int64, device=self.w.device)
        for cache in self._caches():
            cache.lengths[:len(lengths)] = values

    # ---- compiling up front -----------------------------------------------------------------------------------
    @torch.no_grad()
    def warm_up(self, exit_layer: int | None, batch_sizes: tuple[int, ...] = (1,), sampling: bool = False) -> float:
        """Compile every kind of decode step that generation at these batch sizes uses (drafting from
        ``exit_layer`` with the adapter when there is one; the deep steps too with ``sampling``), so that no compile
        falls inside a timed or interactive call; returns the seconds it took (0 unless the steps are compiled).
        The caches are reset afterwards."""
        return warm_up(self, exit_layer, batch_sizes, sampling)

    def _reset(self, active: int) -> None:
        for cache in self._caches():
            cache.reset(active)

    # ---- the loop --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, settings: DecodeSettings, eos: set[int], speculate: bool = True,
                 callback: Callable[[list[int]], None] | None = None, generator: torch.Generator | None = None,
                 drafter: Drafter | None = None) -> tuple[list[int], GenerationStats]:
        """Decode one prompt [1, n] int64; returns (new tokens, statistics)."""
        on_tokens = None if callback is None else (lambda _index, new: callback(new))
        return self.generate_batch([prompt[0]], settings, eos, speculate, on_tokens, generator, drafter)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[torch.Tensor], settings: DecodeSettings, eos: set[int],
                       speculate: bool = True, callback: Callable[[int, list[int]], None] | None = None,
                       generator: torch.Generator | None = None,
                       drafter: Drafter | None = None) -> list[tuple[list[int], GenerationStats]]:
        """Decode prompts (1-D int64 tensors of any lengths) together; returns (new tokens, statistics) per prompt.

        Greedy when ``settings.temperature == 0``, else lossless speculative sampling drawing from ``generator``.
        ``drafter``: what proposes drafts (``drafting.py``); None: the adapter (after the context lookup when
        ``settings.lookup`` > 0). ``speculate=False`` decodes without drafting (vanilla).
        ``callback(index, new_tokens)`` follows each sequence. A sequence's ``decode_s`` runs until it finished.
        """
        drafter = self._drafter(speculate, drafter, settings)
        seqs = self._start(prompts, settings, drafter, generator, callback)
        start = time.perf_counter()
        while self._drop_finished(seqs, settings, eos, start):
            rnd = RoundDrafts.start(seqs.last, seqs.pos, self._budgets(seqs, settings) if drafter else None)
            speculating = drafter is not None and max(rnd.budget) > 0
            if speculating:
                self.draft(rnd, drafter, seqs.rows, settings, eos, generator)
            emitted = self.verify(rnd, settings.exit_layer if speculating else 0, settings, generator)
            self._commit_round(seqs, rnd, emitted, drafter, eos, callback)
        for stats, new in zip(seqs.stats, seqs.tokens):
            stats.new_tokens = len(new)
        return list(zip(seqs.tokens, seqs.stats))

    def _drafter(self, speculate: bool, drafter: Drafter | None, settings: DecodeSettings) -> Drafter | None:
        from .drafting import make_drafter

        if not speculate:
            return None
        return make_drafter("kangaroo" if drafter is None else drafter, settings.lookup, self.adapter is not None)

    def _start(self, prompts: list[torch.Tensor], settings: DecodeSettings, drafter: Drafter | None,
               generator: torch.Generator | None, callback) -> "_Sequences":
        """Buffers for the batch, the prefill, the first token of every sequence, the drafter's start."""
        if not prompts:
            raise ValueError("no prompts to decode")
        lengths = [int(p.shape[0]) for p in prompts]
        for n in lengths:
            if n + 1 > self.max_len:
                raise ValueError(f"prompt of {n} tokens does not fit the cache of {self.max_len} positions "
                                 "(it needs prompt + 1)")
        batch = len(prompts)
        if batch > self.cache.batch:
            self._allocate(batch, self.max_len, settings.max_draft_steps)
        if drafter is not None and settings.max_draft_steps + 1 > self.shallow_states.shape[1]:
            self._grow_draft_buffer(settings.max_draft_steps)
        self._reset(batch)
        start = time.perf_counter()
        padded = torch.zeros(batch, max(lengths), dtype=torch.int64, device=self.w.device)
        for b, p in enumerate(prompts):
            padded[b, :lengths[b]] = p
        exit_layer = None if drafter is None else settings.exit_layer
        last = self._next_tokens(self.prefill(padded, lengths, exit_layer), settings, generator)
        prefill_s = time.perf_counter() - start
        seqs = _Sequences(list(range(batch)), list(lengths), last, [[t] for t in last], [
            GenerationStats(prompt_tokens=n, dtype=str(self.w.dtype).replace("torch.", ""), device=str(self.w.device),
                            mode="vanilla" if drafter is None else "kangaroo", prefill_s=prefill_s) for n in lengths])
        if drafter is not None:
            drafter.begin([p.tolist() + [t] for p, t in zip(prompts, last)], settings.threshold)
        for b, t in enumerate(last):
            if callback:
                callback(b, [t])
        return seqs

    def _drop_finished(self, seqs: "_Sequences", settings: DecodeSettings, eos: set[int], start: float) -> bool:
        """Record the finished sequences' stop reasons and drop their rows; False once none is left."""
        reasons = [stop_reason(seqs.tokens[i], p, settings, eos, self.max_len) for i, p in zip(seqs.rows, seqs.pos)]
        if not any(reasons):
            return True
        for i, reason in zip(seqs.rows, reasons):
            if reason:
                seqs.stats[i].stop_reason = reason
                seqs.stats[i].decode_s = time.perf_counter() - start
        keep = [r for r, reason in enumerate(reasons) if not reason]
        if not keep:
            return False
        for cache in self._caches():
            cache.keep_rows(keep)
        seqs.rows, seqs.pos, seqs.last = ([values[r] for r in keep] for values in (seqs.rows, seqs.pos, seqs.last))
        return True

    def _commit_round(self, seqs: "_Sequences", rnd: "RoundDrafts", emitted: list[list[int]],
                      drafter: Drafter | None, eos: set[int], callback) -> None:
        """Statistics, the emitted tokens (cut after an EOS) to their sequences and the drafter, then commit."""
        for r, new in enumerate(emitted):
            i = seqs.rows[r]
            seqs.stats[i].record_round(len(rnd.tokens[r]), len(new) - 1)
            seqs.stats[i].lookup_drafts += rnd.copied[r]
            new = _cut_after_eos(new, eos)
            emitted[r] = new
            seqs.tokens[i].extend(new)
            seqs.last[r] = new[-1]
            if drafter is not None:
                drafter.commit(i, new)
            if callback:
                callback(i, new)
        seqs.pos = self.commit(seqs.pos, [len(new) for new in emitted])


def stop_reason(tokens: list[int], pos: int, settings: DecodeSettings, eos: set[int], max_len: int) -> str:
    """Why a sequence with ``tokens`` emitted, at ``pos`` in a cache of ``max_len``, stops now ("": it goes on)."""
    if tokens[-1] in eos:
        return "eos"
    if len(tokens) >= settings.max_new_tokens:
        return "max_new_tokens"
    if pos + 1 >= max_len:
        return "cache_full"
    return ""


def _cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for j, token in enumerate(tokens):
        if token in eos:
            return tokens[:j + 1]
    return tokens


@dataclass
class _Sequences:
    """The batch being decoded: per cache row its prompt index, position and newest token; per prompt its tokens
    and statistics."""

    rows: list[int]
    pos: list[int]
    last: list[int]
    tokens: list[list[int]]
    stats: list[GenerationStats]


@dataclass
class RoundDrafts:
    """One round's drafts, per cache row r (the sequence at ``pos[r]`` with newest token ``last[r]``)."""

    last: list[int]
    pos: list[int]
    budget: list[int]          # the most drafts the round has room for
    tokens: list[list[int]]    # the drafts d1, d2, ...
    q: list[list]              # per draft, its draft distribution [V] when sampling, or None (a point mass)
    ran: list[int]             # inputs [last, d1, d2, ...] already through layers 0..l-1
    drafting: list[bool]       # may draft on
    copied: list[int]          # drafts from proposals marked ``copied``

    @classmethod
    def start(cls, last: list[int], pos: list[int], budget: list[int] | None, ran: int = 0) -> "RoundDrafts":
        """A round with no drafts yet; ``ran``: 1 where every row's newest token already ran through the shallow
        layers (its keys written, its adapter output in ``Engine.newest``), as after the vLLM proposer's catch-up."""
        n = len(last)
        budget = [0] * n if budget is None else budget
        return cls(list(last), list(pos), budget, [[] for _ in range(n)], [[] for _ in range(n)], [ran] * n,
                   [k > 0 for k in budget], [0] * n)

    @property
    def width(self) -> int:
        """The longest row's drafts."""
        return max(len(d) for d in self.tokens)

    def room(self, r: int) -> int:
        return self.budget[r] - len(self.tokens[r])

    def pending(self, r: int) -> list[int]:
        """Row r's inputs not yet run through the shallow layers."""
        return ([self.last[r]] + self.tokens[r])[self.ran[r]:]

    def take(self, r: int, proposal: Proposal, eos: set[int]) -> None:
        """Append row r's proposal, cut to its room and after an EOS; it drafts on while the proposal was
        confident, room is left and no EOS was drafted. An empty proposal stops it."""
        tokens = _cut_after_eos(proposal.tokens[:self.room(r)], eos)
        if not tokens:
            self.drafting[r] = False
            return
        self.tokens[r].extend(tokens)
        self.q[r].extend((proposal.q or [None] * len(tokens))[:len(tokens)])
        self.copied[r] += len(tokens) if proposal.copied else 0
        self.drafting[r] = proposal.confident and self.room(r) > 0 and tokens[-1] not in eos

"""The decode steps over the engine's static KV cache: plain calls, CUDA graphs captured once and replayed, or compiled.

Five steps make every round of every decode mode (``Engine.generate_batch``), each kept once per (kind, batch, new
tokens, layers):

    shallow  tokens [B, T], position [B]      -> layer-l states [B, T, H], adapter outputs [B, T, H] (or None)
                                                 (embedding, layers 0..l-1, the adapter where the drafter uses it)
    head     adapter outputs [B, H]           -> draft token [B], its probability [B]    (adapter norm, draft head)
    draft    tokens [B, 1], position [B]      -> shallow's outputs and head's on them, in one step (a greedy
                                                 draft step after one new token per row: most of them)
    verify   states [B, T, H], drafts [B, T-1], position [B]
                                              -> targets [B, T], accepted length [B], bonus token [B]
                                                 (layers first..L-1, verification head; first = 0 is vanilla)
    deep     states [B, T, H], position [B]   -> deep states [B, T, H]     (layers first..L-1; for sampling)

Mode "compile" (the inductor backend on CPU) runs each step as one ``torch.compile``d function (``CompiledStep``):
Inductor fuses the small ops of a layer into C++ loops. Positions come in as a [B] tensor and the keys' bound ``end`` as
an int; batch, T and ``end`` are symbolic, so a kind of step compiles at most four times (batch of one or more, T of one
or more). Where this CPU has oneDNN's bf16 products (AVX512-BF16, AMX), freezing folds the weights in as constants
packed for them; the weights are read through ``weights.FrozenWeights`` modules (freezing folds only module parameters).
Packed weights are oneDNN tensors, which Inductor's graph cache refuses to store, and freezing turns the AOT graph cache
off, so there a ``CompiledStep`` compiles again in each process (about half a minute per kind of step for SmolLM2-135M
on two cores); with the engine's step cache each kind is a ``packaged.PackagedStep`` instead, an AOTInductor package a
later process loads. On a CPU without them (AVX2) a bf16 model's steps have nothing to pack: one-row products read the
bf16 weights, those of several rows (verification of several tokens, batches) FBGEMM's float16 copies through a
registered op (``backend/fbgemm.py``); they compile without freezing, and both on-disk caches serve them to a second
process (``compile_options``). Only where FBGEMM is missing too do the steps of several rows read float32 copies of the
weights (``weights.EngineWeights``), frozen and packed for oneDNN.

``DecodeSteps(engine, mode)``: mode "plain" calls the step functions directly (positions as the engine's starts:
a plain int for one sequence); "eager" and "cuda" keep the static-buffer discipline of CUDA graphs, inputs copied
into static tensors and positions as device tensors, "eager" running the function on them at each call (how the
tests check this path on CPU), "cuda" warming up on a side stream, capturing, and replaying (every graph sharing
one memory pool). The caches are the engine's static buffers, written in place by the kernels; rows of finished
sequences move within the same buffers, so captured pointers stay valid. One verify graph per verification length
T (at most max_draft_steps + 1): a padded single length would run every round at the longest length.

Host syncs per round are the loop's, not the steps': one per draft step whose drafter asked the head (the tokens
and probabilities decide whether drafting goes on) and one for the verification's accepted lengths and bonus
tokens, counted in ``DecodeSteps.syncs``.
"""
from __future__ import annotations

import sys
import threading
import time
import types
from typing import Callable

import torch


class StepGraph:
    """``fn(**static_inputs)`` captured in a CUDA graph; calling the object replays it on new inputs.

    With ``capture=False`` nothing is captured: a call copies the inputs into the static tensors and runs ``fn``
    on them, so code written against a ``StepGraph`` runs unchanged where CUDA graphs do not exist."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], static_inputs: dict[str, torch.Tensor],
                 pool=None, warmup: int = 2, capture: bool = True):
        if capture:
            for name, tensor in static_inputs.items():
                if not tensor.is_cuda:
                    raise ValueError(f"static input {name!r} is on {tensor.device}: CUDA graphs need CUDA tensors")
        self.fn, self.inputs, self.capture = fn, static_inputs, capture
        self.replays = 0
        self.graph = None
        if not capture:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(**static_inputs)

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if inputs.keys() != self.inputs.keys():
            raise ValueError(f"replay needs inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        for name, value in inputs.items():
            if value.shape != self.inputs[name].shape:
                raise ValueError(f"input {name!r} has shape {tuple(value.shape)}, the graph was captured for "
                                 f"{tuple(self.inputs[name].shape)}")
            self.inputs[name].copy_(value)
        self.replays += 1
        if self.graph is None:
            self.outputs = self.fn(**self.inputs)
        else:
            self.graph.replay()
        return self.outputs


def compile_options(products: torch.dtype = torch.bfloat16) -> dict[str, bool]:
    """Inductor's options for compiled steps whose products run in ``products``: freezing (weights folded in as
    constants packed for oneDNN) where oneDNN has those products here (bf16: AVX512-BF16 or AMX; float32: any CPU
    torch's oneDNN runs on); elsewhere no freezing, which leaves nothing to pack and keeps the compiled steps in
    Inductor's on-disk caches (a second process starts in seconds, not minutes). Those cached steps get a C++
    wrapper too (``cpp_wrapper``: the step's calls made from C++, not from generated Python; a draft step of the
    embedded model 0.1-0.2 ms faster in an ad-hoc A/B on a 2-core CPU, its cold compile about a third longer, paid
    once per machine); frozen steps, compiled again in every process, keep the Python wrapper."""
    from .backend.cpu import onednn_available

    if products == torch.bfloat16:
        freezing = onednn_available()
    else:
        freezing = products == torch.float32 and torch.backends.mkldnn.is_available()
    return {"freezing": freezing, "cpp_wrapper": not freezing}


# The guards a compiled step keeps: those on what may differ between its calls. Its arguments' shapes, strides and
# dtypes (tensor guards; the symbolic sizes' ranges), and the global state (grad mode and the like). Dropped (0.1-0.3
# ms a call of the embedded model's draft step in ad-hoc A/Bs on a 2-core CPU): guards on the step's code, closure,
# configuration and module weights, fixed for its life (``DecodeSteps`` keys them), and tensor guards on the
# engine's buffers it reaches through its closure (caches, RoPE tables): their dtype, strides and sizes are the
# engine's for its life, but for the number of rows, which ``DecodeSteps._compiled`` checks against the step's own.
_KEPT_GUARDS = frozenset({"TENSOR_MATCH", "SHAPE_ENV", "DUPLICATE_INPUT", "GRAD_MODE", "GLOBAL_STATE",
                          "DETERMINISTIC_ALGORITHMS", "TORCH_FUNCTION_STATE", "DEFAULT_DEVICE",
                          "AUTOGRAD_SAVED_TENSORS_HOOKS"})


def _kept_guards(entries, arguments: frozenset[str]) -> list[bool]:
    """Dynamo's ``guard_filter_fn`` for a compiled step whose function takes ``arguments``: keep ``_KEPT_GUARDS``,
    tensor guards on those arguments only."""
    return [e.guard_type in _KEPT_GUARDS and (e.guard_type != "TENSOR_MATCH" or e.name in arguments)
            for e in entries]


class CompiledStep:
    """``fn`` compiled by ``torch.compile`` into one step (Inductor; C++ on CPU), its bf16 weights frozen and
    prepacked where oneDNN has bf16 products here (``compile_options``): the CPU counterpart of ``StepGraph``, with
    the same call. The inputs named in ``dynamic`` (Dynamo source names, ``L['end']``, ``L['states']:1``) are
    compiled as symbolic from the first call, so one compiled step serves every context length and every length of
    verification above one. Each step compiles its own copy of ``fn``'s code: Dynamo keeps its compiled entries per
    code object, and steps sharing one would walk each other's guards at every call."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], dynamic: list[str], name: str = "step",
                 products: torch.dtype = torch.bfloat16):
        self.options = compile_options(products)
        own = _own_code(fn)
        code = getattr(own, "__func__", own).__code__
        arguments = frozenset(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
        guards = lambda entries: _kept_guards(entries, arguments)  # noqa: E731
        self.fn = torch.compile(own, fullgraph=True, options={**self.options, "guard_filter_fn": guards})
        self.dynamic = ",".join(dynamic)
        self.name = name
        self.replays = 0

    def __call__(self, **inputs) -> tuple[torch.Tensor, ...]:
        if self.replays == 0:
            when = "once per process" if self.options["freezing"] else "seconds when Inductor's on-disk cache has it"
            print(f"kangaroo_fast: compiling the {self.name} step (up to a minute; {when})", file=sys.stderr,
                  flush=True)
        self.replays += 1
        _install_compile_callbacks()
        _calling.step = self  # read by ``_on_compile_start`` if this call compiles
        try:
            return self.fn(**inputs)
        finally:
            _calling.step = None

    def configs(self) -> list[tuple[object, str, object]]:
        """(config module, name, value) for a compile of this step. Dynamo reads the symbolic sources and freezing
        while tracing (module weights become constants), Inductor its options while compiling. Only the named
        sources are symbolic: Dynamo's automatic dynamic shapes would make any size symbolic that differs from an
        earlier compile of the same code, remembered by the code's file, line and name, which the steps of every
        engine share (a second model's head count came out symbolic, and attention refused it)."""
        inductor = torch._inductor.config
        return [(torch.compiler.config, "dynamic_sources", self.dynamic),
                (torch._dynamo.config, "automatic_dynamic_shapes", False),
                *((inductor, name, value) for name, value in self.options.items())]


# The configuration a compiled step needs is set only while Dynamo compiles one of its calls (a guard failing later
# recompiles too), through Dynamo's compile callbacks, and restored at the compile's end: the process's own
# configuration stays as it was, and a call that compiles nothing pays nothing (writing and restoring the four
# values around every call cost ~0.1 ms, torch's config modules being slow to write, against a ~3.5 ms draft step
# of the embedded model on a 2-core CPU).
_calling = threading.local()  # .step: the CompiledStep this thread is calling; .saved: values a compile replaced


def _on_compile_start(_args) -> None:
    step = getattr(_calling, "step", None)
    if step is None:  # a compile that is not a step's (the user's own torch.compile)
        return
    configs = step.configs()
    _calling.saved = [(module, name, getattr(module, name)) for module, name, _value in configs]
    for module, name, value in configs:
        setattr(module, name, value)


def _on_compile_end(_args) -> None:
    saved, _calling.saved = getattr(_calling, "saved", None), None
    for module, name, value in saved or ():
        setattr(module, name, value)


def _install_compile_callbacks() -> None:
    """Checked at every call of a compiled step: ``torch._dynamo.reset()`` drops every compile callback."""
    handler = torch._dynamo.callback_handler
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)
        handler.register_end_callback(_on_compile_end)


def _own_code(fn: Callable) -> Callable:
    """``fn`` (a function or a bound method; its arguments are what ``_kept_guards`` guards) on a fresh copy of its
    code object."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(_own_code(fn.__func__), fn.__self__)
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return own


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a fresh tensor of its shape. ``contiguous()`` is not enough: it keeps any stride of
    a size-1 dimension (one row sliced from a batch buffer), and a compiled step guards on every stride."""
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    return x if x.stride() == tuple(reversed(strides)) else x.clone(memory_format=torch.contiguous_format)


class DecodeSteps:
    """The shallow, head, verify and deep steps of ``engine``: plain, replayable graphs or compiled (module
    docstring)."""

    MODES = ("plain", "eager", "cuda", "compile")

    def __init__(self, engine, mode: str = "plain"):
        from .backend.inductor import InductorBackend
        from .backend.triton_backend import TritonBackend

        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(self.MODES)}")
        if mode == "cuda" and not isinstance(engine.ops, TritonBackend):
            raise ValueError(f"CUDA graphs run on the triton backend, not {type(engine.ops).__name__}")
        if mode == "cuda" and engine.w.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {engine.w.device}")
        if mode == "compile" and not isinstance(engine.ops, InductorBackend):
            raise ValueError(f"compiled steps run on the inductor backend, not {type(engine.ops).__name__}")
        if mode == "compile":  # every kind of step is a closure of the same few functions: room for their variants
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.engine, self.mode = engine, mode
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.graphs: dict[tuple, StepGraph] = {}
        self.syncs = 0  # host synchronisations made by the engine's loop (see the module docstring)

    @property
    def capture(self) -> bool:
        return self.mode == "cuda"

    # ---- the step functions ----------------------------------------------------------------------------------
    def _shallow(self, tokens: torch.Tensor, position, stop: int, adapter: bool, end: int | None = None):
        e = self.engine
        h = e._layers(e.ops.embed(tokens, e.w.embed), position, 0, stop, end)
        return h, (e._adapter(h, position, end) if adapter else None)

    def _draft(self, tokens: torch.Tensor, position, stop: int, end: int | None = None):
        h, out = self._shallow(tokens, position, stop, True, end)
        return (h, out, *self._head(out[:, -1]))

    def _head(self, newest: torch.Tensor):
        e = self.engine
        a = e._weights(newest)[1]
        token, prob, _keep = e.ops.draft_propose(newest, a.norm, e.cfg.rms_norm_eps, a.head, a.vocab)
        return token, prob

    def _verify(self, states: torch.Tensor, drafts: torch.Tensor, position, first: int, end: int | None = None):
        e = self.engine
        x = e._layers(states, position, first, e.cfg.num_layers, end)
        if drafts.shape[1] == 0:  # nothing to accept: the targets' first column is the next token
            targets = e._targets(x)
            return targets, torch.zeros_like(targets[:, 0]), targets[:, 0]
        w = e._weights(x)[0]
        return e.ops.verify_accept(x, w.final_norm, e.cfg.rms_norm_eps, w.lm_head, drafts)

    def _deep(self, states: torch.Tensor, position, first: int, end: int | None = None):
        e = self.engine
        return (e._layers(states, position, first, e.cfg.num_layers, end),)

    # ---- calls -----------------------------------------------------------------------------------------------
    def _run(self, key: tuple, fn, inputs: dict[str, torch.Tensor], pos: list[int] | None):
        """``fn`` on ``inputs`` at per-sequence start positions ``pos`` (None: a step without positions): directly
        ("plain"), or replayed."""
        if self.mode == "plain":
            return fn(**inputs, **({} if pos is None else {"position": self.engine._starts(pos)}))
        if pos is not None:
            inputs["position"] = torch.tensor(pos, dtype=torch.int64, device=self.engine.w.device)
        if self.mode == "compile":
            return self._compiled(key, fn, inputs, pos)
        if key not in self.graphs:
            # warm-up and capture run the step for real: on the first inputs, so the cache slots they write are
            # the ones the replay below writes again with the same values
            static = {name: value.clone() for name, value in inputs.items()}
            self.graphs[key] = StepGraph(fn, static, self.pool, capture=self.capture)
        return self.graphs[key](**inputs)

    def _compiled(self, key: tuple, fn, inputs: dict[str, torch.Tensor], pos: list[int] | None):
        """``fn`` compiled: once for one sequence and once for batches, each once for T = 1 and once for longer T
        (``key[1:3]``); the batch, T and the keys' bound ``end`` symbolic (a size of 1 is always its own compile)."""
        bsz = key[1]
        if bsz != self.engine.cache.active:  # the caches' guards are dropped (``_kept_guards``): their rows, checked
            raise RuntimeError(f"a step of {bsz} rows on caches of {self.engine.cache.active} active rows")
        inputs = {name: _dense(value) for name, value in inputs.items()}  # strides are guarded too
        # Dynamo's names of the symbolic sizes, as regular expressions (L['end']):
        # the batch of the inputs and of the caches' views (``StaticKVCache.layer``: made anew for each number of
        # rows), the keys' bound, the new tokens
        dynamic = [rf".*\['{name}'\]:0" for name in inputs] + [r".*\._views\[.*:0"] if bsz > 1 else []
        if pos is not None:
            t = key[2]
            inputs["end"] = min(max(pos) + t, self.engine.max_len)
            dynamic.append(r".*\['end'\]")
            if t > 1:
                dynamic += [rf".*\['{name}'\]:1" for name in inputs if name in ("tokens", "states", "drafts")]
            key = (key[0], "B>1" if bsz > 1 else 1, "T>1" if t > 1 else 1) + key[3:]
        else:
            key = (key[0], "B>1" if bsz > 1 else 1) + key[2:]
        if "drafts" in inputs:  # see _verify_padded
            inputs["drafts"] = torch.nn.functional.pad(inputs["drafts"], (0, 1), value=-1)
        if key not in self.graphs:
            step = fn if "drafts" not in inputs else _verify_padded(fn)
            what = {"shallow": "draft layers", "draft": "draft layers and head", "head": "draft head",
                    "verify": "verification", "deep": "deep layers"}
            name = what[key[0]] + (" for batches" if bsz > 1 else "") + (" of several tokens" if key[2:3] == ("T>1",)
                                                                          else "")
            products = self.engine.weights.for_rows(several_rows=bsz > 1 or key[2:3] == ("T>1",))[0].lm_head.dtype
            if self.engine.step_cache is None:
                self.graphs[key] = CompiledStep(step, dynamic, name, products)
            else:  # an AOTInductor package, from the step cache where a process made it before
                from .packaged import PackagedStep

                in_process = lambda: CompiledStep(step, dynamic, name, products)  # noqa: E731
                self.graphs[key] = PackagedStep(self.engine, step, key, name, compile_options(products)["freezing"],
                                                in_process, self.engine.step_cache)
        return self.graphs[key](**inputs)

    def shallow(self, tokens: torch.Tensor, pos: list[int], stop: int, adapter: bool):
        """Layers 0..stop-1 (and the adapter) on tokens [B, T] at positions pos[b].. -> (h, adapter outputs)."""
        fn = lambda tokens, position, end=None: self._shallow(tokens, position, stop, adapter, end)  # noqa: E731
        return self._run(("shallow", *tokens.shape, stop, adapter), fn, {"tokens": tokens}, pos)

    def draft(self, tokens: torch.Tensor, pos: list[int], stop: int):
        """The draft step: ``shallow`` with the adapter on one new token per row [B, 1], then ``head`` on its adapter
        output, as one step -> (h, adapter outputs, token [B], probability [B])."""
        if tokens.shape[1] != 1:
            raise ValueError(f"a draft step runs one new token per row, not {tokens.shape[1]}")
        fn = lambda tokens, position, end=None: self._draft(tokens, position, stop, end)  # noqa: E731
        return self._run(("draft", *tokens.shape, stop), fn, {"tokens": tokens}, pos)

    def head(self, newest: torch.Tensor):
        """The draft head on the adapter outputs [B, H] -> (token [B], probability [B]); needs no positions."""
        return self._run(("head", newest.shape[0]), self._head, {"newest": newest}, None)

    def verify(self, states: torch.Tensor, drafts: torch.Tensor, pos: list[int], first: int):
        """Layers first..L-1 and the verification head -> (targets [B, T], accepted [B], bonus [B])."""
        fn = lambda states, drafts, position, end=None: self._verify(states, drafts, position, first, end)  # noqa: E731
        return self._run(("verify", *states.shape[:2], first), fn, {"states": states, "drafts": drafts}, pos)

    def deep(self, states: torch.Tensor, pos: list[int], first: int) -> torch.Tensor:
        """Layers first..L-1 -> deep states [B, T, H] (sampling computes its distributions from them)."""
        fn = lambda states, position, end=None: self._deep(states, position, first, end)  # noqa: E731
        return self._run(("deep", *states.shape[:2], first), fn, {"states": states}, pos)[0]

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs.values())


def _verify_padded(fn) -> Callable:
    """A verify step on drafts padded by one column that no target equals (-1) to the width T of ``states``: the
    same acceptance, and one symbolic size for both widths (a width of T - 1 would be 1 at T = 2, a size that
    always compiles on its own, and compare with the targets by broadcasting)."""
    def step(states: torch.Tensor, drafts: torch.Tensor, position: torch.Tensor, end: int):
        torch._check(drafts.shape[1] == states.shape[1])
        return fn(states=states, drafts=drafts, position=position, end=end)

    return step


def graph_mode(ops, device: torch.device, graphs: bool | str | None) -> str:
    """The engine's decode steps for ``graphs`` (``Engine.__init__``) with backend ``ops`` on ``device``: "cuda",
    "compile", "eager" or "off"."""
    from .backend.inductor import InductorBackend
    from .backend.triton_backend import TritonBackend

    capturable = isinstance(ops, TritonBackend) and device.type == "cuda"
    if isinstance(ops, InductorBackend) and graphs in (None, "compile"):
        return "compile"
    if graphs == "compile":
        raise ValueError(f"graphs='compile' needs the inductor backend, not the {ops.name} backend")
    if graphs is None:
        return "cuda" if capturable else "off"
    if graphs is True:
        if not capturable:
            raise ValueError(f"graphs=True needs the triton backend on a CUDA device, not the {ops.name} "
                             f"backend on {device}")
        return "cuda"
    if graphs is False:
        return "off"
    if graphs == "eager":
        return "eager"
    raise ValueError(f"graphs={graphs!r} must be None, True, False, 'eager' or 'compile'")


@torch.no_grad()
def warm_up(engine, exit_layer: int | None, batch_sizes: tuple[int, ...], sampling: bool) -> float:
    """Run every kind of ``engine``'s compiled steps once at each batch size (``Engine.warm_up``); the seconds."""
    if engine.graph_mode != "compile":
        return 0.0
    start = time.perf_counter()
    drafting = exit_layer is not None and engine.adapter is not None
    for bsz in sorted(set(batch_sizes)):
        if bsz > engine.cache.batch:
            engine._allocate(bsz, engine.max_len, engine.shallow_states.shape[1] - 1)
        engine._reset(bsz)
        steps, pos = engine.steps, [8 + r for r in range(bsz)]  # past 1: a size of 1 would compile apart
        for t in (1, 2) if drafting else (1,):
            tokens = torch.zeros(bsz, t, dtype=torch.int64, device=engine.w.device)
            first = exit_layer if drafting else 0
            states = steps.shallow(tokens, pos, exit_layer, True)[0] if drafting else \
                engine.ops.embed(tokens, engine.w.embed)
            if drafting and t == 1:  # the greedy draft step (the shallow step alone: a round's last inputs)
                steps.draft(tokens, pos, exit_layer)
            steps.verify(states, tokens[:, 1:], pos, first)
            if sampling:
                steps.deep(states, pos, first)
        if drafting:  # the head apart: after a copied span, or rows with unlike numbers of inputs
            steps.head(engine.newest[:bsz])
            vanilla = engine.ops.embed(torch.zeros(bsz, 1, dtype=torch.int64, device=engine.w.device), engine.w.embed)
            steps.verify(vanilla, vanilla.new_zeros(bsz, 0, dtype=torch.int64), pos, 0)
            if sampling:
                steps.deep(vanilla, pos, 0)
    engine._reset(1)
    return time.perf_counter() - start

"""Compiled decode steps kept on disk as AOTInductor packages, so that a later process loads its steps in seconds.

A step (``graphs.DecodeSteps``'s functions) is exported once with ``torch.export`` through ``StepModule``: the
engine's weights become the program's parameters (frozen and, where oneDNN has the products here, packed into the
package, as the in-process compile does), its KV caches are inputs written in place (one view per layer, so a write
touches one slot, not the buffer), and the keys' bound ``end`` is the length of a marker tensor (the runtime takes
tensors only). ``torch._inductor.aoti_compile_and_package`` compiles it to C++ and the package goes to the step
cache (``step_cache.StepCache``) under a key of the step, the weights and this machine; a later process with the same
key loads it (``aoti_load_package``: about a second) and calls it without Python in the step. The same shapes are
symbolic as in the in-process compile (batch above one, new tokens above one, ``end``), so one package serves each
kind as one ``CompiledStep`` does. A package that cannot be built here (an op export refuses) falls back to
``CompiledStep`` with a note.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import step_cache

MAX_BATCH = 1024  # the symbolic batch's bound in a package (any engine's batch stays below it)


def weights_digest(engine) -> str:
    """A digest of every tensor the engine's steps read (model, adapter, widened copies, RoPE tables) and of the
    model's configuration; computed once per engine."""
    digest = getattr(engine, "_weights_digest", None)
    if digest is None:
        tensors = [engine.cos, engine.sin]
        for weights in engine.weights.frozen():
            for module in weights.modules():
                tensors += [value for _name, value in sorted(vars(module).items()) if isinstance(value, torch.Tensor)]
                tensors += [p for _name, p in sorted(module.named_parameters(recurse=False))]
        digest = step_cache.key_of({"tensors": step_cache.tensor_digest(tensors), "config": repr(engine.cfg)})
        engine._weights_digest = digest
    return digest


class StepModule(nn.Module):
    """``fn(**inputs, position=, end=)`` as a module for export: forward(inputs, marker, keys, values), where
    ``inputs`` are the step's tensors in ``names`` order (position last where it has one), ``marker`` a tensor of
    length ``end`` and ``keys``/``values`` the per-layer cache views (the adapter's last, where there is one)."""

    def __init__(self, engine, fn, names: list[str], positional: bool):
        super().__init__()
        self.weights = nn.ModuleList(engine.weights.frozen())  # their tensors: the program's parameters
        object.__setattr__(self, "engine", engine)  # not a submodule: its buffers are inputs or constants
        self.fn, self.names, self.positional = fn, names, positional

    def forward(self, inputs: list[torch.Tensor], marker: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]):
        e = self.engine
        caches = e._caches()
        saved = [c._views for c in caches]
        layers = e.cache.k.shape[0]
        e.cache._views = list(zip(keys[:layers], values[:layers]))
        if len(caches) > 1:
            e.adapter_cache._views = list(zip(keys[layers:], values[layers:]))
        try:
            kwargs = dict(zip(self.names, inputs))
            if self.positional:
                kwargs["end"] = marker.shape[0]
            return self.fn(**kwargs)
        finally:
            for cache, views in zip(caches, saved):
                cache._views = views


def cache_views(engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-layer key and value views of the engine's caches (the model's layers, then the adapter's), the
    order ``StepModule.forward`` takes them in."""
    views = [view for cache in engine._caches() for view in cache._views]
    return [k for k, _v in views], [v for _k, v in views]


class PackagedStep:
    """One kind of step as an AOTInductor package: loaded from the step cache, or exported, compiled and stored on
    its first call; the call of ``CompiledStep`` (keyword tensors, ``position`` and ``end`` where it has them)."""

    def __init__(self, engine, fn, key: tuple, name: str, freezing: bool, in_process: Callable[[], Callable],
                 cache: step_cache.StepCache):
        """``key``: the step's key in ``DecodeSteps``; ``freezing``: as the in-process compile's; ``in_process()``
        makes that compiled step (``CompiledStep``), which serves where a package cannot."""
        self.engine, self.fn, self.key, self.name, self.cache = engine, fn, key, name, cache
        self.freezing, self.in_process = freezing, in_process
        self.loader = self.out_spec = None
        self.fallback = None  # the step compiled in this process (``CompiledStep``), where a package cannot serve
        self.failed = False  # no package could be made here: every call runs the fallback
        self.built = self.loaded = False
        self.replays = 0
        self.marker = torch.empty(engine.max_len, dtype=torch.int8)

    def entry(self) -> tuple[str, str]:
        """(cache key, file name) of this step's package."""
        e = self.engine
        parts = {"step": [str(k) for k in self.key], "weights": weights_digest(e), "freezing": self.freezing,
                 "backend": type(e.ops).__name__, "fp16": e.ops._fp16(e.w.dtype, e.w.device),
                 "cache": [str(e.cache.k.dtype), e.max_len, e.cache.k.shape[2], e.cache.k.shape[4]],
                 **step_cache.environment()}
        return step_cache.key_of(parts), "-".join(str(k) for k in self.key).replace(">", "gt")

    def __call__(self, **inputs) -> tuple[torch.Tensor, ...]:
        end = inputs.pop("end", None)
        if self.failed or (end is not None and end > self.engine.max_len - 1):  # past the package's bound on end
            return self._fallback(inputs, end)
        names = [n for n in inputs if n != "position"] + (["position"] if "position" in inputs else [])
        if self.loader is None:
            self._prepare(names, inputs, end)
            if self.failed:
                return self._fallback(inputs, end)
        keys, values = cache_views(self.engine)
        flat = [inputs[n] for n in names] + [self.marker[:end if end is not None else 2]] + keys + values
        self.replays += 1
        return tuple(pytree.tree_unflatten(self.loader.boxed_run(flat), self.out_spec))

    def _fallback(self, inputs: dict, end: int | None):
        if self.fallback is None:
            self.fallback = self.in_process()
        self.replays += 1
        return self.fallback(**inputs, **({} if end is None else {"end": end}))

    def _prepare(self, names: list[str], inputs: dict, end: int | None) -> None:
        """Load the package, or make it first (under the key's lock); ``failed`` where it cannot be made."""
        key, name = self.entry()
        load = lambda path: torch._inductor.aoti_load_package(str(path)).loader  # noqa: E731
        with self.cache.locked(key):
            loader = self.cache.load(key, name, load)
            if loader is None:
                try:
                    self.cache.store(key, name, lambda path: self._build(path, names, inputs, end), suffix=".pt2")
                except Exception as err:  # noqa: BLE001 - export refusing an op: compile in the process instead
                    detail = str(err).splitlines()[0][:200] if str(err) else ""
                    print(f"kangaroo_fast: the {self.name} step could not be packaged ({type(err).__name__}: "
                          f"{detail}); compiling it in this process", file=sys.stderr, flush=True)
                    self.failed = True
                    return
                self.built = True
                loader = self.cache.load(key, name, load)
                if loader is None:
                    raise RuntimeError(f"the {self.name} step's package was stored but does not load")
            else:
                self.loaded = True
        self.loader = loader
        self.out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def _build(self, path, names: list[str], inputs: dict, end: int | None) -> None:
        """Export the step on these example inputs and compile its package to ``path``."""
        print(f"kangaroo_fast: compiling the {self.name} step into a package (a minute or two, once for this "
              f"model on this machine; kept in {self.cache.root})", file=sys.stderr, flush=True)
        _setuptools_beside_distutils()
        e, positional = self.engine, end is not None
        module = StepModule(e, self.fn, names, positional).eval()
        keys, values = cache_views(e)
        marker = self.marker[:end if positional else 2]
        example = ([inputs[n] for n in names], marker, keys, values)
        with torch.no_grad():  # freezing applies only without autograd
            program = torch.export.export(module, example, dynamic_shapes=self._shapes(names, "position" in inputs,
                                                                                       len(keys)),
                                          prefer_deferred_runtime_asserts_over_guards=True)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs={"freezing": self.freezing})

    def _shapes(self, names: list[str], positional: bool, views: int):
        """``torch.export`` dynamic shapes of (inputs, marker, keys, values) for this step's variant, with ``views``
        cache views on each side."""
        from torch.export import Dim

        batch = Dim("batch", min=2, max=MAX_BATCH) if self.key[1] != 1 else None
        tokens = Dim("tokens", min=2, max=self.engine.max_len - 1) if self.key[2:3] == ("T>1",) else None
        end = Dim("end", min=2, max=self.engine.max_len - 1)

        def dims(name: str):
            shape = {}
            if batch is not None:
                shape[0] = batch
            if tokens is not None and name in ("tokens", "states", "drafts"):
                shape[1] = tokens
            return shape or None

        cache_dims = [{0: batch} if batch is not None else None for _ in range(views)]
        return ([dims(n) for n in names], {0: end} if positional else None, cache_dims, list(cache_dims))


def _setuptools_beside_distutils() -> None:
    """Let the package's C++ build import setuptools (``torch.utils.cpp_extension`` does) in a process where the
    standard library's distutils came first (Python up to 3.11): setuptools would replace it and fail its own check
    (``_distutils_hack``: seen inside the test suite's workers). With setuptools not yet imported, its own distutils
    is left out; where it is imported already, nothing changes."""
    if sys.version_info < (3, 12) and "setuptools" not in sys.modules:
        os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")

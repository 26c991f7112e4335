"""CUDA-graph capture and replay of the decode steps over the engine's static KV cache.

Three steps are graphed, each once per (kind, batch[, new tokens]):

    draft    token [B, 1], position [B]           -> layer-l state [B, 1, H], draft token [B], probability [B],
                                                     keep drafting [B]      (shallow layers, adapter, draft head)
    verify   states [B, T, H], drafts [B, T-1], position [B]
                                                  -> targets [B, T], accepted length [B], bonus token [B]
                                                                            (deep layers, verification head)
    vanilla  token [B, 1], position [B]           -> next token [B, 1]      (every layer, LM head: no drafting)

A step is warmed up on a side stream (triton's JIT and the first allocations happen there), then captured, every
graph sharing one memory pool. Replaying copies the new inputs into the step's static input tensors, replays, and
returns the step's static outputs, valid until that step is replayed again. Positions are device tensors, so one
graph serves every position; the caches are the engine's static buffers, written in place by the kernels (rows of
finished sequences are moved within the same buffers, so captured pointers stay valid). One verify graph per
verification length T (at most max_draft_steps + 1 of them): a padded single length would run every round at the
longest length, and the verify step's cost grows with T.

``capture=False`` keeps the same static-buffer discipline without CUDA ("eager replay": the step function runs on
the static inputs at each call). The engine's graph loop runs that way on CPU, where the tests check it against
HF; on CUDA the same loop replays real graphs (tests/test_graphs.py).

Host syncs per round on this path (counted in ``DecodeGraphs.syncs``): one per draft step (the draft tokens and
their probabilities, which decide whether drafting goes on) and one for the verification's targets. The draft
tokens never leave the device between steps: each step's output token feeds the next step's input.
"""
from __future__ import annotations

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


class DecodeGraphs:
    """The draft, verify and vanilla steps of ``engine`` as replayable graphs (see the module docstring)."""

    def __init__(self, engine, exit_layer: int, threshold: float, capture: bool = True):
        from .backend.triton_backend import TritonBackend

        if capture and not isinstance(engine.ops, TritonBackend):
            raise ValueError(f"CUDA graphs run on the triton backend, not {type(engine.ops).__name__}")
        if capture and engine.w.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {engine.w.device}")
        if exit_layer is not None and engine.adapter is None:
            raise ValueError("the draft step needs an adapter")
        if exit_layer is not None and not 1 <= exit_layer < engine.cfg.num_layers:
            raise ValueError(f"exit_layer={exit_layer} must lie in 1..{engine.cfg.num_layers - 1}")
        self.engine, self.exit_layer, self.threshold, self.capture = engine, exit_layer, threshold, capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple, StepGraph] = {}
        self.syncs = 0  # host synchronisations made by the engine's graph loop (see the module docstring)

    def _draft(self, token: torch.Tensor, position: torch.Tensor):
        e = self.engine
        h = e._layers(e.ops.embed(token, e.w.embed), position, 0, self.exit_layer)
        out = e._adapter(h, position)
        draft, prob, keep = e.ops.draft_propose(out[:, -1], e.a_norm, e.cfg.rms_norm_eps, e.draft_head,
                                                e.draft_vocab, self.threshold)
        return h, draft, prob, keep

    def _verify(self, states: torch.Tensor, drafts: torch.Tensor, position: torch.Tensor):
        e = self.engine
        x = e._layers(states, position, self.exit_layer, e.cfg.num_layers)
        return e.ops.verify_accept(x, e.w.final_norm, e.cfg.rms_norm_eps, e.w.lm_head, drafts)

    def _vanilla(self, token: torch.Tensor, position: torch.Tensor):
        e = self.engine
        x = e._layers(e.ops.embed(token, e.w.embed), position, 0, e.cfg.num_layers)
        return (e._targets(x),)

    def _graph(self, key: tuple, fn, inputs: dict[str, torch.Tensor]) -> StepGraph:
        if key not in self.graphs:
            # warm-up and capture run the step for real: on the first inputs, so the cache slots they write are
            # the ones the replay below writes again with the same values
            static = {name: value.clone() for name, value in inputs.items()}
            self.graphs[key] = StepGraph(fn, static, self.pool, capture=self.capture)
        return self.graphs[key]

    def draft_step(self, token: torch.Tensor, position: torch.Tensor):
        return self._graph(("draft", token.shape[0]), self._draft, {"token": token, "position": position})(
            token=token, position=position)

    def verify_step(self, states: torch.Tensor, drafts: torch.Tensor, position: torch.Tensor):
        inputs = {"states": states, "drafts": drafts, "position": position}
        return self._graph(("verify",) + tuple(states.shape[:2]), self._verify, inputs)(**inputs)

    def vanilla_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._graph(("vanilla", token.shape[0]), self._vanilla, {"token": token, "position": position})(
            token=token, position=position)[0]

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs.values())

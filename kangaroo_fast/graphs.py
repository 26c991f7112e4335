"""CUDA-graph capture and replay of the draft step and the verify step (Triton backend, static KV cache).

A step is captured once per (kind, batch, new tokens): warmed up on a side stream (triton's JIT and the first
allocations happen there), then captured with every graph sharing one memory pool. Replaying copies the new
inputs into the step's static input tensors, replays, and returns the step's static outputs, valid until that step
is replayed again. Positions are device tensors, so one graph serves every position; the caches are the engine's
static buffers, written in place by the kernels.

Host syncs per round on this path: one per draft step (reading the keep-drafting flag and the token) and one for
the accepted length and bonus token. Not yet run on a GPU: tests/test_graphs.py checks it where CUDA exists.
"""
from __future__ import annotations

from typing import Callable

import torch

from .backend.triton_backend import TritonBackend
from .engine import Engine


class StepGraph:
    """``fn(**static_inputs)`` captured in a CUDA graph; calling the object replays it on new inputs."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], static_inputs: dict[str, torch.Tensor],
                 pool=None, warmup: int = 2):
        for name, tensor in static_inputs.items():
            if not tensor.is_cuda:
                raise ValueError(f"static input {name!r} is on {tensor.device}: CUDA graphs need CUDA tensors")
        self.inputs = static_inputs
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
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.outputs


class DecodeGraphs:
    """The draft step and the verify step of ``engine`` (on the Triton backend) as replayable graphs.

    draft_step(token [B, 1], position [B])    -> (layer-l state [B, 1, H], draft token [B], probability [B],
                                                  keep drafting [B])
    verify_step(states [B, T, H], drafts [B, T-1], position [B])
                                              -> (targets [B, T], accepted length [B], bonus token [B])
    """

    def __init__(self, engine: Engine, exit_layer: int, threshold: float):
        if not isinstance(engine.ops, TritonBackend):
            raise ValueError(f"CUDA graphs run on the triton backend, not {type(engine.ops).__name__}")
        if engine.adapter is None:
            raise ValueError("the draft step needs an adapter")
        if not 1 <= exit_layer < engine.cfg.num_layers:
            raise ValueError(f"exit_layer={exit_layer} must lie in 1..{engine.cfg.num_layers - 1}")
        self.engine, self.exit_layer, self.threshold = engine, exit_layer, threshold
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, StepGraph] = {}

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

    def _graph(self, key: tuple, fn, inputs: dict[str, torch.Tensor]) -> StepGraph:
        if key not in self.graphs:
            # warm-up and capture run the step for real: on the first inputs, so the cache slots they write are
            # the ones the replay below writes again with the same values
            static = {name: value.clone() for name, value in inputs.items()}
            self.graphs[key] = StepGraph(fn, static, self.pool)
        return self.graphs[key]

    def draft_step(self, token: torch.Tensor, position: torch.Tensor):
        return self._graph(("draft", token.shape[0]), self._draft, {"token": token, "position": position})(
            token=token, position=position)

    def verify_step(self, states: torch.Tensor, drafts: torch.Tensor, position: torch.Tensor):
        inputs = {"states": states, "drafts": drafts, "position": position}
        return self._graph(("verify",) + tuple(states.shape[:2]), self._verify, inputs)(**inputs)

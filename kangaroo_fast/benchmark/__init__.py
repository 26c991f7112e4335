"""End-to-end benchmark (``kangaroo-fast bench``) and settings sweep (``kangaroo-fast tune``): the prompts
(``prompts.py``), the methods (``methods.py``, ``vllm_peer.py``), the runs (``runner.py``), the sweep (``tune.py``)
and the summaries and tables (``report.py``).

Eight methods decode the same prompts with the same model, dtype and ``max_new_tokens``, one after another for each
prompt (the order rotating from prompt to prompt) so that machine drift hits all of them alike:

    hf              HF ``generate``, greedy: the baseline every speedup is quoted against
    hf_compile      HF ``generate`` with a static cache and a ``torch.compile``-d forward (compile time apart)
    hf_early_exit   HF assisted generation with ``assistant_early_exit`` at the Kangaroo exit layer (and its γ, η)
    hf_prompt_lookup HF prompt-lookup decoding
    vanilla         this engine without drafting
    kangaroo        this engine with Kangaroo drafting
    kangaroo_paper  the same without the context lookup: the adapter's drafts alone, the paper's drafting
    lookup          this engine with the context lookup as its only drafter (prompt-lookup decoding, no adapter)

and, when vLLM is installed, vLLM without and with its n-gram speculation and with Kangaroo drafts (``vllm``,
``vllm_ngram``, ``vllm_kangaroo``: ``vllm_peer.py``).

Definitions (per method, per category and overall):
    tokens/s        new tokens / wall-clock seconds of the generate calls (prefill included)
    speedup         tokens/s of the method / tokens/s of ``hf`` (or of ``vanilla``), on the same prompts
    #MAT            mean tokens per target forward after the prefill: (new tokens - 1) / (target forwards - 1);
                    1.0 for greedy decoding. Target forwards of HF methods are counted by a hook on the last decoder
                    layer (an early-exit draft never reaches it); Kangaroo's are its verification rounds.
    acceptance      per draft position j: rounds that accepted a (j+1)-th draft / rounds that proposed one
    equality        every method's tokens are compared with ``hf``'s; a differing output is flagged, with the
                    index of its first differing token.
"""
from __future__ import annotations

from .methods import ADAPTER_METHODS, GREEDY_METHODS, METHOD_LABELS, METHODS, Methods, check_methods, default_methods
from .prompts import DEFAULT_PROMPTS, SPLITS, Sample, chat_encoder, load_prompts, load_questions, per_category, \
    select_split
from .report import batch_markdown, markdown_table, summarise, tune_markdown, write_results
from .result import MethodResult
from .runner import BATCH_METHODS, DEFAULT_OUTPUT_DIR, machine_info, run_batch_sizes, run_benchmark
from .tune import run_tune
from .vllm_peer import PEER_LABELS, PEER_METHODS, VLLMPeer, vllm_available

__all__ = ["ADAPTER_METHODS", "BATCH_METHODS", "DEFAULT_OUTPUT_DIR", "DEFAULT_PROMPTS", "GREEDY_METHODS",
           "METHOD_LABELS", "METHODS", "MethodResult", "Methods", "PEER_LABELS", "PEER_METHODS", "SPLITS", "Sample",
           "VLLMPeer", "batch_markdown", "chat_encoder", "check_methods", "default_methods", "load_prompts",
           "load_questions", "machine_info", "markdown_table", "per_category", "run_batch_sizes", "run_benchmark",
           "run_tune", "select_split", "summarise", "tune_markdown", "vllm_available", "write_results"]

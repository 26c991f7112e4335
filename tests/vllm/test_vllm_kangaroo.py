"""Kangaroo drafts inside vLLM (``make test-vllm``: its own virtualenv with vLLM's CPU build; not part of
``make test``). float32, where vLLM's verification of several tokens rounds as its one-token steps do, so the output
with drafts must equal vLLM's own token for token (bf16 may round differently, with or without our drafts)."""
from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm")

import kangaroo_fast.vllm as kv  # noqa: E402
from kangaroo_fast.models import default_model_dir  # noqa: E402

from conftest import random_adapter, tiny_model  # noqa: E402

PROMPTS = ["Write a short poem about the sea, then explain it.",
           "Summarize in one sentence: the fox jumped over the dog; the dog slept; the fox ran into the forest.",
           "What is 17 times 23? Show your steps.",
           "List three uses of Python dictionaries, with code."]
MAX_NEW_TOKENS = 64


def make_llm(speculative_config=None):
    return vllm.LLM(model=str(default_model_dir()), dtype="float32", max_model_len=1024, max_num_seqs=1, seed=0,
                    speculative_config=speculative_config, per_request_spec_decode_metrics="detailed"
                    if speculative_config else "none")


def decode(llm, prompts):
    tokenizer = llm.get_tokenizer()
    requests = [{"prompt_token_ids": tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                                   add_generation_prompt=True, tokenize=True,
                                                                   return_dict=True)["input_ids"]} for p in prompts]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    outputs = [llm.generate([r], params, use_tqdm=False)[0].outputs[0] for r in requests]  # one request at a time
    return [list(o.token_ids) for o in outputs], [o.spec_decode_metrics for o in outputs]


def shutdown(llm):
    llm.llm_engine.engine_core.shutdown()


def test_kangaroo_drafts_keep_vllms_greedy_output():
    plain = make_llm()
    try:
        expected, _ = decode(plain, PROMPTS)
    finally:
        shutdown(plain)
    drafted = make_llm(kv.config())
    try:
        tokens, metrics = decode(drafted, PROMPTS)
    finally:
        shutdown(drafted)
    assert tokens == expected
    accepted = sum(sum(m.per_step_accepted) for m in metrics)
    assert accepted > 0  # the drafts did something: some were accepted


def test_an_adapter_for_another_model_fails_at_load(tmp_path, capfd):
    random_adapter(tiny_model("llama", 0), 2, 1).save(tmp_path / "adapter")
    spec = kv.config(adapter=tmp_path / "adapter")  # fits no check until vLLM loads it beside the target
    with pytest.raises(Exception):
        make_llm(spec)
    logged = capfd.readouterr()  # the worker process's traceback, through vLLM's logger (stdout) or stderr
    assert "adapter does not fit the base model" in logged.out + logged.err


def test_bad_settings_fail_before_vllm_starts():
    with pytest.raises(ValueError, match="threshold=2"):
        kv.config(threshold=2)
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        kv.config(num_speculative_tokens=0)

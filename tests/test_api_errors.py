"""Clear errors, each naming the offending value, from the public API."""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.config import SUPPORTED_MODEL_TYPES

from conftest import random_adapter, random_prompt, tiny_model


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama", 5)


@pytest.fixture(scope="module")
def km(hf):
    return kangaroo_fast.load(hf, adapter=random_adapter(hf, 2, seed=6), max_cache_len=40)


@pytest.fixture(scope="module")
def prompt(hf):
    return random_prompt(hf.config.vocab_size, 5, 7)


@pytest.mark.parametrize("empty", [[], torch.zeros(0, dtype=torch.int64), torch.zeros(1, 0, dtype=torch.int64),
                                   "", "   \n"])
def test_empty_prompt(km, empty):
    with pytest.raises(ValueError, match="prompt is empty"):
        km.generate(empty, max_new_tokens=3)


def test_string_prompt_without_tokenizer(km):
    with pytest.raises(ValueError, match="no tokenizer"):
        km.generate("hello there", max_new_tokens=3)


@pytest.mark.parametrize("bad", [3.5, [1, 2.0], {"ids": [1]}])
def test_prompt_of_wrong_type(km, bad):
    with pytest.raises(TypeError, match="prompt must be a string, a list of token ids or a tensor"):
        km.generate(bad, max_new_tokens=3)


def test_prompt_tensor_of_wrong_shape(km):
    with pytest.raises(ValueError, match=r"input_ids must be \[n\] or \[1, n\], got shape \(2, 3\)"):
        km.generate(torch.ones(2, 3, dtype=torch.int64), max_new_tokens=3)


@pytest.mark.parametrize("length", [40, 41, 57])
def test_prompt_longer_than_the_cache(km, hf, length):
    ids = random_prompt(hf.config.vocab_size, length, 8)
    with pytest.raises(ValueError, match=f"prompt of {length} tokens does not fit the cache of 40 positions"):
        km.generate(ids, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"prompt of {length} tokens does not fit"):
        km.generate(ids, max_new_tokens=3, speculate=False)


def test_prompt_of_cache_len_minus_one_fits(km, hf):
    ids = random_prompt(hf.config.vocab_size, 39, 9)
    out = km.generate(ids, max_new_tokens=3)
    assert out.tokens and len(out.tokens) == 1
    assert out.stats.stop_reason in ("cache_full", "eos")


@pytest.mark.parametrize("exit_layer", [0, 4, -1, 2.0])
def test_bad_exit_layer(km, prompt, exit_layer):
    with pytest.raises(ValueError, match=rf"exit_layer={exit_layer!r} must be an integer in 1\.\.3"):
        km.generate(prompt, max_new_tokens=3, exit_layer=exit_layer)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_threshold(km, prompt, threshold):
    with pytest.raises(ValueError, match=rf"threshold={threshold!r} must lie in \[0, 1\]"):
        km.generate(prompt, max_new_tokens=3, threshold=threshold)


@pytest.mark.parametrize("steps", [0, -2, 1.5])
def test_bad_max_draft_steps(km, prompt, steps):
    with pytest.raises(ValueError, match=rf"max_draft_steps={steps!r} must be an integer >= 1"):
        km.generate(prompt, max_new_tokens=3, max_draft_steps=steps)


@pytest.mark.parametrize("max_new", [0, -1])
def test_bad_max_new_tokens(km, prompt, max_new):
    with pytest.raises(ValueError, match=rf"max_new_tokens={max_new} must be an integer >= 1"):
        km.generate(prompt, max_new_tokens=max_new)


@pytest.mark.parametrize("dtype", ["float64", "int8", "half-precision", torch.float64])
def test_unknown_dtype(hf, dtype):
    with pytest.raises(ValueError, match=r"dtype=.* is not supported: use float32, bfloat16 or float16"):
        kangaroo_fast.load(hf, dtype=dtype)


def test_known_dtype_strings():
    from kangaroo_fast.models import resolve_dtype

    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("float32") is torch.float32


def test_cuda_device(hf):
    if torch.cuda.is_available():
        km = kangaroo_fast.load(tiny_model("llama", 5), device="cuda", dtype="float32")
        assert km.device.type == "cuda"
        ids = random_prompt(hf.config.vocab_size, 5, 7)
        ref = kangaroo_fast.load(tiny_model("llama", 5)).generate(ids, max_new_tokens=6, speculate=False)
        assert km.generate(ids, max_new_tokens=6, speculate=False).tokens == ref.tokens
    else:
        with pytest.raises(ValueError, match="device='cuda' was asked for but CUDA is not available"):
            kangaroo_fast.load(hf, device="cuda")
        with pytest.raises(ValueError, match="device='cuda:0' was asked for but CUDA is not available"):
            kangaroo_fast.load(hf, device="cuda:0")


@pytest.mark.parametrize("token", [131, 1000, -1])
def test_token_out_of_vocabulary(km, token):
    ids = [4, 9, token, 2]
    with pytest.raises(ValueError, match=rf"token id {token} is outside the vocabulary 0\.\.130"):
        km.generate(ids, max_new_tokens=3)
    with pytest.raises(ValueError, match=rf"token id {token} is outside the vocabulary 0\.\.130"):
        km.generate(torch.tensor(ids), max_new_tokens=3)


@pytest.mark.parametrize("eos", [131, -3, [2, 500]])
def test_eos_out_of_vocabulary(km, prompt, eos):
    with pytest.raises(ValueError, match=r"eos_token_id=-?\d+ is not a token id in 0\.\.130"):
        km.generate(prompt, max_new_tokens=3, eos_token_id=eos)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=67, n_embd=24, n_layer=2, n_head=3, n_positions=32))
    expected = r"unsupported model_type 'gpt2': kangaroo_fast supports " + ", ".join(SUPPORTED_MODEL_TYPES)
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")
    with pytest.raises(ValueError, match=expected):
        kangaroo_fast.load(gpt2)
    # from a directory: fails on the config, before any weight is read
    gpt2.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        kangaroo_fast.load(str(tmp_path))


def test_unsupported_activation():
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        kangaroo_fast.load(tiny_model("llama", 5, hidden_act="gelu"))


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kangaroo_fast.load(str(tmp_path / "absent"))


def test_speculate_without_adapter(hf, prompt):
    plain = kangaroo_fast.load(hf, max_cache_len=30)
    assert plain.adapter is None
    with pytest.raises(ValueError, match="speculative decoding needs an adapter"):
        plain.generate(prompt, max_new_tokens=3)
    with pytest.raises(ValueError, match="speculative decoding needs an adapter"):
        plain.generate(prompt, max_new_tokens=3, speculate=True, exit_layer=2)
    assert len(plain.generate(prompt, max_new_tokens=3, speculate=False).tokens) >= 1


@pytest.mark.parametrize("bad", [1, 161, 10_000])
def test_bad_max_cache_len(hf, bad):
    with pytest.raises(ValueError, match=rf"max_cache_len={bad} must lie in 2\.\.160"):
        kangaroo_fast.load(hf, max_cache_len=bad)


def test_adapter_of_wrong_type(hf):
    with pytest.raises(TypeError, match="adapter must be a path or an Adapter, not dict"):
        kangaroo_fast.load(hf, adapter={})


def test_model_of_wrong_type():
    with pytest.raises(TypeError, match="model must be a path, a transformers PreTrainedModel or None, not int"):
        kangaroo_fast.load(3)


def test_unknown_backend(hf):
    with pytest.raises(ValueError, match="unknown backend 'cuda-graphs': choose one of inductor, onednn, torch, triton"):
        kangaroo_fast.load(hf, backend="cuda-graphs")


def test_adapter_with_loaded_model(km, prompt):
    with pytest.raises(ValueError, match="pass adapter= to kangaroo_fast.load"):
        kangaroo_fast.generate(prompt, model=km, adapter="somewhere")

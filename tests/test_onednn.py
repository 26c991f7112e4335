"""The CPU fast path: bf16 products on oneDNN-packed weights, everything else the reference's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kangaroo_fast
from kangaroo_fast.backend import TorchBackend, get_backend
from kangaroo_fast.backend.cpu import onednn_available
from kangaroo_fast.backend.onednn import OneDNNBackend
from kangaroo_fast.config import DecodeSettings

from conftest import TOLERANCES, early_exit_adapter, hf_greedy, random_prompt, tiny_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN packed linear")



@pytest.mark.parametrize("rows,k,n", [(1, 7, 1), (7, 123, 45), (3, 576, 960), (123, 64, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_the_reference(rows, k, n, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(2, rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    got = OneDNNBackend.linear(x, w, b)
    assert got.shape == (2, rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), None if b is None else b.float()),
                               atol=TOLERANCES[torch.bfloat16][0], rtol=TOLERANCES[torch.bfloat16][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_are_the_reference_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(7, 123, generator=gen).to(dtype), torch.randn(45, 123, generator=gen).to(dtype)
    assert torch.equal(OneDNNBackend.linear(x, w), F.linear(x, w))


def test_weight_changed_in_place_is_packed_again_and_dropped_with_it():
    w = torch.randn(9, 17).bfloat16()
    x = torch.randn(3, 17).bfloat16()
    first = OneDNNBackend.linear(x, w)
    key = (w.data_ptr(), tuple(w.shape), w.dtype, 1)
    assert key in OneDNNBackend._packed
    with torch.no_grad():
        w.mul_(-1)
    torch.testing.assert_close(OneDNNBackend.linear(x, w), -first)
    del w
    assert key not in OneDNNBackend._packed


def test_get_backend_by_name():
    ops = get_backend("onednn")
    assert isinstance(ops, OneDNNBackend) and isinstance(ops, TorchBackend) and ops.name == "onednn"


def test_float32_decode_on_onednn_matches_hf():
    model = tiny_model("qwen2", 4)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="onednn", dtype=torch.float32)
    prompt = random_prompt(model.config.vocab_size, 7, 2)
    tokens, _ = km.engine.generate(prompt, DecodeSettings(exit_layer=2, threshold=0.3, max_draft_steps=4,
                                                          max_new_tokens=16), set())
    assert tokens == hf_greedy(model, prompt, 16, eos_token_id=None)


def test_bf16_decode_on_onednn_equals_its_own_vanilla_mode():
    """Kangaroo on oneDNN emits what the same backend's vanilla decode emits (on this prompt no verification row
    rounds across a near-tie; a flipped near-tie would show here as a difference)."""
    model = tiny_model("llama", 6).to(torch.bfloat16)
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 2), backend="onednn", dtype=torch.bfloat16)
    assert km.dtype == torch.bfloat16
    prompt = random_prompt(model.config.vocab_size, 5, 3)
    settings = DecodeSettings(exit_layer=2, threshold=0.0, max_draft_steps=3, max_new_tokens=12)
    vanilla, _ = km.engine.generate(prompt, settings, set(), speculate=False)
    assert len(vanilla) == 12 and all(0 <= t < model.config.vocab_size for t in vanilla)
    spec, stats = km.engine.generate(prompt, settings, set())
    assert stats.draft_steps > 0 and spec == vanilla


"""Batched decoding: per-sequence positions in the ops, and every sequence of a batch token-identical (greedy,
float32) to decoding it alone and to HF greedy, with mixed prompt lengths, early EOS and the length limits."""
from __future__ import annotations

import pytest
import torch

import kangaroo_fast
from kangaroo_fast.backend import TorchBackend

from conftest import early_exit_adapter, hf_greedy, random_adapter, random_prompt, tiny_model


# ---- the ops with per-sequence start positions ---------------------------------------------------------------------
def _rope_rows(cos_table: torch.Tensor, starts: list[int], t: int) -> torch.Tensor:
    rows = (torch.tensor(starts)[:, None] + torch.arange(t)).clamp(max=cos_table.shape[0] - 1)
    return cos_table[rows]


@pytest.mark.parametrize("t", [1, 3, 7])
@pytest.mark.parametrize("heads,kv_heads,window", [(6, 2, None), (4, 4, None), (6, 3, 5)])
def test_per_sequence_starts_equal_one_call_per_sequence(t, heads, kv_heads, window):
    """rope_cache_write and attention with a [B] start tensor == the int form row by row; the same cache
    entries are written, nothing else is touched."""
    gen = torch.Generator().manual_seed(t * 100 + heads + kv_heads)
    d, s_max = 8, 23
    starts = [0, 9, 4, 15 - t + 1]
    bsz = len(starts)
    qkv = torch.randn(bsz, t, (heads + 2 * kv_heads) * d, generator=gen)
    cos_table, sin_table = torch.randn(s_max, d, generator=gen), torch.randn(s_max, d, generator=gen)
    k_cache = torch.randn(bsz, kv_heads, s_max, d, generator=gen)
    v_cache = torch.randn(bsz, kv_heads, s_max, d, generator=gen)
    k_rows, v_rows = k_cache.clone(), v_cache.clone()
    want_q, want_out = [], []
    for b, start in enumerate(starts):
        k_b, v_b = k_rows[b:b + 1], v_rows[b:b + 1]
        q = TorchBackend.rope_cache_write(qkv[b:b + 1], cos_table[start:start + t], sin_table[start:start + t],
                                          k_b, v_b, start, heads, kv_heads)
        want_q.append(q)
        want_out.append(TorchBackend.attention(q, k_b, v_b, start, window))
    start_t = torch.tensor(starts)
    q = TorchBackend.rope_cache_write(qkv, _rope_rows(cos_table, starts, t), _rope_rows(sin_table, starts, t),
                                      k_cache, v_cache, start_t, heads, kv_heads)
    out = TorchBackend.attention(q, k_cache, v_cache, start_t, window)
    torch.testing.assert_close(q, torch.cat(want_q), atol=1e-6, rtol=1e-6)
    assert torch.equal(k_cache, k_rows) and torch.equal(v_cache, v_rows)
    assert out.shape == (bsz, t, heads * d)
    torch.testing.assert_close(out, torch.cat(want_out), atol=1e-5, rtol=1e-5)


def test_per_sequence_writes_past_the_cache_are_dropped():
    """A sequence whose padding runs past S_max writes only its positions inside the cache; its real queries
    (inside the cache) attend as usual and every output is finite."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, d, s_max, t = 2, 1, 4, 10, 4
    starts = torch.tensor([8, 2])
    qkv = torch.randn(2, t, (heads + 2 * kv_heads) * d, generator=gen)
    cos_table = torch.randn(s_max, d, generator=gen)
    cos, sin = _rope_rows(cos_table, [8, 2], t), _rope_rows(cos_table.flip(0), [8, 2], t)
    k_cache, v_cache = torch.zeros(2, kv_heads, s_max, d), torch.zeros(2, kv_heads, s_max, d)
    q = TorchBackend.rope_cache_write(qkv, cos, sin, k_cache, v_cache, starts, heads, kv_heads)
    written = (k_cache != 0).any(-1)[:, 0]
    assert written[0].tolist() == [False] * 8 + [True] * 2
    assert written[1].tolist() == [False] * 2 + [True] * 4 + [False] * 4
    out = TorchBackend.attention(q, k_cache, v_cache, starts)
    assert bool(torch.isfinite(out).all())
    alone = TorchBackend.attention(q[:1, :, :2], k_cache[:1], v_cache[:1], 8)
    torch.testing.assert_close(out[:1, :2], alone, atol=1e-6, rtol=1e-6)


def test_cache_keep_rows_moves_rows_to_the_front():
    from kangaroo_fast.cache import StaticKVCache

    cache = StaticKVCache(2, 4, 1, 5, 3, torch.float32, "cpu")
    for b in range(4):
        cache.k[:, b] = b
        cache.v[:, b] = 10 + b
    cache.lengths.copy_(torch.tensor([3, 4, 5, 2]))
    cache.keep_rows([1, 3])
    assert cache.active == 2
    k, v = cache.layer(1)
    assert k.shape == (2, 1, 5, 3)
    assert k[:, 0, 0, 0].tolist() == [1.0, 3.0] and v[:, 0, 0, 0].tolist() == [11.0, 13.0]
    assert cache.lengths[:2].tolist() == [4, 2]
    with pytest.raises(ValueError, match=r"rows=\[2\] must be a non-empty list of active rows 0\.\.1"):
        cache.keep_rows([2])
    cache.reset()
    assert cache.active == 4 and cache.lengths.tolist() == [0, 0, 0, 0]


# ---- batched greedy decoding equals one-by-one decoding and HF --------------------------------------------------
PROMPT_LENGTHS = (7, 1, 23, 4)
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def cases():
    """Per kind: the HF model, prompts of mixed lengths and HF's greedy outputs, EOS disabled (eos_token_id=[])."""
    out = {}
    for kind, seed in (("llama", 51), ("qwen2", 52)):
        model = tiny_model(kind, seed)
        prompts = [random_prompt(model.config.vocab_size, n, seed * 10 + n) for n in PROMPT_LENGTHS]
        refs = [hf_greedy(model, ids, NEW_TOKENS, eos_token_id=-1) for ids in prompts]
        out[kind] = (model, prompts, refs)
    return out


def _alone(km, prompts, **kwargs):
    return [km.generate(ids, **kwargs) for ids in prompts]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("adapter_kind,threshold,steps", [("random", 0.0, 4), ("early_exit", 0.6, 3),
                                                          ("early_exit", 0.0, 6), ("random", 1.0, 2),
                                                          ("pruned_vocab", 0.0, 3)])
def test_batch_equals_alone_and_hf(cases, kind, adapter_kind, threshold, steps):
    model, prompts, refs = cases[kind]
    if adapter_kind == "early_exit":
        adapter = early_exit_adapter(model, model.config.num_hidden_layers - 1, seed=53)
    elif adapter_kind == "pruned_vocab":  # every other token id, in reverse: half the references are draftable
        vocab = torch.arange(model.config.vocab_size - 1, -1, -2)
        adapter = early_exit_adapter(model, model.config.num_hidden_layers - 1, seed=53, draft_vocab=vocab)
    else:
        adapter = random_adapter(model, 2, seed=53)
    km = kangaroo_fast.load(model, adapter=adapter)
    kwargs = dict(max_new_tokens=NEW_TOKENS, threshold=threshold, max_draft_steps=steps, eos_token_id=[])
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    batch = km.generate(prompts, callback=lambda i, new: streamed[i].extend(new), **kwargs)
    alone = _alone(km, prompts, **kwargs)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for i, (out, single, ref) in enumerate(zip(batch, alone, refs)):
        assert out.tokens == single.tokens == ref, i
        assert streamed[i] == out.tokens
        # each sequence drafts and accepts exactly as it does alone
        assert out.stats.drafted_at == single.stats.drafted_at
        assert out.stats.accepted_at == single.stats.accepted_at
        assert out.stats.rounds == single.stats.rounds
        assert out.stats.prompt_tokens == PROMPT_LENGTHS[i]
        assert out.stats.stop_reason == "max_new_tokens"
    if threshold == 0.0:
        assert any(0 < sum(o.stats.accepted_at) < o.stats.draft_steps for o in batch)  # partial acceptance


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_vanilla_batch_equals_hf(cases, kind):
    model, prompts, refs = cases[kind]
    for km in (kangaroo_fast.load(model), kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=54))):
        outs = km.generate(prompts, max_new_tokens=NEW_TOKENS, speculate=False, eos_token_id=[])
        assert [o.tokens for o in outs] == refs
        assert all(o.stats.mode == "vanilla" and o.stats.rounds == NEW_TOKENS - 1 for o in outs)


def test_one_sequence_hits_eos_early(cases):
    """EOS = a token that only the second sequence produces, early: it stops there (and its cache row is dropped)
    while the others run to max_new_tokens."""
    model, prompts, refs = cases["qwen2"]
    eos = next(t for t in refs[1][2:] if all(t not in r for j, r in enumerate(refs) if j != 1))
    stop = refs[1].index(eos)
    assert stop < NEW_TOKENS - 5
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 4, seed=55))
    active = []
    outs = km.generate(prompts, max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3, eos_token_id=eos,
                       callback=lambda i, new: active.append(km.engine.cache.active))
    for i, (out, ref) in enumerate(zip(outs, refs)):
        want = hf_greedy(model, prompts[i], NEW_TOKENS, eos_token_id=eos)
        assert out.tokens == want, i
        if i == 1:
            assert out.tokens == ref[:stop + 1] and out.stats.stop_reason == "eos"
        else:
            assert out.tokens == ref and out.stats.stop_reason == "max_new_tokens"
    assert active[0] == len(prompts) and active[-1] == len(prompts) - 1  # the finished sequence left the batch
    single = km.generate(prompts[1], max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3, eos_token_id=eos)
    assert single.tokens == outs[1].tokens and single.stats.rounds == outs[1].stats.rounds


def test_sequences_hit_the_cache_and_max_new_tokens(cases):
    """With a short cache the 23-token prompt fills it (cache_full), the others stop at max_new_tokens, and the
    first-token-only prompt-of-one case rides along."""
    model, prompts, refs = cases["llama"]
    max_len = 23 + 9
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=56), max_cache_len=max_len)
    for speculate in (True, False):
        outs = km.generate(prompts, max_new_tokens=15, threshold=0.0, max_draft_steps=5, eos_token_id=[],
                           speculate=speculate)
        for i, (out, ref) in enumerate(zip(outs, refs)):
            if PROMPT_LENGTHS[i] == 23:
                assert out.stats.stop_reason == "cache_full"
                assert PROMPT_LENGTHS[i] + len(out.tokens) == max_len
                assert out.tokens == ref[:9]
            else:
                assert out.stats.stop_reason == "max_new_tokens"
                assert out.tokens == ref[:15]


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_batch_max_new_tokens_exactly(cases, max_new):
    model, prompts, refs = cases["qwen2"]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 3, seed=57))
    outs = km.generate(prompts, max_new_tokens=max_new, threshold=0.0, max_draft_steps=6, eos_token_id=[])
    assert [o.tokens for o in outs] == [r[:max_new] for r in refs]
    assert all(o.stats.new_tokens == max_new and o.stats.stop_reason == "max_new_tokens" for o in outs)


def test_batch_of_one_and_repeated_prompts(cases):
    model, prompts, refs = cases["llama"]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=58))
    kwargs = dict(max_new_tokens=NEW_TOKENS, threshold=0.0, max_draft_steps=3, eos_token_id=[])
    (one,) = km.generate([prompts[0]], **kwargs)
    assert one.tokens == refs[0]
    same = km.generate([prompts[2][0].tolist()] * 3, **kwargs)  # lists of ids work as prompts too
    assert all(o.tokens == refs[2] for o in same)
    # the cache grew to the batch and a later single prompt still decodes correctly
    assert km.engine.cache.batch == 3
    assert km.generate(prompts[3], **kwargs).tokens == refs[3]


def test_batch_argument_errors(cases):
    model, prompts, _ = cases["llama"]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=59), max_cache_len=20)
    with pytest.raises(ValueError, match="prompt of 23 tokens does not fit the cache of 20 positions"):
        km.generate(prompts, max_new_tokens=3)
    with pytest.raises(ValueError, match="streamer= follows one prompt"):
        km.generate(prompts[:2], max_new_tokens=3, streamer=object())
    with pytest.raises(ValueError, match="prompt is empty"):
        km.generate([prompts[0], []], max_new_tokens=3)


def test_sliding_window_batch_equals_hf():
    """Mistral with a sliding window shorter than the prompts: the per-sequence masks keep each window."""
    model = tiny_model("mistral", 61, sliding_window=5)
    prompts = [random_prompt(model.config.vocab_size, n, 62 + n) for n in (9, 3, 14)]
    refs = [hf_greedy(model, ids, 16, eos_token_id=-1) for ids in prompts]
    full = tiny_model("mistral", 61, sliding_window=None)
    assert [hf_greedy(full, ids, 16, eos_token_id=-1) for ids in prompts] != refs  # the window matters
    km = kangaroo_fast.load(model, adapter=early_exit_adapter(model, 3, seed=63))
    for threshold, steps in ((0.0, 4), (0.6, 2)):
        outs = km.generate(prompts, max_new_tokens=16, threshold=threshold, max_draft_steps=steps, eos_token_id=[])
        assert [o.tokens for o in outs] == refs

"""Every Triton kernel against the reference beside it: fresh random inputs, odd shapes, fp32/bf16/fp16.

Without a GPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU they run compiled.
Floating outputs compare within the one tolerance table below; token ids, accepted lengths and every cache slot a
kernel must not write compare exactly.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kangaroo_fast.kernels._lm_head import head_blocks  # noqa: E402
from kangaroo_fast.kernels.decode_attention import (attention_blocks, decode_attention,  # noqa: E402
                                                     decode_attention_reference)
from kangaroo_fast.kernels.draft_head import draft_head, draft_head_reference  # noqa: E402
from kangaroo_fast.kernels.qkv_rope_cache import qkv_rope_cache, qkv_rope_cache_reference  # noqa: E402
from kangaroo_fast.kernels.rms_norm_linear import rms_norm_linear, rms_norm_linear_reference  # noqa: E402
from kangaroo_fast.kernels.verify_head import verify_head, verify_head_reference  # noqa: E402

from conftest import TOLERANCES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = list(TOLERANCES)


def create(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values, scaled, in ``dtype`` on the test device."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Within the table's tolerance for ``dtype``: the inputs' dtype, by default the outputs'."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def rope_tables(positions: int, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout cos/sin tables [positions, D] (the frequencies repeated over both halves)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


# ---- rms_norm_linear ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 7, 70])
@pytest.mark.parametrize("variant", ["plain", "norm_bias", "residual", "norm_gate_up"])
def test_rms_norm_linear(dtype, m, variant):
    k, n = 123, 77
    seed = 100 * m + len(variant)
    x = create((m, k), dtype, seed)
    weight = create((2 * n if variant == "norm_gate_up" else n, k), dtype, seed + 1, k ** -0.5)
    kwargs = {}
    if variant in ("norm_bias", "norm_gate_up"):
        kwargs["norm_weight"] = create((k,), dtype, seed + 2, 0.25) + 1
        kwargs["eps"] = 1e-5
    if variant == "norm_bias":
        kwargs["bias"] = create((n,), dtype, seed + 3)
    if variant == "residual":
        kwargs["residual"] = create((m, n), dtype, seed + 4)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    rms_norm_linear(x, weight, out, gate_up=variant == "norm_gate_up", **kwargs)
    assert_close(out, rms_norm_linear_reference(x, weight, gate_up=variant == "norm_gate_up", **kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_linear_residual_in_place(dtype):
    """out may alias the residual (the decode loop adds into the hidden state it owns)."""
    x, weight, hidden = create((3, 40), dtype, 1), create((33, 40), dtype, 2, 0.2), create((3, 33), dtype, 3)
    expected = rms_norm_linear_reference(x, weight, residual=hidden)
    rms_norm_linear(x, weight, hidden, residual=hidden)
    assert_close(hidden, expected)


def test_rms_norm_linear_strided_rows():
    """Rows of a wider buffer (the engine's kept layer-l states are a slice) are read through their stride."""
    buffer = create((5, 64), torch.float32, 4)
    x = buffer[:, :48]
    weight = create((20, 48), torch.float32, 5, 0.2)
    out = torch.empty(5, 20, device=DEVICE)
    rms_norm_linear(x, weight, out)
    assert_close(out, rms_norm_linear_reference(x, weight))


def test_rms_norm_linear_errors_name_the_value():
    x, weight = create((2, 8), torch.float32, 0), create((4, 9), torch.float32, 1)
    with pytest.raises(ValueError, match="weight has last dimension 9, expected 8"):
        rms_norm_linear(x, weight, torch.empty(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be a unit-stride \[2, 3\] tensor, got shape \(2, 4\)"):
        rms_norm_linear(x, create((6, 8), torch.float32, 2), torch.empty(2, 4, device=DEVICE), gate_up=True)


# ---- qkv_rope_cache ----------------------------------------------------------------------------------------------
# (batch, new tokens per sequence, cache length, start of each sequence)
QKV_CASES = [(1, 1, 1, [0]), (1, 3, 17, [14]), (2, 7, 17, [0, 10]), (3, 1, 300, [299, 0, 123]), (1, 7, 300, [200])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,t,max_len,starts", QKV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_rope_cache(dtype, bsz, t, max_len, starts, bias):
    k, num_heads, num_kv_heads, head_dim = 45, 6, 2, 10  # head_dim 10: rotation halves of 5, not a power of two
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    seed = 7 * max_len + t + bias
    x = create((bsz, t, k), dtype, seed)
    weight = create((rows, k), dtype, seed + 1, k ** -0.5)
    b = create((rows,), dtype, seed + 2) if bias else None
    norm_weight = create((k,), dtype, seed + 3, 0.25) + 1
    cos, sin = rope_tables(max_len + 5, head_dim, dtype)
    start = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
    k_cache = create((bsz, num_kv_heads, max_len, head_dim), dtype, seed + 4)
    v_cache = create((bsz, num_kv_heads, max_len, head_dim), dtype, seed + 5)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = torch.full((bsz, t, num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)

    qkv_rope_cache(x, weight, b, norm_weight, 1e-6, cos, sin, start, q, k_cache, v_cache)
    q_ref = qkv_rope_cache_reference(x, weight, b, norm_weight, 1e-6, cos, sin, start, k_ref, v_ref)
    assert_close(q, q_ref)
    written = torch.zeros(bsz, 1, max_len, 1, dtype=torch.bool, device=DEVICE)
    for i, s in enumerate(starts):
        written[i, :, s:s + t] = True
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        assert torch.equal(cache.masked_select(~written), ref.masked_select(~written))  # untouched slots: exact
        assert_close(cache.masked_select(written), ref.masked_select(written))


def test_qkv_rope_cache_does_not_write_past_the_cache():
    """A position at or beyond the cache length is dropped, never written out of bounds."""
    num_heads, num_kv_heads, head_dim, k = 2, 1, 8, 16
    x = create((1, 3, k), torch.float32, 0)
    weight = create(((num_heads + 2 * num_kv_heads) * head_dim, k), torch.float32, 1)
    cos, sin = rope_tables(8, head_dim, torch.float32)
    backing = create((1, num_kv_heads, 6, head_dim), torch.float32, 2)
    k_cache = backing[:, :, :4]  # the slots after position 3 belong to someone else
    v_cache = create((1, num_kv_heads, 4, head_dim), torch.float32, 3)
    before = backing.clone()
    q = torch.empty(1, 3, num_heads, head_dim, device=DEVICE)
    qkv_rope_cache(x, weight, None, None, 1e-6, cos, sin, torch.tensor([2], device=DEVICE), q, k_cache, v_cache)
    assert torch.equal(backing[:, :, 4:], before[:, :, 4:])
    assert not torch.equal(backing[:, :, 2:4], before[:, :, 2:4])


def test_qkv_rope_cache_errors_name_the_value():
    x = create((1, 2, 16), torch.float32, 0)
    cos, sin = rope_tables(8, 8, torch.float32)
    k_cache = torch.zeros(1, 1, 8, 8, device=DEVICE)
    q = torch.empty(1, 2, 2, 8, device=DEVICE)
    weight = create((32, 16), torch.float32, 1)
    with pytest.raises(ValueError, match=r"start must be an integer \[1\] tensor"):
        qkv_rope_cache(x, weight, None, None, 1e-6, cos, sin, torch.tensor([0.0], device=DEVICE), q, k_cache,
                       k_cache.clone())
    with pytest.raises(ValueError, match="weight has 24 rows, expected"):
        qkv_rope_cache(x, weight[:24], None, None, 1e-6, cos, sin, torch.tensor([0], device=DEVICE), q, k_cache,
                       k_cache.clone())


# ---- decode_attention --------------------------------------------------------------------------------------------
# (new queries per sequence, cache length, start of each sequence); 1100 positions use 3 key chunks + the merge
ATTENTION_CASES = [(1, 1, [0]), (1, 17, [16, 3]), (3, 17, [14, 0]), (7, 300, [0, 150, 293]), (1, 300, [299]),
                   (3, 1100, [1097, 5, 600])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,max_len,starts", ATTENTION_CASES)
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention(dtype, t, max_len, starts, heads, window):
    num_heads, num_kv_heads = heads
    head_dim, bsz = 24, len(starts)
    seed = max_len + 10 * t + num_kv_heads
    q = create((bsz, t, num_heads, head_dim), dtype, seed)
    k_cache = create((bsz, num_kv_heads, max_len, head_dim), dtype, seed + 1)
    v_cache = create((bsz, num_kv_heads, max_len, head_dim), dtype, seed + 2)
    start = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, start, out, window)
    assert_close(out, decode_attention_reference(q, k_cache, v_cache, start, window))


def test_decode_attention_splits_the_key_axis_of_long_caches():
    """The split path is really taken by the 1100-position cases above, and not by short caches."""
    assert attention_blocks(3, 1100, 24).splits == 3
    assert attention_blocks(3, 300, 24).splits == 1


def test_decode_attention_ignores_stale_slots():
    """Slots after each query's position (rejected drafts, other sequences' lengths) change nothing."""
    q = create((2, 3, 4, 16), torch.float32, 0)
    k_cache = create((2, 2, 40, 16), torch.float32, 1)
    v_cache = create((2, 2, 40, 16), torch.float32, 2)
    start = torch.tensor([5, 20], device=DEVICE)
    out, out_stale = torch.empty_like(q), torch.empty_like(q)
    decode_attention(q, k_cache, v_cache, start, out)
    k_cache[0, :, 8:], v_cache[0, :, 8:], k_cache[1, :, 23:] = 1e4, -1e4, 1e4
    decode_attention(q, k_cache, v_cache, start, out_stale)
    assert torch.equal(out, out_stale)


# ---- heads -------------------------------------------------------------------------------------------------------
def head_inputs(rows: int, k: int, vocab: int, dtype, seed: int):
    """x [rows, k], a norm weight, and a head W [vocab, k] whose row winners[r] beats every other logit of row r
    by a clear margin (so the argmax is defined in every dtype); returns (x, norm_weight, W, winners)."""
    x = create((rows, k), torch.float32, seed)
    norm_weight = create((k,), torch.float32, seed + 1, 0.25) + 1
    head = create((vocab, k), torch.float32, seed + 2, k ** -0.5)
    normed = norm_weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    winners = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:rows].to(DEVICE)
    head[winners] = 6.0 * normed / normed.pow(2).sum(-1, keepdim=True)  # logit 6 for its row, ~0 for the others
    return x.to(dtype), norm_weight.to(dtype), head.to(dtype), winners


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz", [1, 3, 7])
@pytest.mark.parametrize("vocab", [123, 5000])
@pytest.mark.parametrize("mapped", [False, True])
def test_draft_head(dtype, bsz, vocab, mapped):
    k = 45
    x, norm_weight, head, winners = head_inputs(bsz, k, vocab, dtype, seed=bsz * vocab + mapped)
    vocab_map = torch.randperm(3 * vocab, generator=torch.Generator().manual_seed(vocab))[:vocab].to(DEVICE) \
        if mapped else None
    token = torch.full((bsz,), -1, dtype=torch.int64, device=DEVICE)
    prob = torch.full((bsz,), float("nan"), device=DEVICE)
    keep = torch.zeros(bsz, dtype=torch.bool, device=DEVICE)
    threshold = 0.5
    draft_head(x, norm_weight, 1e-6, head, vocab_map, threshold, token, prob, keep)
    ref_token, ref_prob, _ = draft_head_reference(x, norm_weight, 1e-6, head, vocab_map, threshold)
    assert torch.equal(token, winners if vocab_map is None else vocab_map[winners])
    assert torch.equal(token, ref_token)
    assert_close(prob, ref_prob.float(), dtype)  # fp32 outputs of dtype logits
    assert torch.equal(keep, prob >= threshold)


def test_draft_head_keep_flag_follows_the_threshold():
    x, norm_weight, head, _ = head_inputs(3, 32, 200, torch.float32, seed=3)
    token = torch.empty(3, dtype=torch.int64, device=DEVICE)
    prob = torch.empty(3, device=DEVICE)
    keep = torch.empty(3, dtype=torch.bool, device=DEVICE)
    draft_head(x, norm_weight, 1e-6, head, None, 0.0, token, prob, keep)
    assert bool(keep.all())
    middle = float(prob.sort().values[1])
    draft_head(x, norm_weight, 1e-6, head, None, middle, token, prob, keep)
    assert keep.tolist() == [p >= middle for p in prob.tolist()] and 1 <= int(keep.sum()) <= 2
    draft_head(x, norm_weight, 1e-6, head, None, 1.0, token, prob, keep)
    assert not bool(keep.any())


def test_heads_break_ties_by_the_first_index_across_chunks():
    """Equal best logits in different vocabulary chunks: the first index wins, as with torch.argmax."""
    vocab, k = 5000, 32
    assert head_blocks(1, vocab, k).splits > 1
    x, norm_weight, head, winners = head_inputs(1, k, vocab, torch.float32, seed=5)
    first, second = 17, 4321
    head[first] = head[winners[0]]
    head[second] = head[winners[0]]
    token = torch.empty(1, dtype=torch.int64, device=DEVICE)
    draft_head(x, norm_weight, 1e-6, head, None, 0.5, token, torch.empty(1, device=DEVICE),
               torch.empty(1, dtype=torch.bool, device=DEVICE))
    assert int(token[0]) == min(first, int(winners[0]))
    targets = torch.empty(1, 1, dtype=torch.int64, device=DEVICE)
    verify_head(x[:, None], norm_weight, 1e-6, head, targets)
    assert int(targets[0, 0]) == min(first, int(winners[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,t", [(1, 1), (1, 3), (3, 7), (2, 4)])
@pytest.mark.parametrize("vocab", [123, 5000])
@pytest.mark.parametrize("drafts_kind", ["all", "none", "partial"])
def test_verify_head(dtype, bsz, t, vocab, drafts_kind):
    k = 45
    seed = vocab + 10 * t + bsz
    x, norm_weight, head, winners = head_inputs(bsz * t, k, vocab, dtype, seed)
    x = x.view(bsz, t, k)
    expected_targets = winners.view(bsz, t)
    drafts = expected_targets[:, :t - 1].clone()
    gen = torch.Generator().manual_seed(seed)
    if drafts_kind == "none" and t > 1:
        drafts[:, 0] = (drafts[:, 0] + 1) % vocab
    if drafts_kind == "partial" and t > 1:
        for b in range(bsz):
            i = int(torch.randint(0, t - 1, (1,), generator=gen))
            drafts[b, i] = (drafts[b, i] + 1) % vocab
    targets = torch.full((bsz, t), -1, dtype=torch.int64, device=DEVICE)
    accepted = torch.full((bsz,), -1, dtype=torch.int64, device=DEVICE)
    bonus = torch.full((bsz,), -1, dtype=torch.int64, device=DEVICE)
    verify_head(x, norm_weight, 1e-6, head, targets, drafts, accepted, bonus)
    ref_targets, ref_accepted, ref_bonus = verify_head_reference(x, norm_weight, 1e-6, head, drafts)
    assert torch.equal(targets, expected_targets)
    assert torch.equal(targets, ref_targets)
    assert torch.equal(accepted, ref_accepted)
    assert torch.equal(bonus, ref_bonus)
    if drafts_kind == "all":
        assert accepted.tolist() == [t - 1] * bsz
    if drafts_kind == "none":
        assert accepted.tolist() == [0] * bsz


def test_verify_head_errors_name_the_value():
    x = create((1, 3, 8), torch.float32, 0)
    head = create((10, 8), torch.float32, 1)
    targets = torch.empty(1, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"drafts must be a \[1, 2\] int64 tensor"):
        verify_head(x, torch.ones(8, device=DEVICE), 1e-6, head, targets, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="the LM-head kernels take at most 64 rows per launch, got 65"):
        head_blocks(65, 10, 8)

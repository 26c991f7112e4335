"""Sampling: HF's logit processing, the speculative accept/residual rule, and the engine's sampled output checked
against the target model's exact distribution with a chi-squared test (and a biased sampler that it rejects)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import kangaroo_fast
from kangaroo_fast import DecodeSettings, cli
from kangaroo_fast import engine as engine_module
from kangaroo_fast.sampling import process_logits, sample, speculative_accept, target_probs

from conftest import hf_greedy, random_adapter, random_prompt, tiny_model

ALPHA = 1e-3  # significance of every chi-squared test here (fixed seeds: each outcome is deterministic)
MIN_EXPECTED = 5.0  # cells expected fewer times than this are pooled into one bin


# ---- the chi-squared test ------------------------------------------------------------------------------------------
def chi_squared_p_value(observed: Counter, expected: dict, runs: int) -> float:
    """Pearson's goodness-of-fit p-value of ``observed`` counts against cell probabilities ``expected``.

    Cells expected fewer than MIN_EXPECTED times, and any observed cell missing from ``expected``, share one pooled
    bin; an observation in a pooled bin of probability 0 gives p = 0. The survival function of chi-squared with
    df degrees of freedom is the regularised upper incomplete gamma Q(df / 2, x / 2)."""
    big = {cell for cell, prob in expected.items() if prob * runs >= MIN_EXPECTED}
    bins = [(observed.get(cell, 0), expected[cell] * runs) for cell in big]
    pooled_expected = runs - sum(e for _, e in bins)
    pooled_observed = runs - sum(o for o, _ in bins)
    if pooled_expected > 1e-9 * runs:
        bins.append((pooled_observed, pooled_expected))
    elif pooled_observed > 0:
        return 0.0
    statistic = sum((o - e) ** 2 / e for o, e in bins)
    df = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("df,critical", [(1, 3.841459), (4, 9.487729), (10, 18.307038), (57, 75.623726)])
def test_chi_squared_survival_function_matches_tables(df, critical):
    """The 5% critical values of the chi-squared table give p = 0.05."""
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                torch.tensor(critical / 2, dtype=torch.float64))
    assert float(p) == pytest.approx(0.05, abs=2e-6)


def test_chi_squared_p_value_on_known_counts():
    fair = {face: 1 / 6 for face in range(6)}
    assert chi_squared_p_value(Counter({f: 100 for f in range(6)}), fair, 600) == pytest.approx(1.0)
    loaded = Counter({0: 150, 1: 90, 2: 90, 3: 90, 4: 90, 5: 90})  # statistic 30, df 5
    assert chi_squared_p_value(loaded, fair, 600) == pytest.approx(1.4739e-5, rel=1e-3)
    assert chi_squared_p_value(Counter({0: 599, 6: 1}), {0: 1.0}, 600) == 0.0  # an impossible outcome


# ---- HF's meaning of temperature, top-k, top-p ---------------------------------------------------------------------
def hf_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The warpers HF's ``generate(do_sample=True)`` adds for these values (with min_tokens_to_keep=1)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


PROCESSING = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (0.5, 0, 0.9), (1.0, 0, 1e-4),
              (0.8, 7, 0.6), (2.0, 200, 0.95)]


@pytest.mark.parametrize("temperature,top_k,top_p", PROCESSING)
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 123), (5, 1), (2, 97)])
def test_process_logits_equals_hf_warpers(temperature, top_k, top_p, rows, vocab):
    gen = torch.Generator().manual_seed(rows * 1000 + vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3.0
    logits[:, : vocab // 3] = logits[:, :1]  # ties at the top-k and top-p boundaries
    settings = DecodeSettings(exit_layer=1, temperature=temperature, top_k=top_k, top_p=top_p)
    got = process_logits(logits, settings)
    want = hf_warpers(temperature, top_k, top_p)(torch.zeros(rows, 1, dtype=torch.int64), logits.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got, want)
    probs = target_probs(logits, settings)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows))
    assert bool((probs > 0).any(-1).all())  # min_tokens_to_keep = 1


def test_process_logits_keeps_leading_dims():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 31, generator=gen)
    settings = DecodeSettings(exit_layer=1, temperature=0.9, top_k=4, top_p=0.8)
    got = process_logits(logits, settings)
    assert got.shape == (2, 5, 31)
    assert torch.equal(got[1], process_logits(logits[1], settings))
    assert bool((torch.isfinite(got).sum(-1) <= 4).all())


# ---- the accept/residual rule alone -------------------------------------------------------------------------------
def _random_distribution(vocab: int, gen: torch.Generator, zeros: int) -> torch.Tensor:
    probs = torch.rand(vocab, generator=gen, dtype=torch.float64) ** 3
    probs[torch.randperm(vocab, generator=gen)[:zeros]] = 0.0
    return (probs / probs.sum()).float()


@pytest.mark.parametrize("vocab,zeros_p,zeros_q", [(5, 0, 0), (7, 2, 3), (4, 1, 0)])
def test_speculative_accept_emits_the_target_distribution(vocab, zeros_p, zeros_q):
    """Draft d1 ~ q, then the rule: the first emitted token is distributed as p1, whatever q is (zeros included),
    and all-accepted rows end with a bonus from p2."""
    gen = torch.Generator().manual_seed(vocab * 10 + zeros_p)
    p = torch.stack([_random_distribution(vocab, gen, zeros_p), _random_distribution(vocab, gen, 0)])
    q = _random_distribution(vocab, gen, zeros_q)[None]
    runs = 20000
    drafts = sample(q.expand(runs, vocab), gen)[:, None]
    accepted, token = speculative_accept(drafts, torch.ones(runs, dtype=torch.int64), q.expand(runs, 1, vocab),
                                         p.expand(runs, 2, vocab), gen)
    assert set(accepted.tolist()) <= {0, 1}
    first = torch.where(accepted == 1, drafts[:, 0], token)
    bonus = token[accepted == 1]
    assert chi_squared_p_value(Counter(first.tolist()), dict(enumerate(p[0].tolist())), runs) > ALPHA
    assert chi_squared_p_value(Counter(bonus.tolist()), dict(enumerate(p[1].tolist())), bonus.numel()) > ALPHA
    overlap = float(torch.minimum(p[0], q[0]).sum())  # the acceptance probability sum_x min(p, q)
    rate = float(accepted.float().mean())
    assert rate == pytest.approx(overlap, abs=4 * (overlap * (1 - overlap) / runs) ** 0.5 + 1e-3)


def test_speculative_accept_deterministic_cases():
    """Rows whose outcome is certain: q == p everywhere (all accepted, the bonus from a one-hot p), a draft p
    gives no mass (rejected there, the residual one-hot), no drafts at all (the bonus straight from p1), and
    padding past num_drafts ignored."""
    v = 4
    one_hot = torch.eye(v)
    q = torch.zeros(3, 3, v)
    p = torch.zeros(3, 4, v)
    drafts = torch.tensor([[1, 2, 3], [0, 2, 1], [3, 3, 3]])
    num_drafts = torch.tensor([3, 2, 0])
    q[0, :3], p[0, :3], p[0, 3] = one_hot[[1, 2, 3]], one_hot[[1, 2, 3]], one_hot[0]
    q[1, 0], p[1, 0] = one_hot[0], one_hot[0]
    q[1, 1], p[1, 1] = one_hot[2], 0.5 * (one_hot[1] + one_hot[3])  # p(2) = 0: rejected; residual = p
    q[1, 2], p[1, 2] = one_hot[1], 0.0  # padding: would be rejected if it counted
    q[2, :] = one_hot[3]
    p[2, 0] = one_hot[2]  # no drafts: the bonus from p1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        accepted, token = speculative_accept(drafts, num_drafts, q, p, gen)
        assert accepted.tolist() == [3, 1, 0]
        assert token[0] == 0 and token[1] in (1, 3) and token[2] == 2


def test_speculative_accept_residual_excludes_the_rejected_mass():
    """p = (0.5, 0.5), q = (1, 0): draft 0 is accepted half the time; a rejection must emit token 1 (the
    residual), never token 0."""
    gen = torch.Generator().manual_seed(2)
    runs = 4000
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]).expand(runs, 2, 2)
    q = torch.tensor([[[1.0, 0.0]]]).expand(runs, 1, 2)
    accepted, token = speculative_accept(torch.zeros(runs, 1, dtype=torch.int64), torch.ones(runs, dtype=torch.int64),
                                         q, p, gen)
    assert bool((token[accepted == 0] == 1).all()) and bool((token[accepted == 1] == 0).all())
    assert 0.45 < float(accepted.float().mean()) < 0.55


def test_speculative_accept_without_drafts_samples_the_bonus():
    p = torch.tensor([[[0.0, 1.0, 0.0]]])
    accepted, token = speculative_accept(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                         p.new_zeros(1, 0, 3), p, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [0] and token.tolist() == [1]


# ---- the engine's sampled output against the exact target distribution --------------------------------------------
VOCAB = 9
PROMPT_LEN = 4
FIRST = 3  # the joint distribution of the first three generated tokens is tested


def exact_joint(model, prompt: torch.Tensor, temperature: float, top_k: int, top_p: float) -> dict:
    """P(t1, t2, t3 | prompt) of the HF model under HF's warpers, by enumerating every context (V^2 of them)."""
    warpers = hf_warpers(temperature, top_k, top_p)
    joint = {(): 1.0}
    with torch.no_grad():
        for _ in range(FIRST):
            prefixes = list(joint)
            ctx = torch.cat([prompt.repeat(len(prefixes), 1), torch.tensor(prefixes, dtype=torch.int64).view(
                len(prefixes), -1)], dim=1)
            logits = model(ctx, attention_mask=torch.ones_like(ctx)).logits[:, -1].float()
            probs = warpers(ctx, logits).softmax(-1).double()
            joint = {prefix + (t,): joint[prefix] * float(probs[i, t])
                     for i, prefix in enumerate(prefixes) for t in range(VOCAB)}
    return joint


@pytest.fixture(scope="module")
def sampling_case():
    model = tiny_model("llama", 5, vocab_size=VOCAB)
    prompt = random_prompt(VOCAB, PROMPT_LEN, 3)
    return model, prompt


# (temperature, top_k, top_p, threshold, max_draft_steps, draft vocabulary, context lookup)
SAMPLING_SETTINGS = [
    (1.0, 0, 1.0, 0.0, 2, None, 0),
    (0.7, 5, 1.0, 0.0, 3, None, 0),
    (1.3, 0, 0.85, 0.3, 2, None, 0),
    (1.0, 4, 0.9, 0.0, 2, [8, 0, 3, 5, 6], 0),
    (1.0, 0, 1.0, 0.0, 3, None, 1),  # lookup drafts are point masses: q one-hot where the context supplied them
    (0.8, 0, 0.9, 0.5, 2, [8, 0, 3, 5, 6], 2),
]


def _sampled_counts(km, prompt, settings, runs: int, batch: int, generator) -> Counter:
    temperature, top_k, top_p, threshold, steps, _, lookup = settings
    counts = Counter()
    for _ in range(runs // batch):
        prompts = [prompt[0]] * batch if batch > 1 else prompt
        outs = km.generate(prompts, max_new_tokens=FIRST + 1, threshold=threshold, max_draft_steps=steps,
                           lookup=lookup, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, eos_token_id=[])
        for out in outs if batch > 1 else [outs]:
            assert len(out.tokens) == FIRST + 1
            counts[tuple(out.tokens[:FIRST])] += 1
    return counts


@pytest.mark.parametrize("settings", SAMPLING_SETTINGS)
def test_batched_sampling_matches_target_distribution(sampling_case, settings):
    model, prompt = sampling_case
    temperature, top_k, top_p, threshold, steps, vocab, _ = settings
    adapter = random_adapter(model, 2, seed=17, draft_vocab=vocab)
    km = kangaroo_fast.load(model, adapter=adapter, max_cache_len=PROMPT_LEN + 2 * FIRST)
    runs = 6000
    counts = _sampled_counts(km, prompt, settings, runs, 1000, torch.Generator().manual_seed(23))
    expected = exact_joint(model, prompt, temperature, top_k, top_p)
    assert chi_squared_p_value(counts, expected, runs) > ALPHA


def test_single_sequence_sampling_matches_target_distribution(sampling_case):
    """The batch-1 path (positions as ints) through the same test, fewer runs."""
    model, prompt = sampling_case
    settings = SAMPLING_SETTINGS[1]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=17), max_cache_len=PROMPT_LEN + 2 * FIRST)
    runs = 700
    counts = _sampled_counts(km, prompt, settings, runs, 1, torch.Generator().manual_seed(29))
    assert chi_squared_p_value(counts, exact_joint(model, prompt, *settings[:3]), runs) > ALPHA


def _accept_every_draft(drafts, num_drafts, draft_probs, target_probs, generator):
    """A biased sampler: every draft passes, then a bonus from p (the draft's distribution leaks through)."""
    rows = torch.arange(drafts.shape[0])
    return num_drafts, sample(target_probs[rows, num_drafts], generator)


def _residual_from_p(drafts, num_drafts, draft_probs, target_probs, generator):
    """A subtly biased sampler: the right acceptance test, but a rejected draft is replaced by a draw from p
    instead of the residual max(0, p - q)."""
    accepted, _ = speculative_accept(drafts, num_drafts, draft_probs, target_probs, generator)
    rows = torch.arange(drafts.shape[0])
    return accepted, sample(target_probs[rows, accepted], generator)


@pytest.mark.parametrize("biased", [_accept_every_draft, _residual_from_p])
def test_chi_squared_rejects_a_biased_sampler(sampling_case, monkeypatch, biased):
    """Negative control: the same test, with the engine's accept rule replaced by a biased one, must fail."""
    model, prompt = sampling_case
    settings = SAMPLING_SETTINGS[0]
    km = kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=17), max_cache_len=PROMPT_LEN + 2 * FIRST)
    monkeypatch.setattr(engine_module, "speculative_accept", biased)
    runs = 6000
    counts = _sampled_counts(km, prompt, settings, runs, 1000, torch.Generator().manual_seed(23))
    assert chi_squared_p_value(counts, exact_joint(model, prompt, *settings[:3]), runs) < ALPHA


# ---- seeds, greedy, bad values -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def km_llama():
    model = tiny_model("llama", 31)
    return model, kangaroo_fast.load(model, adapter=random_adapter(model, 2, seed=32))


def test_seed_makes_sampling_reproducible(km_llama):
    model, km = km_llama
    ids = random_prompt(model.config.vocab_size, 6, 33)
    kwargs = dict(max_new_tokens=20, temperature=1.0, threshold=0.0, max_draft_steps=3, eos_token_id=[])
    first = km.generate(ids, seed=5, **kwargs).tokens
    assert km.generate(ids, seed=5, **kwargs).tokens == first
    assert km.generate(ids, generator=torch.Generator().manual_seed(5), **kwargs).tokens == first
    others = {tuple(km.generate(ids, seed=s, **kwargs).tokens) for s in range(6, 11)}
    assert len(others | {tuple(first)}) > 1
    assert len(first) == 20


def test_temperature_zero_is_greedy(km_llama):
    model, km = km_llama
    ids = random_prompt(model.config.vocab_size, 6, 34)
    ref = hf_greedy(model, ids, 16)
    assert km.generate(ids, max_new_tokens=16).tokens == ref
    assert km.generate(ids, max_new_tokens=16, temperature=0.0, top_k=3, top_p=0.5, seed=1).tokens == ref


def test_top_k_one_samples_the_greedy_output(km_llama):
    """top_k=1 leaves one token per step: sampling then reproduces HF's greedy output for any seed."""
    model, km = km_llama
    ids = random_prompt(model.config.vocab_size, 6, 35)
    ref = hf_greedy(model, ids, 16)
    for seed in (0, 1):
        out = km.generate(ids, max_new_tokens=16, temperature=1.0, top_k=1, seed=seed, threshold=0.0)
        assert out.tokens == ref
        assert out.stats.draft_steps > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), r"temperature=-0\.5 must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be"),
    (dict(temperature=float("inf")), r"temperature=inf must be"),
    (dict(temperature="1"), r"temperature='1' must be"),
    (dict(top_p=0.0), r"top_p=0\.0 must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1\.5 must lie in \(0, 1\]"),
    (dict(top_p=-0.1), r"top_p=-0\.1 must lie in"),
    (dict(top_k=-1), r"top_k=-1 must be an integer >= 0"),
    (dict(top_k=2.5), r"top_k=2\.5 must be an integer >= 0"),
    (dict(seed=1.5, temperature=1.0), r"seed=1\.5 must be an integer"),
    (dict(seed=1, generator=torch.Generator(), temperature=1.0), "pass seed= or generator=, not both"),
])
def test_bad_sampling_values(km_llama, kwargs, message):
    model, km = km_llama
    with pytest.raises(ValueError, match=message):
        km.generate(random_prompt(model.config.vocab_size, 4, 36), max_new_tokens=3, **kwargs)


def test_sampling_ids_are_valid_over_many_steps(km_llama):
    """Long sampled runs (drafts rejected and accepted, both paths) only emit ids of the vocabulary."""
    model, km = km_llama
    ids = random_prompt(model.config.vocab_size, 5, 37)
    out = km.generate(ids, max_new_tokens=60, temperature=1.2, top_p=0.95, seed=3, threshold=0.0,
                      max_draft_steps=4, eos_token_id=[])
    assert len(out.tokens) == 60 and all(0 <= t < model.config.vocab_size for t in out.tokens)
    s = out.stats
    assert sum(s.accepted_at) + s.rounds == s.new_tokens - 1
    assert 0 < sum(s.accepted_at) < s.draft_steps


# ---- the command line --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny Llama saved with a word-level tokenizer ("w0".."w130") and a random adapter beside it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli_model")
    model = tiny_model("llama", 31)
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(model.config.vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w7").save_pretrained(root / "model")
    random_adapter(model, 2, seed=32).save(root / "adapter")
    return str(root / "model"), str(root / "adapter")


def test_cli_sampling_flags_match_the_api(cli_model, capsys):
    model_dir, adapter_dir = cli_model
    prompt = "w3 w5 w9 w11"
    km = kangaroo_fast.load(model_dir, adapter=adapter_dir, dtype="float32")
    for flags, kwargs in [(["--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "4"],
                           dict(temperature=0.9, top_k=20, top_p=0.95, seed=4)),
                          ([], dict())]:
        code = cli.main(["generate", prompt, "--model", model_dir, "--adapter", adapter_dir, "--json",
                         "--max-new-tokens", "12", "--dtype", "float32", *flags])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] == km.generate(prompt, max_new_tokens=12, **kwargs).tokens
    ids = km.encode(prompt)
    assert result["tokens"] == hf_greedy(km.hf_model, ids, 12)  # no sampling flag: greedy


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-p", "0"], "top_p=0.0"),
    (["--top-p", "1.01"], "top_p=1.01"),
    (["--top-k", "-2"], "top_k=-2"),
])
def test_cli_rejects_bad_sampling_values(cli_model, args, message, capsys):
    model_dir, adapter_dir = cli_model
    code = cli.main(["generate", "w1 w2", "--model", model_dir, "--adapter", adapter_dir, "--dtype", "float32", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_sampled_batch_stops_each_sequence_at_eos(km_llama):
    """With a likely EOS, sampled sequences of a batch end at their first EOS (stop_reason eos) or run to
    max_new_tokens without one; finished sequences leave the batch while the others go on."""
    model, km = km_llama
    prompts = [random_prompt(model.config.vocab_size, n, 40 + n)[0] for n in (3, 8, 5, 1, 12, 6)]
    outs = km.generate(prompts, max_new_tokens=30, temperature=1.5, seed=7, threshold=0.0, max_draft_steps=3,
                       eos_token_id=[0, 40, 80, 120])
    eos = {0, 40, 80, 120}
    reasons = set()
    for out in outs:
        reasons.add(out.stats.stop_reason)
        assert not eos & set(out.tokens[:-1])
        if out.stats.stop_reason == "eos":
            assert out.tokens[-1] in eos
        else:
            assert out.stats.stop_reason == "max_new_tokens" and len(out.tokens) == 30
    assert reasons == {"eos", "max_new_tokens"}

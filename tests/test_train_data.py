"""The engine as the batched greedy decoder that writes the adapter's training answers: HF's greedy output, row by
row."""
import pytest
import torch

from conftest import tiny_model
from kangaroo_fast.models import pack_model
from kangaroo_fast.train.data import greedy_decoder


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_batched_greedy_equals_hf_greedy_per_row(kind):
    overrides = {"sliding_window": 6} if kind == "mistral" else {}
    hf = tiny_model(kind, seed=4, **overrides)
    gen = torch.Generator().manual_seed(7)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(12, vocab, (n,), generator=gen).tolist() for n in (7, 1, 13, 4)]
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    # a token of row 2's answer serves as EOS: that row (and any other holding it) stops at its first occurrence
    eos = {expected[2][3]}
    stop_at = [next((j + 1 for j, t in enumerate(row) if t in eos), len(row)) for row in expected]
    answers = greedy_decoder(pack_model(hf), 13 + 9 + 1)(prompts, 9, eos)
    assert answers == [row[:n] for row, n in zip(expected, stop_at)]
    assert len(answers[2]) <= 4 and answers[2][-1] in eos


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_teacher_features_equal_hf_forward(kind):
    """teacher_features reads the engine's forward (right-padded rows of several lengths, batches of 2): per
    sequence, HF's hidden states after the exit layers and its top-k next-token distribution, in float32."""
    from kangaroo_fast.train.data import teacher_features

    hf = tiny_model(kind, seed=5)
    gen = torch.Generator().manual_seed(11)
    sequences = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 1, 23, 7, 16)]
    features = teacher_features(pack_model(hf), sequences, [1, 2], 5, 2, progress=False)
    assert len(features) == len(sequences)
    for i, seq in enumerate(sequences):
        out = hf(input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False)
        probs, top = out.logits[0].float().softmax(-1).topk(5, dim=-1)
        for layer in (1, 2):
            assert features.hidden[layer][i].shape == (len(seq), hf.config.hidden_size)
            torch.testing.assert_close(features.hidden[layer][i].float(), out.hidden_states[layer][0],
                                       atol=2e-2, rtol=1e-2)  # kept in bf16
        assert torch.equal(features.top_ids[i], top.to(torch.int32))
        torch.testing.assert_close(features.top_probs[i].float(), probs, atol=1e-3, rtol=1e-3)  # kept in fp16


def test_answers_resume_from_saved_progress(default_model):
    """generate_answers saves every batch (on_batch); started again from what an interrupted run saved (done), it
    decodes only the batches left and returns what an uninterrupted run returns."""
    from kangaroo_fast.train.data import generate_answers

    km = default_model.model
    texts = ["Name a colour.", "What is two plus two?", "Say hello in French.", "Write one word.",
             "Give a number between 1 and 9."]
    eos = set(km.eos_ids())
    saved: list[dict] = []
    whole = generate_answers(km.packed, km.tokenizer, texts, 6, 2, eos, progress=False,
                             on_batch=lambda made: saved.append(dict(made)))
    assert [len(s) for s in saved] == [2, 4, 5]  # three batches, each saved
    interrupted = saved[0]
    calls: list[int] = []
    resumed = generate_answers(km.packed, km.tokenizer, texts, 6, 2, eos, progress=False, done=interrupted,
                               on_batch=lambda made: calls.append(len(made)))
    assert resumed == whole
    assert calls == [4, 5]  # the saved batch was not decoded again
    assert all(resumed[i] == seq for i, seq in interrupted.items())


def test_sampled_requests_are_deterministic_resume_and_filter(default_model, monkeypatch):
    """sample_requests: n distinct requests of at least min_words, the same for a seed, other ones for another
    seed; a run resumed from the batches an interrupted one saved samples only the batches left; what ``keep``
    refuses is skipped; the prefix it samples from is where a chat prompt's user text begins."""
    from kangaroo_fast.train import data

    monkeypatch.setitem(data.REQUEST_SAMPLING, "max_tokens", 48)  # short requests: a quicker test
    km = default_model.model
    eos = set(km.eos_ids())
    prefix = data.request_prefix(km.tokenizer)
    assert data.chat_ids(km.tokenizer, "Hello there")[:len(prefix)] == prefix
    assert len(data.chat_ids(km.tokenizer, "Hello there")) > len(prefix)

    def sample(n, seed=0, **kwargs):
        return data.sample_requests(km.packed, km.tokenizer, n, 3, eos, seed=seed, progress=False, **kwargs)

    saved: list[list[list[str]]] = []
    whole = sample(4, on_batch=lambda batches: saved.append([list(b) for b in batches]))
    assert len(whole) == 4 and len(set(whole)) == 4
    assert all(len(text.split()) >= data.REQUEST_SAMPLING["min_words"] for text in whole)
    assert len(saved) >= 2 and all(len(batch) == 3 for batch in saved[-1])
    calls: list[int] = []
    assert sample(4, done=saved[0], on_batch=lambda batches: calls.append(len(batches))) == whole
    assert calls == list(range(2, len(saved) + 1))  # the saved batch was not sampled again
    assert sample(3, done=saved[-1], keep=lambda text: text != whole[0]) == whole[1:]
    assert not set(sample(2, seed=1)) & set(whole[:2])

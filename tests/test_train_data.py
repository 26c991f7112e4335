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

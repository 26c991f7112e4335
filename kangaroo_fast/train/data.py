"""Offline training data for the adapter: the base model's own greedy answers to instructions the project
writes, plus local documentation text, and the teacher features the adapter learns from.

Features per sequence: the hidden states after ``exit_layer`` layers (the adapter's input) and the full model's
next-token distribution, kept as its top-k (ids and probabilities) to save memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm


def chat_ids(tokenizer, instruction: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(instruction)["input_ids"])


@torch.no_grad()
def generate_answers(packed, tokenizer, instructions: list[str], max_new_tokens: int, batch_size: int,
                     eos_ids: set[int], progress: bool = True, done: dict[int, list[int]] | None = None,
                     on_batch: Callable[[dict[int, list[int]]], None] | None = None) -> list[list[int]]:
    """Prompt + greedy answer token ids for every instruction, decoded in batches of similar prompt lengths by the
    engine without drafting (``Engine.generate_batch``: each row at its own positions, grouped K/V read in place;
    float32 output equals HF greedy, tests/test_train_data.py). In bf16 a row may part from HF's greedy text where
    rounding differs; for training data that does not matter.

    Resumable: ``done`` holds sequences already made (by instruction index), which are kept and not decoded again;
    ``on_batch(done)`` is called after each batch with every sequence made so far (to save progress). The batches
    are the same whatever was done before, so a resumed run makes the same sequences as an uninterrupted one."""
    prompts = [chat_ids(tokenizer, text) for text in instructions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    made: dict[int, list[int]] = dict(done or {})
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    todo = [idx for idx in batches if any(i not in made for i in idx)]
    if todo:
        decode = greedy_decoder(packed, max(len(prompts[i]) for idx in todo for i in idx) + max_new_tokens + 1)
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc="answers", unit="batch",
               disable=not progress)
    for idx in todo:
        answers = decode([prompts[i] for i in idx], max_new_tokens, eos_ids)
        for i, answer in zip(idx, answers):
            made[i] = prompts[i] + answer
        if on_batch is not None:
            on_batch(made)
        bar.update()
    bar.close()
    return [made[i] for i in range(len(prompts))]


def greedy_decoder(packed, max_len: int, backend: str | None = None):
    """``decode(prompts, max_new_tokens, eos_ids)``: greedy continuations (up to and including the first EOS) of
    token-id prompts of any lengths, in one batch, by one engine over ``packed`` and a cache of ``max_len``.

    ``backend``: the engine's backend, run eagerly (nothing compiled: every batch has its own shapes); None: the
    device's default, whose products of several rows are the fast ones (on a CPU without bf16 matrix
    instructions, FBGEMM's float16 weights: about 4x torch's bf16 products there, the same numbers but for the
    order of the sums)."""
    from ..config import DecodeSettings
    from ..engine import Engine

    engine = Engine(packed, backend, max_len, graphs=False)

    def decode(prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
        settings = DecodeSettings(exit_layer=1, max_new_tokens=max_new_tokens)  # no drafting: no exit layer used
        ids = [torch.tensor(p, dtype=torch.int64, device=packed.device) for p in prompts]
        return [tokens for tokens, _ in engine.generate_batch(ids, settings, eos_ids, speculate=False)]

    return decode


def document_chunks(tokenizer, texts: list[str], chunk_tokens: int) -> list[list[int]]:
    """Tokenise documentation text and cut it into chunks of ``chunk_tokens`` ids."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n")["input_ids"])
    return [ids[i:i + chunk_tokens] for i in range(0, len(ids) - 16, chunk_tokens)]


@dataclass
class Features:
    """Per sequence: hidden [T, H] per exit layer, teacher top-k ids [T, k] and probabilities [T, k]."""
    hidden: dict[int, list[torch.Tensor]]
    top_ids: list[torch.Tensor]
    top_probs: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.top_ids)

    def subset(self, indices: list[int]) -> "Features":
        return Features({l: [h[i] for i in indices] for l, h in self.hidden.items()},
                        [self.top_ids[i] for i in indices], [self.top_probs[i] for i in indices])


@torch.no_grad()
def teacher_features(packed, sequences: list[list[int]], exit_layers: list[int], top_k: int, batch_size: int,
                     progress: bool = True, backend: str | None = None) -> Features:
    """Run the full model (``packed``) over each sequence once (right-padded batches of similar lengths, so
    padding never reaches real positions) and keep what distillation needs. The engine's ``forward_states`` over
    ``backend`` (None: the device's default, as ``greedy_decoder``; eager) computes it; in float32 it matches HF's
    forward (tests)."""
    from ..engine import Engine

    hidden: dict[int, list] = {l: [None] * len(sequences) for l in exit_layers}
    top_ids: list = [None] * len(sequences)
    top_probs: list = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    engine = Engine(packed, backend, max(len(s) for s in sequences), graphs=False)
    for start in tqdm(range(0, len(order), batch_size), desc="teacher", disable=not progress):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.int64)
        for row, i in enumerate(idx):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
        states, logits = engine.forward_states(ids.to(packed.device), exit_layers)
        probs, top = logits.softmax(-1).topk(top_k, dim=-1)
        for row, i in enumerate(idx):
            n = len(sequences[i])
            for l in exit_layers:
                hidden[l][i] = states[l][row, :n].to(torch.bfloat16).cpu()
            top_ids[i] = top[row, :n].to(torch.int32).cpu()
            top_probs[i] = probs[row, :n].to(torch.float16).cpu()
    return Features(hidden, top_ids, top_probs)


def frequent_tokens(features: Features, size: int, vocab_size: int, always: set[int]) -> torch.Tensor:
    """The ``size`` most frequent teacher top-1 tokens (ties by id), plus ``always`` (e.g. EOS), sorted."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in features.top_ids:
        counts += torch.bincount(ids[:, 0].long(), minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))
    chosen = set(order[:size]) | set(always)
    return torch.tensor(sorted(chosen), dtype=torch.int64)

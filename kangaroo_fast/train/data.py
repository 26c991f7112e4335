"""Offline training data for the adapter: the base model's own greedy answers to instructions the project
writes or to requests the model samples itself (``sample_requests``), plus local documentation text, and the
teacher features the adapter learns from.

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


#: How the model samples its own requests (``sample_requests``); the sampled stage's cache key holds these.
REQUEST_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 96, "min_words": 3}


def request_prefix(tokenizer) -> list[int]:
    """The chat template's ids up to where a user's message begins (the system turn and the user header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("sampling requests needs a tokenizer with a chat template (the user turn's header)")
    marker = "\x00request\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return list(tokenizer(text[:text.index(marker)], add_special_tokens=False)["input_ids"])


@torch.no_grad()
def sample_requests(packed, tokenizer, n: int, batch_size: int, eos_ids: set[int], seed: int,
                    keep: Callable[[str], bool] = lambda text: True, progress: bool = True,
                    done: list[list[str]] | None = None,
                    on_batch: Callable[[list[list[str]]], None] | None = None) -> list[str]:
    """``n`` distinct user requests the model writes itself, as Magpie does (arXiv 2406.08464): from the chat
    template's header of a user turn, sampled (``REQUEST_SAMPLING``) until the turn ends. Kept: requests that end
    within ``max_tokens``, have at least ``min_words`` words, are new, and pass ``keep`` (the benchmark filter).

    Batch b samples ``batch_size`` rows from a generator seeded by (seed, b), so the result is deterministic for a
    seed; ``done`` holds the raw texts of batches already sampled (``on_batch(done)`` is called after each), which
    a resumed run replays instead of sampling again."""
    from ..config import DecodeSettings
    from ..engine import Engine

    if n < 0 or batch_size < 1:
        raise ValueError(f"n={n!r} must be >= 0 and batch_size={batch_size!r} >= 1")
    cfg = REQUEST_SAMPLING
    prefix = torch.tensor(request_prefix(tokenizer), dtype=torch.int64, device=packed.device)
    settings = DecodeSettings(exit_layer=1, max_new_tokens=cfg["max_tokens"], temperature=cfg["temperature"],
                              top_p=cfg["top_p"])
    batches = list(done or [])
    engine = None
    kept: list[str] = []
    seen: set[str] = set()
    most = 20 * (n // batch_size + 1)  # a model that seldom ends its turn would otherwise loop for ever
    bar = tqdm(total=n, desc="requests", unit="request", disable=not progress)
    b = 0
    while len(kept) < n:
        if b == len(batches):
            if b >= most:
                raise ValueError(f"only {len(kept)} of {n} requests kept after {b} batches of {batch_size}")
            if engine is None:
                engine = Engine(packed, None, len(prefix) + cfg["max_tokens"] + 1, graphs=False)
            generator = torch.Generator(device=packed.device).manual_seed(seed * 1_000_003 + b)
            rows = engine.generate_batch([prefix] * batch_size, settings, eos_ids, speculate=False,
                                         generator=generator)
            batches.append([tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip()
                            if tokens and tokens[-1] in eos_ids else "" for tokens, _ in rows])
            if on_batch is not None:
                on_batch(batches)
        for text in batches[b]:
            if (len(kept) < n and text and len(text.split()) >= cfg["min_words"] and text not in seen
                    and keep(text)):
                seen.add(text)
                kept.append(text)
                bar.update()
        b += 1
    bar.close()
    return kept


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
def forward_states(engine, ids: torch.Tensor, layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``engine``'s full model over token ids [B, T] (every row from position 0; the adapter unused, the cache
    overwritten): the hidden states after each of ``layers`` layers ({layer: [B, T, H]}) and the logits
    [B, T, V] in float32. How training reads its teacher (``teacher_features``)."""
    batch, t = ids.shape
    if t > engine.max_len:
        raise ValueError(f"{t} tokens do not fit the cache of {engine.max_len} positions")
    if batch > engine.cache.batch:
        engine._allocate(batch, engine.max_len, engine.shallow_states.shape[1] - 1)
    engine._reset(batch)
    x, done, states = engine.ops.embed(ids, engine.w.embed), 0, {}
    for layer in sorted(set(layers)):
        x = engine._layers(x, 0, done, layer)
        states[layer], done = x, layer
    x = engine._layers(x, 0, done, engine.cfg.num_layers)
    w = engine._weights(x)[0]
    logits = engine.ops.linear(engine.ops.rms_norm(x, w.final_norm, engine.cfg.rms_norm_eps), w.lm_head)
    return states, logits.float()


@torch.no_grad()
def teacher_features(packed, sequences: list[list[int]], exit_layers: list[int], top_k: int, batch_size: int,
                     progress: bool = True, backend: str | None = None) -> Features:
    """Run the full model (``packed``) over each sequence once (right-padded batches of similar lengths, so
    padding never reaches real positions) and keep what distillation needs. ``forward_states`` on an engine over
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
        states, logits = forward_states(engine, ids.to(packed.device), exit_layers)
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

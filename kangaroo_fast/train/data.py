"""Offline training data for the adapter: the base model's own greedy answers to instructions the project
writes, plus local documentation text, and the teacher features the adapter learns from.

Features per sequence: the hidden states after ``exit_layer`` layers (the adapter's input) and the full model's
next-token distribution, kept as its top-k (ids and probabilities) to save memory.
"""
from __future__ import annotations

from dataclasses import dataclass

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
                     eos_ids: set[int], progress: bool = True) -> list[list[int]]:
    """Prompt + greedy answer token ids for every instruction, decoded in batches of similar prompt lengths.

    A lean batched greedy decoder over the packed weights (``packed`` from ``models.pack_model``): prompts are
    left-padded to a common width, so every row writes its keys/values at the same cache index and only the
    attention mask (keys before a row's padding end are hidden) differs per row. Positions are cache indices: RoPE
    depends only on position differences, so this is the same maths as HF's per-row position ids (float32 output
    equals HF greedy, tests/test_train_data.py). It reads the grouped K/V in place, where HF ``generate`` on CPU
    copies them on every step, and runs about twice as fast here. In bf16 a row may part from HF's greedy text
    where rounding differs; for training data that does not matter.
    """
    prompts = [chat_ids(tokenizer, text) for text in instructions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="answers", disable=not progress):
        idx = order[start:start + batch_size]
        answers = batched_greedy(packed, [prompts[i] for i in idx], max_new_tokens, eos_ids)
        for i, answer in zip(idx, answers):
            out[i] = prompts[i] + answer
    return out  # type: ignore[return-value]


def batched_greedy(packed, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """Greedy continuations (up to and including the first EOS) of token-id prompts of any lengths, in one batch."""
    from ..backend.torch_ref import TorchBackend as ops

    c = packed.config
    bsz, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    device, dtype = packed.device, packed.dtype
    ids = torch.zeros((bsz, width), dtype=torch.int64, device=device)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
    shape = (bsz, c.num_kv_heads, total, c.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(c.num_layers)]
    cos, sin = packed.rope_cos[:total].to(dtype), packed.rope_sin[:total].to(dtype)
    key_pos = torch.arange(total, device=device)
    groups = c.num_heads // c.num_kv_heads

    def forward(x, first: int) -> torch.Tensor:
        t = x.shape[1]
        q_pos = torch.arange(first, first + t, device=device)
        # [B, T, S]: a key is visible when it is not padding, not in the future, and inside the window; a padding
        # query sees itself only, so no row of the softmax is empty (its output is never read)
        keys = key_pos[None, None, :first + t]
        visible = ((keys >= pad[:, None, None]) | (keys == q_pos[None, :, None])) & (keys <= q_pos[None, :, None])
        for i, w in enumerate(packed.layers):
            mask = visible
            window = c.layer_windows[i]
            if window is not None:
                mask = mask & (keys > q_pos[None, :, None] - window)
            k_cache, v_cache = caches[i]
            qkv = ops.linear(ops.rms_norm(x, w.input_norm, c.rms_norm_eps), w.w_qkv, w.b_qkv)
            q = ops.rope_cache_write(qkv, cos[first:first + t], sin[first:first + t], k_cache, v_cache, first,
                                     c.num_heads, c.num_kv_heads)
            # grouped attention without copying K/V: [B, Hkv, G*T, D] queries against [B, Hkv, S, D] keys
            qg = q.reshape(bsz, c.num_kv_heads, groups * t, c.head_dim)
            k, v = k_cache[:, :, :first + t], v_cache[:, :, :first + t]
            scores = (qg @ k.transpose(-1, -2)).float() * c.head_dim ** -0.5
            scores = scores.view(bsz, c.num_kv_heads, groups, t, -1).masked_fill(~mask[:, None, None], float("-inf"))
            probs = scores.softmax(-1).to(dtype).view(bsz, c.num_kv_heads, groups * t, -1)
            attn = (probs @ v).view(bsz, c.num_heads, t, c.head_dim).transpose(1, 2).reshape(bsz, t, -1)
            x = x + ops.linear(attn, w.w_o)
            x = x + ops.mlp(ops.rms_norm(x, w.post_norm, c.rms_norm_eps), w.w_gate_up, w.w_down)
        return ops.verify_head(x[:, -1:], packed.final_norm, c.rms_norm_eps, packed.lm_head)[:, 0]

    token = forward(ops.embed(ids, packed.embed), 0)
    answers = [[] for _ in prompts]
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        for row in (~done).nonzero()[:, 0].tolist():
            answers[row].append(int(token[row]))
        done |= torch.isin(token, eos)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        token = forward(ops.embed(token[:, None], packed.embed), width + step)
    return answers


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
def teacher_features(hf_model, sequences: list[list[int]], exit_layers: list[int], top_k: int, batch_size: int,
                     progress: bool = True) -> Features:
    """Run the full model over each sequence once (right-padded batches, so padding never reaches real
    positions) and keep what distillation needs."""
    device = next(hf_model.parameters()).device
    hidden: dict[int, list] = {l: [None] * len(sequences) for l in exit_layers}
    top_ids: list = [None] * len(sequences)
    top_probs: list = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="teacher", disable=not progress):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.int64)
        for row, i in enumerate(idx):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
        out = hf_model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
        probs, top = out.logits.float().softmax(-1).topk(top_k, dim=-1)
        for row, i in enumerate(idx):
            n = len(sequences[i])
            for l in exit_layers:
                hidden[l][i] = out.hidden_states[l][row, :n].to(torch.bfloat16).cpu()
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

"""How fast the training data is made here: the batched greedy answers and the teacher pass, on the engine's
default eager backend against the plain torch backend and HF's forward (what training used before).

    python bench/train_data_speed.py [--batch 64] [--new-tokens 17] [--teacher-seqs 16] [--teacher-len 300]

Answers: one batch of short chat prompts decoded for 1 and for ``--new-tokens`` tokens; the difference gives the
seconds per decode step of the whole batch (the prefill cancels out). Teacher: ``teacher_features`` (exit layers
2 and 4, top-32) over random sequences against HF's forward with ``output_hidden_states`` on the same batches.
Prints one JSON line per measurement; timings are one run each on a quiet machine, so compare them as ratios.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--teacher-seqs", type=int, default=16)
    parser.add_argument("--teacher-len", type=int, default=300)
    args = parser.parse_args(argv)

    from kangaroo_fast.models import load_hf, pack_model
    from kangaroo_fast.backend import default_backend_name
    from kangaroo_fast.train.data import chat_ids, greedy_decoder, teacher_features

    dtype = getattr(torch, args.dtype)
    hf, tokenizer = load_hf(None, dtype=dtype, device="cpu")
    packed = pack_model(hf)
    prompts = [chat_ids(tokenizer, f"Write a long story about the number {i}.") for i in range(args.batch)]
    default = default_backend_name(packed.device, packed.dtype)
    for backend in (default, "torch"):
        decode = greedy_decoder(packed, max(map(len, prompts)) + args.new_tokens + 1, backend=backend)
        decode(prompts[:2], 2, set())  # warm-up
        seconds = {}
        for n in (1, args.new_tokens):
            start = time.perf_counter()
            decode(prompts, n, set())
            seconds[n] = time.perf_counter() - start
        step = (seconds[args.new_tokens] - seconds[1]) / (args.new_tokens - 1)
        print(json.dumps({"answers": backend, "dtype": args.dtype, "batch": args.batch,
                          "prefill_s": round(seconds[1], 2), "decode_step_s": round(step, 3),
                          "decode_tokens_per_s": round(args.batch / step, 1)}))

    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(100, packed.config.vocab_size, (args.teacher_len,), generator=gen).tolist()
                 for _ in range(args.teacher_seqs)]
    tokens = args.teacher_seqs * args.teacher_len
    teacher_features(packed, sequences[:2], [2, 4], 32, 8, progress=False)  # warm-up
    start = time.perf_counter()
    teacher_features(packed, sequences, [2, 4], 32, 8, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"teacher": f"engine ({default})", "tokens_per_s": round(tokens / seconds, 1)}))
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(sequences), 8):
            out = hf(input_ids=torch.tensor(sequences[first:first + 8]), output_hidden_states=True, use_cache=False)
            out.logits.float().softmax(-1).topk(32, dim=-1)
    seconds = time.perf_counter() - start
    print(json.dumps({"teacher": "HF forward", "tokens_per_s": round(tokens / seconds, 1)}))


if __name__ == "__main__":
    main()

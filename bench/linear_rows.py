"""How the cost of a matrix product grows with its rows on this CPU: the embedded model's products (a layer's qkv,
o, gate/up and down, and the LM head) timed at 1, 2, 4 and 8 rows, in bfloat16 and float32, eagerly through
``F.linear``; oneDNN's packed bf16 path too where this CPU has it, and elsewhere the inductor backend's two paths for
products of several rows: FBGEMM's float16 copy of the weight (``backend/fbgemm.py``, where FBGEMM exists) and the
widened one (bf16 rows times a float32 copy of the weight packed for oneDNN, ``InductorBackend.product_dtype``).

    python bench/linear_rows.py [--rows 1 2 4 8] [--repeats 30]

A verification of T tokens runs every product at T rows. Speculation pays only where T rows cost much less than T
single rows: on CPUs with bf16 dot products (AVX512-BF16, AMX) a product at 8 rows costs little more than at one,
while on AVX2 torch's bf16 products cost about T times one row, so a verification costs about as many vanilla steps
as it verifies tokens; the float16 and widened products cost much less than that at several rows. One weight is
timed at a time, so the smaller ones stay in cache: in a decode step the weights stream from memory, where a
float32 copy reads twice the bytes (the reason one-row steps keep the bf16 weights). Prints milliseconds per call,
and each row count's cost over one row's; compare within one run only.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from step_breakdown import _ms  # the same timing loop (bench/ is on the path when run as a script)


def shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of the embedded SmolLM2-135M's products (its config, from the converted copy in the user cache)."""
    from transformers import AutoConfig

    from kangaroo_fast.models import default_model_dir

    c = AutoConfig.from_pretrained(default_model_dir())
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    qkv = h + 2 * c.num_key_value_heads * (h // c.num_attention_heads)
    return {"qkv": (qkv, h), "o": (h, h), "gate/up": (2 * i, h), "down": (h, i), "LM head": (v, h)}


def timings(rows: list[int], repeats: int) -> list[dict]:
    from kangaroo_fast.backend.fbgemm import fp16_linear, fp16_products_available
    from kangaroo_fast.backend.cpu import onednn_available
    from kangaroo_fast.backend.onednn import OneDNNBackend, packed_linear

    bf16, f32 = torch.bfloat16, torch.float32
    paths = [("bfloat16", bf16, bf16, F.linear), ("float32", f32, f32, F.linear)]
    if onednn_available():
        paths.insert(1, ("bfloat16 oneDNN packed", bf16, bf16, OneDNNBackend.linear))
    else:
        paths.insert(1, ("bfloat16 on a float32 copy, packed", bf16, f32, packed_linear))
        if fp16_products_available():
            paths.insert(1, ("bfloat16 on FBGEMM's float16 copy", bf16, bf16, fp16_linear))
    out = []
    for name, (n_out, n_in) in shapes().items():
        for label, x_dtype, w_dtype, linear in paths:
            w = torch.randn(n_out, n_in, dtype=w_dtype) * n_in ** -0.5
            ms = {}
            for r in rows:
                x = torch.randn(r, n_in, dtype=x_dtype)
                ms[r] = _ms(lambda: linear(x, w), repeats)
            out.append({"product": name, "shape": [n_out, n_in], "path": label, "ms": ms})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="row counts (default: 1 2 4 8)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per point (default: 30)")
    args = parser.parse_args()
    if sorted(set(args.rows)) != args.rows or args.rows[0] < 1:
        parser.error(f"--rows must rise from 1 or more without repeats, not {args.rows}")
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print("| product | path | " + " | ".join(f"{r} rows ms (x{args.rows[0]})" for r in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    with torch.no_grad():
        for row in timings(args.rows, args.repeats):
            base = row["ms"][args.rows[0]]
            cells = [f"{ms:.3f} ({ms / base:.2f})" for ms in row["ms"].values()]
            print(f"| {row['product']} {tuple(row['shape'])} | {row['path']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

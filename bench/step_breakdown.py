"""Where a vanilla decode step of the embedded model goes: the whole step against its matrix products and its
attention calls alone, each timed on the engine's own backend and cache (batch 1, bfloat16 by default).

    python bench/step_breakdown.py [--context 300] [--repeats 80] [--dtype bfloat16]

Prints milliseconds per step for: the step (all layers and the LM head, as the engine runs it without drafting),
its products alone (every layer's qkv, o, gate/up and down, and the LM head, through ``ops.linear``), its attention
alone (one query over ``context`` cached positions per layer, through ``ops.attention``), and the rest (the
difference: norms, RoPE, cache writes, residuals, dispatch). A diagnostic for issue 13's "a step within 1.3x the
time of its matrix products"; compare ratios from one run only.
"""
from __future__ import annotations

import argparse
import time

import torch


def _ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def breakdown(context: int, repeats: int, dtype: str) -> dict[str, float]:
    import kangaroo_fast as kf
    from kangaroo_fast.engine import RoundDrafts
    from kangaroo_fast.config import DecodeSettings

    model = kf.load(dtype=getattr(torch, dtype))
    engine, c = model.engine, model.config
    ops, layers = engine.ops, engine.w.layers
    engine.cache.reset(1)
    settings = DecodeSettings(exit_layer=1)
    x = torch.randn(1, 1, c.hidden_size, dtype=engine.w.dtype)
    hidden = torch.randn(1, 1, c.intermediate_size, dtype=engine.w.dtype)
    q = torch.randn(1, c.num_heads, 1, c.head_dim, dtype=engine.w.dtype)

    def step():
        engine.verify(RoundDrafts.start([11], [context], None), 0, settings)

    def products():
        for w in layers:
            ops.linear(x, w.w_qkv)
            ops.linear(x, w.w_o)
            ops.linear(x, w.w_gate_up)
            ops.linear(hidden, w.w_down)
        ops.linear(x, engine.w.lm_head)

    def attention():
        for i in range(c.num_layers):
            k_cache, v_cache = engine.cache.layer(i)
            ops.attention(q, k_cache, v_cache, context, c.layer_windows[i])

    with torch.no_grad():
        times = {"step": _ms(step, repeats), "products": _ms(products, repeats),
                 "attention": _ms(attention, repeats)}
    times["rest"] = times["step"] - times["products"] - times["attention"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300, help="cached positions before the step (default: 300)")
    parser.add_argument("--repeats", type=int, default=80, help="timed steps (default: 80)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: bfloat16)")
    args = parser.parse_args()
    times = breakdown(args.context, args.repeats, args.dtype)
    for name, ms in times.items():
        print(f"{name:>10}: {ms:6.2f} ms  ({ms / times['products']:.2f}x the products)")


if __name__ == "__main__":
    main()

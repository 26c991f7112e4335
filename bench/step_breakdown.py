"""Where a decode step of the embedded model goes: the whole step against its matrix products and its attention
calls alone, each timed on the engine's own backend and cache (batch 1, bfloat16 by default).

    python bench/step_breakdown.py [--context 300] [--repeats 80] [--dtype bfloat16] [--backend onednn inductor]
                                   [--cache-dtype default model float32] [--verify-widths 1 2 3 5]

Prints milliseconds per step, per backend, for: the vanilla step (all layers and the LM head, as the engine runs it
without drafting), its products alone (every layer's qkv, o, gate/up and down, and the LM head, through
``ops.linear`` on oneDNN's packed weights), its attention alone (one query over ``context`` cached positions per
layer, through ``ops.attention``, eagerly, with a [1] tensor start where the compiled steps call it so), and the
rest (the difference: norms, RoPE, cache writes, residuals, dispatch);
then the draft step (layers 0..l-1, the adapter and the draft head in one step, as the engine's greedy drafting runs
them: ``DecodeSteps.draft``) against its own products (those layers', the adapter's and the draft head's). With the
inductor backend the steps are the compiled ones (compiled before the timing). Each time is the median of blocks
interleaved with those it is compared to (the draft step's blocks hold four times ``--repeats`` calls in all);
"draft 2 steps" is the same draft step run as the shallow step and then the head step. A diagnostic for issue 13's
"a draft step within 1.3x the time of its matrix products"; compare ratios from one run only. ``--verify-widths``
also times Kangaroo's verification of T positions (the last token and T - 1 drafts through layers l..L-1, the LM
head and the acceptance: ``Engine.verify`` from the exit layer) against the vanilla step, interleaved: the other
half of what a draft costs (issue 12). ``--cache-dtype`` times each backend with its KV caches in the
backend's choice (``default``: ``cache_dtype``), the model's dtype, or float32.
"""
from __future__ import annotations

import argparse
import time

import torch


def _ms(fn, repeats: int, blocks: int = 9) -> float:
    """Milliseconds per call of ``fn`` (``_interleaved_ms`` of it alone)."""
    return _interleaved_ms({"": fn}, repeats, blocks)[""]


def _interleaved_ms(fns: dict, repeats: int, blocks: int = 9) -> dict[str, float]:
    """Milliseconds per call of each of ``fns``: the median over ``blocks`` blocks of ``repeats / blocks`` calls,
    the functions' blocks interleaved (a noisy machine's slow spells fall on all of them, and into few blocks)."""
    per_block = max(1, repeats // blocks)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            times[name].append((time.perf_counter() - start) / per_block * 1000)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def breakdown(context: int, repeats: int, dtype: str, backend: str | None = None,
              cache_dtype: str = "default", verify_widths: tuple[int, ...] = ()) -> dict[str, float]:
    import kangaroo_fast as kf
    from kangaroo_fast.backend import default_backend_name, get_backend
    from kangaroo_fast.config import DecodeSettings
    from kangaroo_fast.engine import RoundDrafts

    ops = get_backend(backend or default_backend_name("cpu", getattr(torch, dtype)))
    if cache_dtype != "default":
        forced = getattr(torch, dtype) if cache_dtype == "model" else getattr(torch, cache_dtype)
        ops.cache_dtype = lambda _dtype, _device: forced
    model = kf.load(dtype=getattr(torch, dtype), backend=ops)
    engine, c = model.engine, model.config
    ops, layers = engine.ops, engine.w.layers
    exit_layer = model.default_settings()["exit_layer"]
    model.warm_up()
    engine.cache.reset(1)
    settings = DecodeSettings(exit_layer=1)
    x = torch.randn(1, 1, c.hidden_size, dtype=engine.w.dtype)
    hidden = torch.randn(1, 1, c.intermediate_size, dtype=engine.w.dtype)
    q = torch.randn(1, c.num_heads, 1, c.head_dim, dtype=engine.w.dtype)
    token = torch.tensor([[11]])

    def step():
        engine.verify(RoundDrafts.start([11], [context], None), 0, settings)

    def layer_products(selected):
        for w in selected:
            ops.linear(x, w.w_qkv)
            ops.linear(x, w.w_o)
            ops.linear(x, w.w_gate_up)
            ops.linear(hidden, w.w_down)

    def products():
        layer_products(layers)
        ops.linear(x, engine.w.lm_head)

    start = torch.tensor([context]) if engine.steps.mode == "compile" else context  # as the steps call it

    def attention():
        for i in range(c.num_layers):
            k_cache, v_cache = engine.cache.layer(i)
            ops.attention(q, k_cache, v_cache, start, c.layer_windows[i], context + 1)

    def draft_step():  # as a greedy draft step runs: one step (``DecodeSteps.draft``)
        engine.steps.draft(token, [context], exit_layer)

    def draft_two_steps():  # the same as two steps (how a draft step after a copied span runs)
        _h, out = engine.steps.shallow(token, [context], exit_layer, True)
        engine.steps.head(out[:, -1])

    def verify(width: int):  # Kangaroo's verification of the last token and width - 1 drafts (random states)
        rnd = RoundDrafts.start([11], [context], None)
        rnd.tokens[0] = [11] * (width - 1)
        return lambda: engine.verify(rnd, exit_layer, settings)

    def draft_products():
        layer_products(layers[:exit_layer])
        ops.linear(x, engine.a.qkv)
        ops.linear(x, engine.a.o)
        ops.linear(x[:, 0], engine.a.head)

    with torch.no_grad():
        times = _interleaved_ms({"step": step, "products": products, "attention": attention}, repeats)
        times["rest"] = times["step"] - times["products"] - times["attention"]
        if model.adapter is not None:
            times.update(_interleaved_ms({"draft step": draft_step, "draft 2 steps": draft_two_steps,
                              "draft products": draft_products}, repeats * 4))
            if verify_widths:
                widths = {f"verify {w}": verify(w) for w in verify_widths}
                times.update(_interleaved_ms({"vanilla step": step, **widths}, repeats * 2))
    times["cache dtype"] = str(engine.cache.k.dtype).removeprefix("torch.")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300, help="cached positions before the step (default: 300)")
    parser.add_argument("--repeats", type=int, default=80, help="timed steps (default: 80)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: bfloat16)")
    parser.add_argument("--backend", nargs="+", default=[None],
                        help="backends to time one after the other (default: the device's default for the dtype)")
    parser.add_argument("--cache-dtype", nargs="+", default=["default"], choices=["default", "model", "float32"],
                        help="KV cache dtypes to time each backend with (default: the backend's choice)")
    parser.add_argument("--verify-widths", type=int, nargs="*", default=[],
                        help="also time the verification of this many positions from the exit layer (e.g. 1 2 3 5)")
    args = parser.parse_args()
    bad = [w for w in args.verify_widths if w < 1]
    if bad:
        parser.error(f"--verify-widths {bad[0]} must be >= 1")
    for backend in args.backend:
        for cache_dtype in args.cache_dtype:
            times = breakdown(args.context, args.repeats, args.dtype, backend, cache_dtype,
                              tuple(args.verify_widths))
            cached = times.pop("cache dtype")
            print(f"-- backend {backend or 'default'}, context {args.context}, {args.dtype}, KV cache {cached}")
            for name, ms in times.items():
                if name.startswith("verify") or name == "vanilla step":
                    print(f"{name:>15}: {ms:6.2f} ms  ({ms / times['vanilla step']:.2f}x the vanilla step)")
                    continue
                base = times["draft products"] if name.startswith("draft") else times["products"]
                print(f"{name:>15}: {ms:6.2f} ms  ({ms / base:.2f}x the products)")


if __name__ == "__main__":
    main()

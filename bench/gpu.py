"""GPU kernel benchmark: every Triton kernel against its PyTorch reference at real model shapes, in achieved GB/s
against the measured copy bandwidth of the device. Writes one JSON with the machine, versions, commit and cases.

    python bench/gpu.py --output bench/results/gpu.json [--models smollm2-135m vicuna-7b] [--dtype bfloat16]
                        [--context 2048]

Then the decode steps as the engine replays them, in CUDA graphs over random weights: a draft step (one
proposal: layers 0..l-1, the adapter and the draft head) and a verification step (layers l..L-1 and the LM head over
7 rows), each against its bytes floor (the weights and caches it must read once, at the measured copy bandwidth).
Last, the end-to-end greedy decode of the embedded model on CUDA in float32 against HF ``generate`` (skipped, with
the reason recorded, where the model cannot be loaded: pass --e2e-model DIR with a local copy).

Without a CUDA device (or with --plan) nothing is timed: the JSON lists the cases that would run, with
"timed": false, so CI checks the case list, the byte counts and the writer.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Case:
    kernel: str
    model: str
    rows: int
    shapes: dict
    bytes_moved: int
    run: Callable[[], object] = field(repr=False, default=None)
    reference: Callable[[], object] = field(repr=False, default=None)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cases(models: list[str], dtype: torch.dtype, context: int, device: str) -> list[Case]:
    """One case per (model, kernel, rows): the decode shapes of a draft step (1 row) and a verification (7 rows).

    The cache holds ``context`` positions and the queries sit at its end, so attention reads all of it. Bytes moved
    count every tensor a kernel touches once (weights dominate; the caches for attention)."""
    from kangaroo_fast.kernels import (decode_attention as attn, draft_head as dh, qkv_rope_cache as qkv,
                                       rms_norm_linear as rnl, verify_head as vh)
    from kangaroo_fast.kernels.compile_check import MODELS

    out = []
    for name in models:
        s = MODELS[name]
        h, d, hq, hkv, inter = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["intermediate"]

        def empty(*shape, dt=dtype):
            return torch.randn(*shape, device=device).to(dt) if device != "meta" else \
                torch.empty(*shape, dtype=dt, device="meta")

        for rows in (1, 7):
            x, norm = empty(1, rows, h), empty(h)
            w_qkv, w_o = empty((hq + 2 * hkv) * d, h), empty(h, hq * d)
            w_gate_up, w_down = empty(2 * inter, h), empty(h, inter)
            cos, sin = empty(context, d), empty(context, d)
            k_cache, v_cache = empty(1, hkv, context, d), empty(1, hkv, context, d)
            start = torch.full((1,), context - rows, dtype=torch.int64, device=device)
            q, attn_out = empty(1, rows, hq, d), empty(1, rows, hq, d)
            hidden, gate_up_out = empty(rows, h), empty(rows, inter)
            attn_rows = empty(rows, hq * d)
            out += [
                Case("qkv_rope_cache", name, rows, {"K": h, "N": w_qkv.shape[0]},
                     _nbytes(x, w_qkv, q) + 2 * rows * hkv * d * x.element_size(),
                     lambda x=x, w=w_qkv, n=norm, c=cos, s_=sin, st=start, q=q, k=k_cache, v=v_cache:
                     qkv.qkv_rope_cache(x, w, None, n, 1e-6, c, s_, st, q, k, v),
                     lambda x=x, w=w_qkv, n=norm, c=cos, s_=sin, st=start, k=k_cache, v=v_cache:
                     qkv.qkv_rope_cache_reference(x, w, None, n, 1e-6, c, s_, st, k, v)),
                Case("decode_attention", name, rows, {"heads": hq, "kv_heads": hkv, "D": d, "context": context},
                     _nbytes(q, k_cache, v_cache, attn_out),
                     lambda q=q, k=k_cache, v=v_cache, st=start, o=attn_out: attn.decode_attention(q, k, v, st, o),
                     lambda q=q, k=k_cache, v=v_cache, st=start: attn.decode_attention_reference(q, k, v, st)),
                Case("o_proj_residual", name, rows, {"K": hq * d, "N": h}, _nbytes(attn_rows, w_o, hidden, hidden),
                     lambda a=attn_rows, w=w_o, r=hidden: rnl.rms_norm_linear(a, w, r, residual=r),
                     lambda a=attn_rows, w=w_o, r=hidden: rnl.rms_norm_linear_reference(a, w, residual=r)),
                Case("norm_gate_up_silu", name, rows, {"K": h, "N": 2 * inter},
                     _nbytes(hidden, w_gate_up, gate_up_out),
                     lambda x=hidden, w=w_gate_up, o=gate_up_out, n=norm:
                     rnl.rms_norm_linear(x, w, o, n, gate_up=True),
                     lambda x=hidden, w=w_gate_up, n=norm: rnl.rms_norm_linear_reference(x, w, n, gate_up=True)),
                Case("down_residual", name, rows, {"K": inter, "N": h}, _nbytes(gate_up_out, w_down, hidden, hidden),
                     lambda x=gate_up_out, w=w_down, r=hidden: rnl.rms_norm_linear(x, w, r, residual=r),
                     lambda x=gate_up_out, w=w_down, r=hidden: rnl.rms_norm_linear_reference(x, w, residual=r)),
            ]
            if rows == 1:
                head = empty(s["draft_vocab"], h)
                token = torch.empty(1, dtype=torch.int64, device=device)
                prob = torch.empty(1, dtype=torch.float32, device=device)
                keep = torch.empty(1, dtype=torch.bool, device=device)
                x1 = hidden[:1]
                out.append(Case("draft_head", name, 1, {"K": h, "V": head.shape[0]}, _nbytes(x1, head),
                                lambda x=x1, n=norm, w=head, t=token, p=prob, k=keep:
                                dh.draft_head(x, n, 1e-6, w, None, 0.5, t, p, k),
                                lambda x=x1, n=norm, w=head: dh.draft_head_reference(x, n, 1e-6, w, None, 0.5)))
            else:
                head = empty(s["vocab"], h)
                targets = torch.empty(1, rows, dtype=torch.int64, device=device)
                drafts = torch.zeros(1, rows - 1, dtype=torch.int64, device=device)
                accepted = torch.empty(1, dtype=torch.int64, device=device)
                bonus = torch.empty(1, dtype=torch.int64, device=device)
                out.append(Case("verify_head", name, rows, {"K": h, "V": head.shape[0]}, _nbytes(x, head),
                                lambda x=x, n=norm, w=head, t=targets, dr=drafts, a=accepted, b=bonus:
                                vh.verify_head(x, n, 1e-6, w, t, dr, a, b),
                                lambda x=x, n=norm, w=head, dr=drafts: vh.verify_head_reference(x, n, 1e-6, w, dr)))
    return out


def _harness():
    """bench/harness.py (the microbenchmarks' random shapes and engines), importable from this script."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import harness

    return harness


def step_cases(models: list[str], dtype: torch.dtype, context: int) -> list[dict]:
    """The graphed decode steps per model with the bytes each must read at least once: weights (the draft head is
    the draft vocabulary's rows) and the cached keys/values of ``context`` positions per layer it runs."""
    harness = _harness()
    size = torch.empty((), dtype=dtype).element_size()
    out = []
    for name in models:
        s = harness.shapes(torch.device("cuda"))[name]
        cfg = s.config()
        layer = (cfg.qkv_size * s.hidden + s.hidden * cfg.q_size + 3 * s.intermediate * s.hidden + 2 * s.hidden) * size
        kv = 2 * context * cfg.kv_size * size
        adapter = (cfg.qkv_size * s.hidden + s.hidden * cfg.q_size + 2 * s.hidden) * size
        draft_head = (s.draft_vocab or s.vocab) * s.hidden * size
        l, n = harness.EXIT_LAYER, s.model_layers
        out.append({"step": "draft", "model": name, "rows": 1, "layers": l,
                    "bytes_floor": l * (layer + kv) + adapter + kv + draft_head})
        out.append({"step": "verify", "model": name, "rows": harness.VERIFY_TOKENS, "layers": n - l,
                    "bytes_floor": (n - l) * (layer + kv) + s.vocab * s.hidden * size})
    return out


def time_steps(rows: list[dict], dtype: torch.dtype, context: int, peak_gbs: float) -> None:
    """Capture and replay each step at ``context`` cached positions; add its time and its ratio to the floor."""
    from triton.testing import do_bench

    harness = _harness()
    device = torch.device("cuda")
    harness.CONTEXT = context  # the engine's caches hold ``context`` positions before the step
    for model in sorted({r["model"] for r in rows}):
        engine = harness.random_engine(harness.shapes(device)[model], "triton", dtype, device)
        steps = engine.steps  # captured on first use: the triton backend on CUDA
        l = harness.EXIT_LAYER
        token = torch.full((1, 1), 11, dtype=torch.int64, device=device)
        t = harness.VERIFY_TOKENS
        states = torch.randn(1, t, engine.cfg.hidden_size, device=device).to(dtype)
        drafts = torch.full((1, t - 1), 11, dtype=torch.int64, device=device)

        def draft(steps=steps):  # one draft step: the shallow layers and the adapter on one token, then the head
            return steps.draft(token, [context], l)

        run = {"draft": draft, "verify": lambda steps=steps: steps.verify(states, drafts, [context], l)}
        for row in rows:
            if row["model"] == model:
                ms = do_bench(run[row["step"]])
                floor_ms = row["bytes_floor"] / peak_gbs / 1e6
                row.update(graph_ms=ms, floor_ms=floor_ms, ratio_to_floor=ms / floor_ms,
                           gbs=row["bytes_floor"] / ms / 1e6)
        del engine, steps, run, draft
        torch.cuda.empty_cache()


def end_to_end(model_dir: str | None, max_new_tokens: int = 48, prompts: int = 4) -> dict:
    """The embedded model (or ``model_dir``) on CUDA in float32, greedy, graphs on: token-identical to HF?"""
    import kangaroo_fast
    from kangaroo_fast.api import DEFAULT_ADAPTER_DIR
    from kangaroo_fast.benchmark import load_prompts

    try:
        km = kangaroo_fast.load(model_dir, dtype=torch.float32, device="cuda",
                                adapter=None if model_dir is None else DEFAULT_ADAPTER_DIR)
    except Exception as error:  # noqa: BLE001 - recorded, not hidden: the JSON says why e2e did not run
        return {"ran": False, "reason": f"{type(error).__name__}: {error}"}
    out = {"ran": True, "graph_mode": km.engine.graph_mode, "backend": km.engine.ops.name, "prompts": []}
    for sample in load_prompts()[:prompts]:
        ids = km.encode(sample.turns[0]).to("cuda")
        ids = ids if ids.ndim == 2 else ids[None]
        ours = kangaroo_fast.generate(ids, model=km, max_new_tokens=max_new_tokens)
        with torch.no_grad():
            hf = km.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
        out["prompts"].append({"id": sample.id, "same_as_hf": ours.tokens == hf,
                               "mean_accepted": ours.stats.mean_accepted, "tokens_per_s": ours.stats.tokens_per_s})
    out["all_same_as_hf"] = all(p["same_as_hf"] for p in out["prompts"])
    return out


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s: the ceiling memory-bound kernels are judged by."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    from kangaroo_fast.kernels.compile_check import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--context", type=int, default=2048, help="cached positions attention reads (>= 8)")
    parser.add_argument("--plan", action="store_true", help="list the cases without timing them")
    parser.add_argument("--e2e-model", default=None, help="local HF model directory for the end-to-end check "
                                                          "(default: the embedded model)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end check")
    args = parser.parse_args(argv)
    if args.context < 8:
        parser.error(f"--context={args.context} must be >= 8 (verification writes 7 rows at the cache's end)")
    timed = torch.cuda.is_available() and not args.plan
    if not timed and not args.plan:
        print("no CUDA device: writing the case plan only (timed: false)", file=sys.stderr)
    device = "cuda" if timed else "meta"
    dtype = DTYPES[args.dtype]
    rows = []
    peak = copy_bandwidth_gbs(device) if timed else None
    for case in cases(args.models, dtype, args.context, device):
        row = {k: v for k, v in asdict(case).items() if k not in ("run", "reference")}
        if timed:
            from triton.testing import do_bench

            kernel_ms, reference_ms = do_bench(case.run), do_bench(case.reference)
            gbs = case.bytes_moved / kernel_ms / 1e6
            row.update(kernel_ms=kernel_ms, reference_ms=reference_ms, kernel_gbs=gbs, fraction_of_copy=gbs / peak,
                       speedup_vs_reference=reference_ms / kernel_ms)
        rows.append(row)
    steps = step_cases(args.models, dtype, args.context)
    if timed:
        time_steps(steps, dtype, args.context, peak)
    e2e = None
    if timed and not args.no_e2e:
        e2e = end_to_end(args.e2e_model)
    result = {"timed": timed, "dtype": args.dtype, "context": args.context, "copy_gbs": peak,
              "machine": machine_info(), "cases": rows, "steps": steps, "end_to_end": e2e}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

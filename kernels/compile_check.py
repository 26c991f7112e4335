"""Compile every kernel for sm_80 and sm_90 without a GPU, at the block sizes the launchers really pick.

The launchers run on ``meta`` tensors of real model shapes (SmolLM2-135M, Vicuna-7B) while their kernels are
replaced by recorders; each recorded launch (signature, constexprs, num_warps) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and its cubin's resource usage read with the
``cuobjdump`` that ships with triton. A kernel fails the check when it spills (local or stack bytes > 0) or asks
for more shared memory than one block may have.

    python -m kangaroo_fast.kernels.compile_check --json out.json [--arch 80 90]

Must run without TRITON_INTERPRET (the interpreter has no compiler): tests/test_kernel_compile.py runs it in a
subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _lm_head, decode_attention, draft_head, qkv_rope_cache, rms_norm_linear, verify_head

#: shared memory one block may use (the opt-in maximum), minus the 1 KB the hardware reserves per block
SHARED_LIMIT = {80: 164 * 1024 - 1024, 90: 228 * 1024 - 1024}

#: the shapes the kernels must compile for (cache of 4096 positions, γ = 6 so verification has 7 rows)
MODELS = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                         draft_vocab=8192),
    "vicuna-7b": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000,
                      draft_vocab=32000),
}
MAX_LEN = 4096
ROWS = {"draft": 1, "verify": 7, "prefill": 64}

_KERNEL_MODULES = (rms_norm_linear, qkv_rope_cache, decode_attention, _lm_head, draft_head, verify_head)
_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
                  torch.int32: "*i32", torch.bool: "*i1"}


@dataclass
class Launch:
    kernel: str
    model: str
    case: str
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    fn: object = None


@dataclass
class Resources:
    kernel: str
    model: str
    case: str
    arch: int
    num_warps: int
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    constexprs: dict

    @property
    def problems(self) -> list[str]:
        out = []
        if self.local_bytes or self.stack_bytes:
            out.append(f"spills: {self.local_bytes} local / {self.stack_bytes} stack bytes")
        if self.shared_bytes > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared_bytes} B > {SHARED_LIMIT[self.arch]} B")
        return out


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records the launch under the
    current (model, case) label."""

    def __init__(self, fn, sink: list, label: list):
        self.fn, self.sink, self.label = fn, sink, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(_describe(self.fn, args, kwargs, *self.label))


def _describe(fn, args, kwargs, model: str, case: str) -> Launch:
    num_warps = kwargs.pop("num_warps", 4)
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot describe argument {param.name}={value!r}")
    return Launch(fn.__name__, model, case, signature, constexprs, attrs, num_warps, fn)


@contextlib.contextmanager
def _recording(sink: list, label: list):
    saved = []
    for module in _KERNEL_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, value))
    try:
        for module, name, fn in saved:
            setattr(module, name, _Recorder(fn, sink, label))
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def launches(dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """Every kernel launch of a draft step, a verification step and a prefill tile, for each model in MODELS."""
    sink: list[Launch] = []
    label = ["", ""]

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    with _recording(sink, label):
        for model, s in MODELS.items():
            h, d, hq, hkv, inter = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["intermediate"]
            for case, rows in ROWS.items():
                label[:] = [model, case]
                start = empty(1, dt=torch.int64)
                k_cache, v_cache = empty(1, hkv, MAX_LEN, d), empty(1, hkv, MAX_LEN, d)
                x = empty(1, rows, h)
                q = empty(1, rows, hq, d)
                qkv_rope_cache.qkv_rope_cache(x, empty((hq + 2 * hkv) * d, h), None, empty(h), 1e-6,
                                              empty(MAX_LEN, d), empty(MAX_LEN, d), start, q, k_cache, v_cache)
                decode_attention.decode_attention(q, k_cache, v_cache, start, empty(1, rows, hq, d))
                hidden = empty(rows, h)
                rms_norm_linear.rms_norm_linear(empty(rows, hq * d), empty(h, hq * d), hidden, residual=hidden)
                rms_norm_linear.rms_norm_linear(hidden, empty(2 * inter, h), empty(rows, inter), empty(h),
                                                gate_up=True)
                rms_norm_linear.rms_norm_linear(empty(rows, inter), empty(h, inter), hidden, residual=hidden)
                if case == "draft":
                    draft_head.draft_head(hidden, empty(h), 1e-6, empty(s["draft_vocab"], h),
                                          empty(s["draft_vocab"], dt=torch.int64), 0.5, empty(1, dt=torch.int64),
                                          empty(1, dt=torch.float32), empty(1, dt=torch.bool))
                if case == "verify":
                    verify_head.verify_head(x, empty(h), 1e-6, empty(s["vocab"], h), empty(1, rows, dt=torch.int64),
                                            empty(1, rows - 1, dt=torch.int64), empty(1, dt=torch.int64),
                                            empty(1, dt=torch.int64))
    unique, seen = [], set()
    for launch in sink:
        key = (launch.kernel, json.dumps(launch.signature, sort_keys=True), repr(sorted(launch.constexprs.items())),
               launch.num_warps)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(launch: Launch, arch: int) -> Resources:
    """Compile ``launch`` for sm_<arch> and read registers, shared, local and stack bytes from its cubin."""
    source = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return Resources(launch.kernel, launch.model, launch.case, arch, launch.num_warps, int(fields["REG"]),
                     max(int(compiled.metadata.shared), int(fields["SHARED"])), int(fields["LOCAL"]),
                     int(fields["STACK"]), {k: v for k, v in launch.constexprs.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the per-kernel resource usage")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    results = [resources(launch, arch) for arch in args.arch for launch in launches()]
    rows = [dict(asdict(r), problems=r.problems) for r in results]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"triton": triton.__version__, "shared_limit": SHARED_LIMIT, "kernels": rows},
                                    indent=1, default=str))
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(f"{r['kernel']} {r['model']}/{r['case']} sm_{r['arch']}: {'; '.join(r['problems'])}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

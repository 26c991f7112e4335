"""The one microbenchmark harness: providers, model shapes, random engine inputs, timing, GB/s and results files.

Timing: pytest-benchmark on CPU (``benchmark.pedantic``, one call per round, the round count chosen so each op
takes about ``TARGET_S`` seconds); ``triton.testing.do_bench`` on CUDA (it flushes the L2 cache between calls and
synchronises the device). Every measurement reports the median and the spread (inter-quartile range, min, max).

Providers are backends by name: ``torch`` (the reference, always) and ``triton`` when
``kangaroo_fast.backend.BACKENDS`` has it and CUDA is present; a new backend registered there plugs in by name.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kangaroo_fast import Adapter, AdapterConfig, ModelConfig
from kangaroo_fast.backend import BACKENDS, get_backend
from kangaroo_fast.benchmark import machine_info
from kangaroo_fast.engine import Engine
from kangaroo_fast.models import LayerWeights, PackedModel, default_dtype

from report import git_info  # bench/report.py: this folder is on sys.path (pytest's conftest, bench/gpu.py)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 0.4          # CPU: seconds of timed calls per op
MIN_ROUNDS, MAX_ROUNDS = 5, 200
CONTEXT = 512           # cached positions before the measured step
VERIFY_TOKENS = 7       # last + 6 drafts: a verification round at γ = 6
EXIT_LAYER = 2


@dataclass(frozen=True)
class Shape:
    """A model's dimensions; ``layers`` is how many decoder layers are built (all of them where memory and time
    allow, fewer for 7B on CPU: then the verify step runs ``layers - EXIT_LAYER`` layers, said in the results)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    model_layers: int
    draft_vocab: int | None

    def config(self) -> ModelConfig:
        return ModelConfig(model_type="llama", hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                           num_kv_heads=self.kv_heads, head_dim=self.head_dim, intermediate_size=self.intermediate,
                           vocab_size=self.vocab, rms_norm_eps=1e-5, qkv_bias=False,
                           layer_windows=(None,) * self.layers, max_position_embeddings=CONTEXT + 64)


def shapes(device: torch.device) -> dict[str, Shape]:
    """SmolLM2-135M (the embedded model, with its 8192-token draft vocabulary) and Vicuna-7B (Llama-7B shapes,
    full draft vocabulary; on CPU 3 layers: the 2 draft layers and one verified layer)."""
    big_layers = 32 if device.type == "cuda" else EXIT_LAYER + 1
    return {"smollm2-135m": Shape("smollm2-135m", 576, 9, 3, 64, 1536, 49152, 30, 30, 8192),
            "vicuna-7b": Shape("vicuna-7b", 4096, 32, 32, 128, 11008, 32000, big_layers, 32, None)}


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def providers() -> list[str]:
    """``torch`` always; with CUDA every GPU backend (triton), on CPU the oneDNN one (the CPU default) if present."""
    from kangaroo_fast.backend.cpu import onednn_available

    names = ["torch"]
    if torch.cuda.is_available():
        names += sorted(name for name in BACKENDS if name not in ("torch", "onednn"))
    elif onednn_available():
        names.append("onednn")
    return names


# ---- random model pieces --------------------------------------------------------------------------------------------
def _rand(*shape, dtype, device, gen, scale=0.02):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def rope_table(positions: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's default RoPE table: cos/sin of position * theta^(-2i/D), the D/2 frequencies repeated twice."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def random_packed(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> PackedModel:
    cfg = shape.config()
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.02: _rand(*s, dtype=dtype, device=device, gen=gen, scale=scale)
    ones = lambda n: (1.0 + 0.1 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)
    layers = [LayerWeights(input_norm=ones(cfg.hidden_size), w_qkv=r(cfg.qkv_size, cfg.hidden_size), b_qkv=None,
                           w_o=r(cfg.hidden_size, cfg.q_size), post_norm=ones(cfg.hidden_size),
                           w_gate_up=r(2 * cfg.intermediate_size, cfg.hidden_size),
                           w_down=r(cfg.hidden_size, cfg.intermediate_size)) for _ in range(cfg.num_layers)]
    cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim)
    return PackedModel(config=cfg, embed=r(cfg.vocab_size, cfg.hidden_size, scale=1.0), layers=layers,
                       final_norm=ones(cfg.hidden_size), lm_head=r(cfg.vocab_size, cfg.hidden_size),
                       rope_cos=cos.to(device), rope_sin=sin.to(device))


def random_adapter(shape: Shape, seed: int = 1) -> Adapter:
    config = AdapterConfig.for_model(shape.config(), exit_layer=EXIT_LAYER, threshold=0.0, max_draft_steps=6)
    vocab = None if shape.draft_vocab is None else torch.randperm(
        shape.vocab, generator=torch.Generator().manual_seed(seed))[:shape.draft_vocab]
    adapter = Adapter(config, draft_vocab=vocab)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter.named_parameters():
            param.copy_(0.02 * torch.randn(param.shape, generator=gen))
        adapter.input_norm.add_(1.0)
        adapter.norm.add_(1.0)
    return adapter.eval()


def random_engine(shape: Shape, backend: str, dtype: torch.dtype, device: torch.device) -> Engine:
    """An engine over random weights with ``CONTEXT`` positions already in its caches (random keys/values)."""
    engine = Engine(random_packed(shape, dtype, device), get_backend(backend), CONTEXT + 16,
                    random_adapter(shape).to(device), max_draft_steps=6)
    gen = torch.Generator().manual_seed(2)
    for cache in (engine.cache, engine.adapter_cache):
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen).to(dtype))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen).to(dtype))
        cache.lengths.fill_(CONTEXT)
    return engine


# ---- timing ---------------------------------------------------------------------------------------------------------
def tensor_bytes(*tensors) -> int:
    """Bytes of the tensors' elements (what a memory-bound op must at least read or write once)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class Measurement:
    op: str
    case: str
    shape: str
    provider: str
    device: str
    dtype: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    bytes: int | None = None
    gbps: float | None = None

    @classmethod
    def from_times(cls, times_ms: list[float], bytes_moved: int | None, **info) -> "Measurement":
        times = sorted(times_ms)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        median = statistics.median(times)
        gbps = bytes_moved / (median * 1e-3) / 1e9 if bytes_moved else None
        return cls(median_ms=median, iqr_ms=q[2] - q[0], min_ms=times[0], max_ms=times[-1], rounds=len(times),
                   bytes=bytes_moved, gbps=gbps, **info)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_op(fn, device: torch.device, benchmark=None) -> list[float]:
    """Per-call times in milliseconds: do_bench on CUDA, pytest-benchmark's rounds on CPU (or a plain loop when
    no fixture is given or pytest-benchmark is disabled)."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
    fn()  # warm-up: lazy allocations and first-call dispatch stay out of the numbers
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(once, 1e-6))))
    if benchmark is not None:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "data", None):
            return [t * 1e3 for t in stats.data]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Measured copy bandwidth in GB/s (read + write of a ``megabytes`` buffer): the roof for memory-bound ops."""
    src = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = time_op(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (statistics.median(times) * 1e-3) / 1e9


class Recorder:
    """Collects measurements and writes them (with machine, versions and commit) as JSON and Markdown."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.measurements: list[Measurement] = []

    def add(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        return measurement

    def write(self, stem: Path) -> dict:
        peak = peak_bandwidth(self.device)
        data = {"machine": {**machine_info(), **git_info()}, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "peak_copy_gbps": peak, "context": CONTEXT,
                "verify_tokens": VERIFY_TOKENS, "exit_layer": EXIT_LAYER,
                "shapes": {name: asdict(s) for name, s in shapes(self.device).items()},
                "measurements": [asdict(m) for m in self.measurements]}
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(data))
        return data


def markdown(data: dict) -> str:
    lines = [f"Microbenchmarks on {data['machine']['gpu'] or data['machine']['cpu']} ({data['dtype']}, context "
             f"{data['context']}, verify {data['verify_tokens']} tokens); peak copy {data['peak_copy_gbps']:.1f} GB/s",
             "", "| shape | op | case | provider | median ms | IQR ms | GB/s | % of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for m in sorted(data["measurements"], key=lambda m: (m["shape"], m["op"], m["case"], m["provider"])):
        gbps = "–" if m["gbps"] is None else f"{m['gbps']:.1f}"
        share = "–" if m["gbps"] is None else f"{100 * m['gbps'] / data['peak_copy_gbps']:.0f}"
        lines.append(f"| {m['shape']} | {m['op']} | {m['case']} | {m['provider']} | {m['median_ms']:.4f} "
                     f"| {m['iqr_ms']:.4f} | {gbps} | {share} |")
    return "\n".join(lines) + "\n"

"""The seam between the decode loop and the maths.

The engine calls only the ops of a backend object; it never calls ``torch.nn.functional`` or a kernel itself.
``TorchBackend`` is the reference: it runs on any device, and it is the oracle every kernel test compares against.
``TritonBackend`` runs the same ops as fused Triton kernels; it is the default for models on a CUDA device when
triton is installed. ``OneDNNBackend`` is the reference with its bf16 products on prepacked oneDNN weights: the
default on CPU in float32. ``InductorBackend`` is the reference in the form ``torch.compile`` compiles into one C++
decode step per kind (``graphs.py``): the default on CPU in bfloat16. They are imported on first use, so
``import kangaroo_fast`` needs no triton.
"""
from __future__ import annotations

import torch

from .torch_ref import TorchBackend


def _triton_backend():
    from .triton_backend import TritonBackend

    return TritonBackend()


def _inductor_backend():
    from .inductor import InductorBackend

    return InductorBackend()


def _onednn_backend():
    from .onednn import OneDNNBackend

    return OneDNNBackend()


BACKENDS = {"torch": TorchBackend, "triton": _triton_backend, "onednn": _onednn_backend, "inductor": _inductor_backend}


def get_backend(name: str = "torch"):
    """Return the backend called ``name``; a clear error names the choices."""
    try:
        make = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}") from None
    return make()


def default_backend_name(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """'triton' for CUDA devices when triton is installed. On CPU: 'inductor' for bfloat16 where a C++ compiler is
    at hand (decode steps compiled by ``torch.compile``, about a minute's compile per kind of step once per process;
    products on oneDNN's packed weights where this CPU has them); else 'onednn' where oneDNN's packed bf16 linear
    exists (its bf16 products on packed weights; everything else, float32 included, is the reference's); else
    'torch'."""
    from .inductor import cpp_compiler_available
    from .cpu import onednn_available
    from .triton_backend import triton_available

    kind = torch.device(device).type
    if kind == "cuda":
        return "triton" if triton_available() else "torch"
    if kind != "cpu":
        return "torch"
    if dtype == torch.bfloat16 and cpp_compiler_available():
        return "inductor"
    return "onednn" if onednn_available() else "torch"


def resolve_backend(backend, device: torch.device | str, dtype: torch.dtype | None = None):
    """A backend object from an object, a name, or None (the default for the device and dtype)."""
    if backend is None:
        return get_backend(default_backend_name(device, dtype))
    if isinstance(backend, str):
        return get_backend(backend)
    return backend


__all__ = ["TorchBackend", "get_backend", "default_backend_name", "resolve_backend", "BACKENDS"]

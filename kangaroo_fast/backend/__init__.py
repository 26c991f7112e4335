"""The seam between the decode loop and the maths.

The engine calls only the ops of a backend object; it never calls ``torch.nn.functional`` or a kernel itself.
``TorchBackend`` is the reference: it runs on any device, and it is the oracle every kernel test compares against.
``TritonBackend`` runs the same ops as fused Triton kernels; it is the default for models on a CUDA device when
triton is installed. ``OneDNNBackend`` is the reference with its bf16 products on prepacked oneDNN weights: the
default on CPU. It is imported on first use, so ``import kangaroo_fast`` needs no triton.
"""
from __future__ import annotations

import torch

from .torch_ref import TorchBackend


def _triton_backend():
    from .triton_backend import TritonBackend

    return TritonBackend()


def _onednn_backend():
    from .onednn import OneDNNBackend

    return OneDNNBackend()


BACKENDS = {"torch": TorchBackend, "triton": _triton_backend, "onednn": _onednn_backend}


def get_backend(name: str = "torch"):
    """Return the backend called ``name``; a clear error names the choices."""
    try:
        make = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}") from None
    return make()


def default_backend_name(device: torch.device | str) -> str:
    """'triton' for CUDA devices when triton is installed; on CPU 'onednn' where this torch has oneDNN's packed
    linear (its bf16 products on packed weights; everything else, float32 included, is the reference's); else
    'torch'."""
    from .onednn import onednn_available
    from .triton_backend import triton_available

    kind = torch.device(device).type
    if kind == "cuda":
        return "triton" if triton_available() else "torch"
    return "onednn" if kind == "cpu" and onednn_available() else "torch"


def resolve_backend(backend, device: torch.device | str):
    """A backend object from an object, a name, or None (the device's default)."""
    if backend is None:
        return get_backend(default_backend_name(device))
    if isinstance(backend, str):
        return get_backend(backend)
    return backend


__all__ = ["TorchBackend", "get_backend", "default_backend_name", "resolve_backend", "BACKENDS"]

"""The seam between the decode loop and the maths.

The engine calls only the ops of a backend object; it never calls ``torch.nn.functional`` or a kernel itself.
``TorchBackend`` is the reference: it runs on any device, and it is the oracle every kernel test compares against.
"""
from __future__ import annotations

from .torch_ref import TorchBackend

BACKENDS = {"torch": TorchBackend}


def get_backend(name: str = "torch"):
    """Return the backend called ``name``; a clear error names the choices."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}") from None


__all__ = ["TorchBackend", "get_backend", "BACKENDS"]

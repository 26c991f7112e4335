"""Gaps of triton 3.6's CPU interpreter, closed when ``TRITON_INTERPRET=1`` (the compiled path is untouched).

Imported by ``_common`` before any kernel is decorated.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

import numpy as np
import triton.language as tl


def apply() -> None:
    """Two gaps of triton 3.6's CPU interpreter, closed for the interpreter only (the compiled path is untouched).

    1. It turns a scalar into an int with ``int(array_of_shape_1)``, which numpy >= 2.4 refuses
       (triton-lang/triton#9171, fixed upstream by #9172 after 3.6): loops with run-time bounds fail. Upstream's
       fix, squeezing first, is applied where numpy needs it.
    2. It stores bfloat16 as uint16 and ``tl.dot`` multiplies those integers. Here bf16 operands are widened to
       fp32 first, which is exact and is what the tensor cores compute (bf16 products, fp32 accumulation). The
       kernels do every other bf16 operation in fp32 explicitly, as the compiled code does anyway.

    And two costs, not semantics, so that a whole decode runs in the interpreter within a test's time:
    3. Every call of a ``@triton.jit`` helper re-patches triton.language (~2 ms), although the running kernel
       has already patched it; nested calls now reuse the kernel's patch.
    4. Integer overflow sanitizing (a debug check the compiled kernels do not make) is off, as on the GPU.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_kangaroo_compat", False):
        return
    interpreter._kangaroo_compat = True
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        patch_tensor = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = patch_lang_tensor

    patch_lang = interpreter._patch_lang
    active: list = []
    patched: set = set()  # the language modules (triton.language, triton.language.core) the running kernel patched

    def lang_modules(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class KernelScope:
        """The patch scope of the running kernel: device functions it calls find their language modules patched."""

        def __init__(self, scope, modules: set):
            self.scope = scope
            active.append(self)
            patched.update(modules)

        def restore(self):
            active.remove(self)
            patched.clear()
            self.scope.restore()

    def patch_once(fn):
        modules = lang_modules(fn)
        if not active:
            return KernelScope(patch_lang(fn), modules)
        if not modules <= patched:  # a device function seeing another language module (e.g. tl.zeros' core)
            patch_lang(fn)
            patched.update(modules)
        return active[-1]

    interpreter._patch_lang = patch_once
    interpreter.interpreter_builder.options = dataclasses.replace(interpreter.interpreter_builder.options,
                                                                  sanitize_overflow=False)

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data.reshape(handle.data.shape), tl.float32)

    builder.create_dot = lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args)


if os.environ.get("TRITON_INTERPRET") == "1":
    apply()

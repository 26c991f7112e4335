"""The on-disk cache of compiled decode steps, so that a later process loads its steps instead of compiling them.

An entry is one file under ``<cache_dir()>/steps/<key>/``, named by its content's BLAKE2b digest, and a manifest beside
it (``<name>.json``) that names it and gives its size. The key covers everything that changes the compiled code or the
weights folded into it: the step's own description (kind, batch and length variants, exit layer), the model's and the
adapter's tensors (their digest, not their names), the dtypes, the torch version, this CPU's instruction-set flags,
torch's thread count and the package's step code (the source files a step is traced from). Writes are atomic (a
temporary file in the same folder, then ``os.replace``), so two processes filling the same entry at once both end with a
whole entry, and a reader never sees a half-written one. An entry whose file is missing, truncated, altered or refused
by its loader is removed and built again, with one line on stderr saying so: never a crash, never a wrong step.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

# the instruction sets that decide which kernels Inductor and oneDNN generate
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8")
# the package's files a compiled step is traced from, relative to the package folder
STEP_SOURCES = ("engine.py", "graphs.py", "packaged.py", "weights.py", "adapter.py", "cache.py", "models.py",
                "step_cache.py", "backend/__init__.py", "backend/cpu.py", "backend/torch_ref.py", "backend/onednn.py",
                "backend/fbgemm.py", "backend/inductor.py")
PACKAGE = Path(__file__).resolve().parent
_CHUNK = 1 << 24


@functools.lru_cache(maxsize=None)
def cpu_flags() -> tuple[str, ...]:
    """This CPU's flags among ``ISA_FLAGS`` (from /proc/cpuinfo, read once; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return tuple(flag for flag in ISA_FLAGS if flag in present)
    except OSError:
        pass
    return ()


def tensor_digest(tensors: Iterable[torch.Tensor | None]) -> str:
    """BLAKE2b over the tensors' dtypes, shapes and bytes, in order (None counts as a marker of its own)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """BLAKE2b of the package's step sources (``STEP_SOURCES``), read once per process (the code it runs): a changed
    engine compiles its steps anew."""
    h = hashlib.blake2b(digest_size=16)
    for name in STEP_SOURCES:
        h.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes() + b"\0")
    return h.hexdigest()


def environment() -> dict:
    """What, besides the model and the step, changes the code a compile makes here."""
    return {"torch": torch.__version__, "cpu": cpu_flags(), "threads": torch.get_num_threads(),
            "code": code_digest()}


def key_of(parts: dict) -> str:
    """The entry key of ``parts`` (JSON-serialisable): a digest of its canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_root() -> Path:
    from .models import cache_dir

    return cache_dir() / "steps"


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _note(message: str) -> None:
    print(f"kangaroo_fast: {message}", file=sys.stderr, flush=True)


class StepCache:
    """Entries under ``root`` (default ``<cache_dir()>/steps``): per key a folder, per name a manifest
    ``<name>.json`` naming the file it stands for, ``<name>.<digest><suffix>``, with its size. Files are named by their
    content and never rewritten; the manifest, replaced whole, is the entry: two processes storing the same entry at
    once each publish a whole file, and the manifest ends up naming one of them."""

    STALE_S = 600.0  # a file no manifest names, older than this, is a finished writer's leftover

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def _manifest(self, key: str, name: str) -> Path:
        return self.root / key / f"{name}.json"

    def path(self, key: str, name: str) -> Path | None:
        """The file the entry's manifest names (None without a readable manifest)."""
        try:
            meta = json.loads(self._manifest(key, name).read_text())
            return self.root / key / Path(meta["file"]).name
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, key: str, name: str, loader: Callable[[Path], object]):
        """``loader(path)`` of a whole entry, else None (absent; or damaged, then removed with a note)."""
        manifest = self._manifest(key, name)
        if not manifest.exists():
            return None
        try:
            meta = json.loads(manifest.read_text())
            path = self.root / key / Path(meta["file"]).name
            if path.stat().st_size != meta["size"] or _file_digest(path) != meta["digest"]:
                raise ValueError("its size or digest differs from its manifest")
            return loader(path)
        except Exception as err:  # noqa: BLE001 - any damage means: build it again
            detail = str(err).splitlines()[0][:160] if str(err) else "no detail"
            _note(f"the cached {name} in {manifest.parent} is unreadable ({type(err).__name__}: {detail}); "
                  "building it again")
            self.remove(key, name)
            return None

    def store(self, key: str, name: str, write: Callable[[Path], None], suffix: str = "") -> Path:
        """``write(tmp)`` makes the entry's file at a temporary path in its folder (ending in ``suffix``); the file
        then takes its content's name, ``<name>.<digest><suffix>``, and the manifest is replaced to name it. Returns
        the file's path."""
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".partial{suffix}", dir=folder)
        os.close(fd)
        tmp = Path(tmp)
        try:
            write(tmp)
            digest = _file_digest(tmp)
            path = folder / f"{name}.{digest}{suffix}"
            meta = {"file": path.name, "digest": digest, "size": tmp.stat().st_size}
            os.replace(tmp, path)
            fd, tmp_meta = tempfile.mkstemp(prefix=f".{name}.json.", suffix=".partial", dir=folder)
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
            os.replace(tmp_meta, self._manifest(key, name))
        finally:
            tmp.unlink(missing_ok=True)
        self._sweep(folder, name, keep=path)
        return path

    def _sweep(self, folder: Path, name: str, keep: Path) -> None:
        """Remove ``name``'s files other than ``keep`` that no writer can still be publishing."""
        now = time.time()
        for other in folder.glob(f"{name}.*"):
            if other != keep and other.suffix != ".json" and now - other.stat().st_mtime > self.STALE_S:
                other.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, key: str):
        """Hold ``key``'s lock (an exclusive ``flock`` on ``<key>/.lock``) while loading or making its entries: a
        second process waits for the first's package instead of compiling it again, and no two processes unpack one
        package at once (AOTInductor unpacks it into a folder named after it)."""
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove(self, key: str, name: str) -> None:
        path = self.path(key, name)
        self._manifest(key, name).unlink(missing_ok=True)
        if path is not None:
            path.unlink(missing_ok=True)

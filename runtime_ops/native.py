"""Build the C kernels in runtime_ops/kernels/ at first use and load them with ctypes.

A library is compiled once per source text, compiler and CPU into ``$GRAPHPRUNE_CACHE/kernels`` (default
``~/.cache/graphprune/kernels``) and reused; editing the source rebuilds it. Without a C compiler the
caller gets KernelUnavailable with the reason, and the standard-ops forms keep working.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

KERNELS = Path(__file__).parent / "kernels"
# -march=native: the cache key includes the CPU, so a library never moves to a machine it was not built for.
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")
_OPENMP = ("-fopenmp",)


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("GRAPHPRUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "graphprune") / "kernels"


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


@cache
def load(name: str) -> ctypes.CDLL:
    """The compiled kernels/<name>.c, built on first use; raises KernelUnavailable with the reason."""
    source = KERNELS / f"{name}.c"
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC or install gcc); using the standard-ops form.")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join((cc, *_FLAGS, *_OPENMP)).encode() + _machine().encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        _build(cc, source, target)
        for stale in target.parent.glob(f"{name}-*.so"):
            if stale != target:
                stale.unlink(missing_ok=True)  # an older source's build; a process that loaded it keeps its copy
    return ctypes.CDLL(os.fspath(target))


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                model += line
    except OSError:
        pass
    return platform.machine() + platform.system() + model


def _build(cc: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        # OpenMP only spreads the columns over threads; a compiler without it still builds a correct kernel.
        for extra in (_OPENMP, ()):
            done = subprocess.run([cc, *_FLAGS, *extra, os.fspath(source), "-o", tmp, "-lm"], check=False,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders each publish a complete library
                return
            errors = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise KernelUnavailable(f"{cc} could not build {source.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

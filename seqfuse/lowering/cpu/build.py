"""Build, cache and load the generated C kernels of the CPU path.

A kernel module is plain C (no torch headers); the kernel modules generate one small source per
kernel variant a call needs (scan.py, ssd.py: a fraction of a second to about two seconds each),
compiled with the system C compiler -- the one inductor already needs on CPU -- into a
shared library and loaded with ctypes.  The library is named by a content hash of
everything that decides the machine code: the source, the compiler (resolved path, size
and mtime, so an upgraded compiler rebuilds without being run to ask its version), the
flags and the machine architecture.
It lives in ``<cache_dir>/cpu_kernels/`` (``cache_dir`` of seqfuse/runtime/cache.py:
``$SEQFUSE_CACHE_DIR`` or ``~/.cache/seqfuse``), written atomically (temp file +
``os.replace``), so a second process, or the second build of the same source in this
one, loads it without invoking the compiler.  Beside each library a ``.sha256`` file,
written after the library is in place, holds its size and hash; a library is only
handed to the dynamic loader when it matches them.  A truncated or foreign file is
rebuilt, never mapped: a truncated shared object kills the process with SIGBUS.

OpenMP: the flags first try ``-fopenmp``; a compiler without it builds the serial
variant (the kernels' pragmas are then ignored).  torch's own libgomp (SONAME
libgomp.so.1) is already loaded, so the kernels share its thread pool.

Failures never raise out of :func:`load`'s callers in the dispatcher: :func:`try_load`
returns the reason (no compiler, build error) that the Impl's ``supports`` reports.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from seqfuse import log

from seqfuse.runtime.cache import cache_dir

#: the C compiler: ``$CC`` if set, else ``cc``.  Tests monkeypatch this name.
COMPILER = os.environ.get("CC", "cc")

#: ``-O3`` for the compiler's default target (x86-64 baseline SSE2, aarch64 NEON), plus
#: :data:`CPU_FLAGS` where this CPU has AVX2 and FMA (read from /proc/cpuinfo; never
#: ``-march=native``).  The plain kernels are memory-bound (~3 loads per multiply-add) and
#: gain nothing from it; the discretized scan forms exp(Δ·A) in its step loop, and AVX2
#: makes that loop ~2x faster.  The extra flags are part of the library's key, so a machine
#: without AVX2 that mounts the same cache (a shared home, a restored CI cache) computes
#: another key and builds its own baseline library: no illegal instruction.  Never
#: ``-ffast-math``, and ``-ffp-contract=off`` with FMA: results keep IEEE semantics (the
#: readout sums are reassociated only through ``#pragma omp simd reduction``).
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno")
#: the optimization levels a caller of :func:`load` may ask for instead of BASE_FLAGS' -O3 (the
#: scan kernels build their runtime-strided variants at -O2: -O3 took 3-4x longer on them)
OPT_LEVELS = ("-O1", "-O2", "-O3")
#: what an x86-64 CPU with AVX2 and FMA adds to BASE_FLAGS
AVX2_FLAGS = ("-mavx2", "-mfma", "-ffp-contract=off")


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """AVX2_FLAGS on an x86-64 Linux CPU whose ``cpuinfo`` lists avx2 and fma, else ()."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("SEQFUSE_CPU_BASELINE"):
        return ()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return AVX2_FLAGS if {"avx2", "fma"} <= have else ()
    except OSError:
        pass
    return ()


#: this machine's extra flags (``SEQFUSE_CPU_BASELINE=1`` in the environment turns them off)
CPU_FLAGS = _cpu_flags()
#: flag sets tried in order: parallel (OpenMP), then serial
FLAG_VARIANTS = (("-fopenmp",), ("-fopenmp-simd",), ())

#: bump when the way a library is built or named changes (2: libraries carry a .sha256 file)
BUILD_VERSION = 2

_LOCK = threading.Lock()
#: key (hash) -> loaded library; (module name, compiler, source) -> the library, or the reason
#: it cannot be built (the per-call fast path: no file system access once loaded)
_LOADED: dict[str, ctypes.CDLL] = {}
_BY_SOURCE: dict[tuple, ctypes.CDLL] = {}
_FAILED: dict[tuple, str] = {}
#: number of compiler invocations in this process (tests check that the disk cache is reused)
compile_count = 0
#: wall seconds of those invocations (benchmarks/run.py reports them: a cold compile's C build share)
compile_seconds = 0.0


class BuildError(RuntimeError):
    """The kernel could not be built or loaded; the message is the reason."""


def _compiler_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def kernel_dir() -> Path:
    """Directory of the built libraries: ``<seqfuse cache dir>/cpu_kernels``."""
    return cache_dir() / "cpu_kernels"


def _kernel_dirs() -> list[Path]:
    """Where a library is looked for and built: the cache, then (a read-only cache dir, e.g. a
    read-only home on CI) a per-user directory under the system temp dir."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [kernel_dir(), Path(tempfile.gettempdir()) / f"seqfuse-{uid}" / "cpu_kernels"]


def _load_or_build(compiler: str, flags: tuple[str, ...], source: str, name: str, key: str) -> ctypes.CDLL:
    """Load ``<dir>/<name>-<key>.so`` from the first kernel dir that has it (a file that does not
    load, e.g. truncated by a full disk, is rebuilt), else build it into the first writable one.
    Raises BuildError (the compiler failed) or OSError (no directory usable)."""
    last: OSError | None = None
    for directory in _kernel_dirs():
        out = directory / f"{name}-{key}.so"
        if out.exists() and _verified(out):
            try:
                return ctypes.CDLL(str(out))
            except OSError:
                pass  # not a loadable library: rebuild it below
        try:
            _compile(compiler, flags, source, out, name)
            return ctypes.CDLL(str(out))
        except BuildError:
            raise  # the source or flags fail; another directory would not help
        except OSError as exc:
            last = exc
    raise last if last is not None else OSError("no kernel directory")


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _digest(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _verified(lib: Path) -> bool:
    """Whether ``lib`` is whole: its size and hash are those its ``.sha256`` file names
    (written by :func:`_compile` after the library itself)."""
    try:
        return _digest_path(lib).read_text().strip() == _digest(lib.read_bytes())
    except OSError:
        return False


def _key(source: str, compiler_id: str, flags: tuple[str, ...]) -> str:
    text = "\n".join([f"v{BUILD_VERSION}", compiler_id, " ".join(flags), platform.machine(), source])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _compile(compiler: str, flags: tuple[str, ...], source: str, out: Path, name: str) -> None:
    """Compile ``source`` into the shared library ``out`` (atomically); raises BuildError."""
    global compile_count, compile_seconds
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"seqfuse: building C kernel {name!r} ({compiler} {' '.join(flags)}) into {out.parent} "
          "(once per source and machine)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="seqfuse-cc-", dir=out.parent) as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        compile_count += 1
        start = time.perf_counter()
        try:
            proc = subprocess.run([compiler, *flags, str(src), "-o", str(lib), "-lm"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildError(f"C compiler {compiler!r} failed to run: {exc}") from exc
        finally:
            seconds = time.perf_counter() - start
            compile_seconds += seconds
            log.cache.debug("C kernel %r: compiler ran %.2f s (%d bytes of C)", name, seconds, len(source))
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError(f"C compiler {compiler!r} failed ({' '.join(flags)}): " + (err[0] if err else "no output"))
        digest = Path(tmp) / "digest"
        digest.write_text(_digest(lib.read_bytes()) + "\n")
        os.replace(lib, out)
        os.replace(digest, _digest_path(out))  # last: a reader that sees it sees the whole library


def _base_flags(opt: str | None) -> tuple[str, ...]:
    if opt is None or opt == BASE_FLAGS[0]:
        return BASE_FLAGS
    if opt not in OPT_LEVELS:
        raise ValueError(f"seqfuse: C kernel optimization level must be one of {OPT_LEVELS}, got {opt!r}")
    return (opt, *BASE_FLAGS[1:])


def load(name: str, source: str, opt: str | None = None) -> ctypes.CDLL:
    """The library built from ``source`` (from memory, the disk cache, or compiled now), at
    optimization level ``opt`` (one of OPT_LEVELS; default BASE_FLAGS' -O3), which is part of
    the library's key.

    Raises BuildError with the reason when no C compiler is found or every flag
    variant fails to build."""
    compiler = COMPILER
    base = _base_flags(opt)
    memo = (name, compiler, source, base[0])
    lib = _BY_SOURCE.get(memo)
    if lib is not None:
        return lib
    with _LOCK:
        failed = _FAILED.get(memo)
        if failed is not None:
            raise BuildError(failed)
        path = shutil.which(compiler)
        if path is None:
            reason = f"no C compiler: {compiler!r} not found on PATH"
            _FAILED[memo] = reason
            raise BuildError(reason)
        compiler_id = _compiler_identity(path)
        errors = []
        for extra in FLAG_VARIANTS:
            flags = base + CPU_FLAGS + extra
            key = _key(source, compiler_id, flags)
            lib = _LOADED.get(key)
            if lib is not None:
                _BY_SOURCE[memo] = lib
                return lib
            try:
                lib = _load_or_build(path, flags, source, name, key)
            except (BuildError, OSError) as exc:
                errors.append(str(exc))
                continue
            _LOADED[key] = _BY_SOURCE[memo] = lib
            return lib
        reason = f"C kernel {name!r} did not build: " + "; ".join(errors)
        _FAILED[memo] = reason
        raise BuildError(reason)


def try_load(name: str, source: str, opt: str | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, the reason it is unavailable); ``opt`` as in :func:`load`."""
    try:
        return load(name, source, opt), None
    except BuildError as exc:
        return None, str(exc)


def forget() -> None:
    """Drop the in-memory libraries and failure memos (the disk cache stays); for tests."""
    with _LOCK:
        _LOADED.clear()
        _BY_SOURCE.clear()
        _FAILED.clear()

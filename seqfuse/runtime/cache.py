"""Kernel cache: a specialization key -> the launch config chosen for it, in memory and on disk.

A key names everything a generated kernel is specialized on: the op's
compile-time flags, dtypes, head dims, a coarse length bucket, the torch and
triton versions and the device name.  On CUDA the config is chosen by timing
a small candidate space once (:func:`autotune`) and then remembered, in this
process and in ``$SEQFUSE_CACHE_DIR`` (default ``~/.cache/seqfuse``) as JSON
written atomically (temp file + ``os.replace``).  A corrupt or foreign file is
ignored and rebuilt; nothing is ever unpickled.

This module knows nothing about kernels (runtime never imports lowering): the
caller passes the candidates and a function that times one of them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from seqfuse import log

#: bump when the meaning of a stored config changes; files of another version are ignored
CACHE_VERSION = 1

_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Directory of the on-disk cache: ``$SEQFUSE_CACHE_DIR`` or ``~/.cache/seqfuse``."""
    env = os.environ.get("SEQFUSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "seqfuse"


@functools.lru_cache(maxsize=None)
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def device_name(device: torch.device) -> str:
    """A stable name of the device a kernel runs on (the GPU model for CUDA)."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def make_key(kind: str, spec: dict[str, Any], device: torch.device) -> str:
    """Canonical text key of one specialization: ``spec`` (JSON-able values) plus the
    torch / triton versions and the device name."""
    full = dict(spec, kind=kind, torch=torch.__version__, triton=_version("triton"), device=device_name(device))
    return json.dumps(full, sort_keys=True, separators=(",", ":"), default=str)


class ConfigCache:
    """Key -> config dict, kept in memory and mirrored to ``<cache_dir>/<name>.json``."""

    def __init__(self, name: str):
        self.name = name
        self._memory: dict[str, dict] = {}

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}.json"

    def _read_disk(self) -> dict[str, dict]:
        """Entries stored on disk; {} when the file is missing, unreadable, corrupt or of another version."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            log.cache.debug("%s: ignoring %s (not a version-%d cache file)", self.name, self.path, CACHE_VERSION)
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)}

    def _write_disk(self, entries: dict[str, dict]) -> None:
        """Atomically replace the file (a reader sees the old file or the new, never half of one)."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, sort_keys=True, indent=1)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            # a read-only or full disk only costs a re-tune next process
            log.cache.debug("%s: could not write %s (%s)", self.name, path, exc)

    def get(self, key: str) -> dict | None:
        """The config stored for ``key`` (memory first, then disk), or None."""
        with _LOCK:
            hit = self._memory.get(key)
            if hit is None:
                hit = self._read_disk().get(key)
                if hit is not None:
                    self._memory[key] = hit
                log.cache.debug("%s: %s %s", self.name, "disk hit" if hit is not None else "miss", key)
            return dict(hit) if hit is not None else None

    def put(self, key: str, config: dict, persist: bool = True) -> None:
        """Remember ``config`` for ``key``; with ``persist`` also on disk (merged with what is there)."""
        with _LOCK:
            self._memory[key] = dict(config)
            if persist:
                entries = self._read_disk()
                entries[key] = dict(config)
                self._write_disk(entries)

    def clear_memory(self) -> None:
        """Forget the in-memory copy (the disk file stays)."""
        with _LOCK:
            self._memory.clear()


def autotune_enabled() -> bool:
    """False when ``SEQFUSE_AUTOTUNE`` is 0 / false / off: kernels then take their heuristic
    config (the first candidate each kernel lists) without timing any -- one compile per
    kernel instead of one per candidate, for a faster first call."""
    return os.environ.get("SEQFUSE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def autotune(cache: ConfigCache, key: str, candidates: list[dict], bench: Callable[[dict], float]) -> dict:
    """The config for ``key``: the cached one, else the fastest candidate by ``bench``
    (seconds; a candidate whose bench raises, e.g. out of shared memory, is skipped),
    which is then cached.  Raises RuntimeError if every candidate fails.

    With autotuning off (:func:`autotune_enabled`), a cached config is still used, and
    otherwise the first candidate is returned untimed and not stored."""
    if not candidates:
        raise ValueError("autotune: no candidate configs")
    hit = cache.get(key)
    if hit is not None:
        return hit
    if not autotune_enabled():
        log.cache.debug("%s: SEQFUSE_AUTOTUNE off: heuristic config %s for %s", cache.name, candidates[0], key)
        return dict(candidates[0])
    best, best_t, errors = None, float("inf"), []
    for config in candidates:
        try:
            t = float(bench(config))
        except Exception as exc:  # noqa: BLE001 - an unlaunchable config is just not a candidate
            errors.append(f"{config}: {type(exc).__name__}: {exc}")
            continue
        if t < best_t:
            best, best_t = config, t
    if best is None:
        raise RuntimeError("autotune: every candidate config failed: " + "; ".join(errors))
    log.cache.debug("%s: tuned %s -> %s (%.3g ms; %d of %d candidates failed)", cache.name, key, best,
                    1e3 * best_t, len(errors), len(candidates))
    cache.put(key, best)
    return dict(best)


def time_cuda(fn: Callable[[], Any], warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]

"""``python -m seqfuse``: what seqfuse finds on this machine, for bug reports and first runs.

    python -m seqfuse            # the report as text
    python -m seqfuse --json     # the same as JSON

Versions (seqfuse, Python, torch, triton, numpy), CUDA and its devices, the C compiler of the CPU
path and its flags, the cache directories, the environment variables seqfuse reads, and for each
runtime path (triton, cpu, aten, eager) whether it can run here and, if not, why.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

#: environment variables seqfuse (or the paths it drives) reads
ENV_VARS = ("SEQFUSE_CACHE_DIR", "SEQFUSE_STRICT", "SEQFUSE_CPU_BASELINE", "CC", "TRITON_INTERPRET",
            "TORCH_LOGS", "CUDA_VISIBLE_DEVICES")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({type(exc).__name__})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def environment_report(build: bool = True) -> dict:
    """The report as a dict.  With ``build``, the CPU path's C kernels are built (or loaded from
    the cache) to say whether that path works; without, only whether a compiler is found."""
    import torch

    import seqfuse
    from seqfuse.lowering.cpu import build as cbuild
    from seqfuse.lowering.triton import common as tcommon
    from seqfuse.runtime.cache import cache_dir

    installed = _dist_version("seqfuse")
    report: dict = {
        "seqfuse": {"version": seqfuse.__version__, "location": os.path.dirname(seqfuse.__file__),
                    "installed_metadata": installed or "none (not installed: on PYTHONPATH; import seqfuse "
                                                       "registers backend='seqfuse')"},
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "torch": torch.__version__,
        "triton": _dist_version("triton") or "not installed",
        "numpy": _dist_version("numpy") or "not installed",
    }
    cuda = {"available": torch.cuda.is_available(), "torch_built_with": torch.version.cuda or "none (CPU build)"}
    if cuda["available"]:
        cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report["cuda"] = cuda

    compiler_path = shutil.which(cbuild.COMPILER)
    report["c_compiler"] = {
        "name": cbuild.COMPILER + ("  ($CC)" if "CC" in os.environ else "  (default; set $CC to change)"),
        "path": compiler_path or "not found on PATH",
        "version": _compiler_version(compiler_path) if compiler_path else "-",
        "flags": " ".join(cbuild.BASE_FLAGS + cbuild.CPU_FLAGS),
        "variants_tried": ["  ".join(v) or "(serial)" for v in cbuild.FLAG_VARIANTS],
        "cpu_flags": ("baseline (SEQFUSE_CPU_BASELINE is set)" if os.environ.get("SEQFUSE_CPU_BASELINE")
                      else " ".join(cbuild.CPU_FLAGS) or "baseline (no AVX2+FMA, or not x86-64)"),
    }
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
        inductor_dir = inductor_cache_dir()
    except Exception as exc:  # noqa: BLE001 - informational only
        inductor_dir = f"? ({type(exc).__name__})"
    report["cache_dirs"] = {"seqfuse": str(cache_dir()), "cpu_kernels": str(cbuild.kernel_dir()),
                            "inductor": inductor_dir}
    report["env"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ} or f"none of {', '.join(ENV_VARS)} set"

    paths = {}
    why_not = tcommon.availability(torch.device("cpu"), None)
    if cuda["available"]:
        cuda_why = tcommon.availability(torch.device("cuda"), None)
        paths["triton"] = "available on CUDA tensors" if cuda_why is None else f"not available: {cuda_why}"
        if why_not is None:
            paths["triton"] += "; on CPU tensors through the interpreter (TRITON_INTERPRET=1, slow)"
    elif why_not is None:
        paths["triton"] = "available on CPU tensors through the interpreter (TRITON_INTERPRET=1; slow, for tests)"
    else:
        paths["triton"] = f"not available: no CUDA device, and on CPU: {why_not}"
    if not build:
        paths["cpu"] = ("C compiler found (not built: --no-build)" if compiler_path
                        else f"not available: no C compiler: {cbuild.COMPILER!r} not found on PATH")
    else:
        from seqfuse.lowering.cpu import scan as cscan
        reason = cscan.available()
        paths["cpu"] = ("available: generated C kernels for scan and recurrent ssd on CPU tensors"
                        if reason is None else f"not available: {reason}")
    paths["aten"] = "available: ATen's fused kernels (scaled_dot_product_attention, torch.fft, conv1d) where an op fits"
    paths["eager"] = "available: the eager reference (always)"
    report["runtime_paths"] = paths
    from torch._dynamo import list_backends
    report["backend_registered"] = "seqfuse" in list_backends(exclude_tags=())
    return report


def format_report(report: dict) -> str:
    lines = ["seqfuse environment"]

    def emit(key, value, indent=0):
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for k, v in value.items():
                emit(k, v, indent + 1)
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: " + ", ".join(map(str, value)))
        else:
            lines.append(f"{pad}{key}: {value}")

    for key, value in report.items():
        emit(key, value, 1)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqfuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-build", action="store_true",
                   help="do not build the CPU path's C kernels to check it (only look for a compiler)")
    args = p.parse_args(argv)
    report = environment_report(build=not args.no_build)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

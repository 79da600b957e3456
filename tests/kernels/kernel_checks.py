"""Error measures shared by the kernel tests (``from kernel_checks import ...``).

Importable because pytest (default "prepend" import mode) puts the rootdir of a test file without
an ``__init__.py``, here tests/kernels, on sys.path, as it does for this directory's conftest.py.

Errors are relative RMS errors in fp64 against an fp32 reference, with fixed per-dtype bounds that
are never widened to make a test pass.
"""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: relative RMS error bounds against the fp32 reference (a test file may only tighten or document
#: its own fp32 bound, never widen one to pass)
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: numpy's ndim-conversion warning, raised inside the Triton interpreter
IGNORE_NDIM_WARNING = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def rel_err(out, ref):
    """‖out - ref‖ / ‖ref‖ in fp64 on the CPU; fails on a shape mismatch, a non-finite output or an
    all-zero reference (which would prove nothing)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.norm().item()
    assert den > 0, "the reference is all zeros: the comparison would prove nothing"
    return (out - ref).norm().item() / den


def assert_close(name, out, ref, bound):
    """Assert rel_err(out, ref) < bound, naming the result; returns the error."""
    e = rel_err(out, ref)
    assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"
    return e


#: defined for every ``compile_offline`` script: ``spill_stores(kernel)``, the bytes of spill stores ptxas
#: (bundled with triton) reports for a compiled kernel on sm_90a, or None where this triton has no ptxas
_SPILL_STORES = r"""
def spill_stores(kernel):
    import os, re, subprocess, tempfile
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", out).group(1))
"""


def compile_offline(script: str, tmp_path) -> str:
    """Run ``script`` (it compiles kernels for sm_90 with triton's compiler and prints "compiled") in a
    fresh interpreter without TRITON_INTERPRET, caching into ``tmp_path``; returns its stdout.  The script
    may call ``spill_stores(kernel)`` (ptxas's count).  Skips where a GPU runs the compiled kernels
    anyway, or where this triton has no NVIDIA backend."""
    import os
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("the GPU tests run the compiled kernels")
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _SPILL_STORES + script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
    return proc.stdout

"""Kernel tests: without CUDA, every test here runs the Triton kernels through the interpreter.

TRITON_INTERPRET=1 is set per test (not for the whole process): pytest imports
every test module before running any, and the kernel modules are jitted for the
mode in force when first imported.  (The "auto" runtime never takes the
interpreted kernels; the tests here ask for them with runtime="triton" or call
them directly.)  seqfuse's kernel modules are imported on first use, so they
are jitted for the interpreter inside a test.

Triton's own standard library (tl.zeros, tl.max, ...) is jitted once, when
triton.language is first imported, for the mode TRITON_INTERPRET names at that
moment; an interpreted kernel cannot call a compiled helper.  So, without CUDA,
triton.language is imported here with the variable set, then the variable is
restored.  (The attention kernels call no such helper and work either way.)
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    try:
        # gluon wraps triton.language's standard library as it finds it (jitted for the interpreter
        # here) and asserts the mode matches when first imported; flash-linear-attention imports it,
        # so a test module importing fla after this conftest failed at collection unless another
        # module had imported fla first
        import triton.experimental.gluon  # noqa: F401
    except Exception:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(autouse=True)
def _triton_interpreter_without_cuda(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield

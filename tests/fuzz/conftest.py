"""The fuzz tests' triton cases run the kernels through the interpreter (no CUDA here):
triton.language is imported with TRITON_INTERPRET set, as tests/kernels/conftest.py explains,
and the variable is set only inside those tests (the ``triton_interpreter`` fixture)."""
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


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield

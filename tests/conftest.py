"""Test configuration: pipeline errors raise (SEQFUSE_STRICT), helpers importable, GPU marker."""
import os
import sys

os.environ.setdefault("SEQFUSE_STRICT", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and starts with zeroed runtime counters."""
    import seqfuse
    torch._dynamo.reset()
    seqfuse.reset_counters()
    torch.manual_seed(0)
    yield

"""Unit tests run on tiny tensors: one intra-op thread is faster there (no thread start-up or
spin-waiting on a busy 2-core machine) and keeps the timings of the suite stable."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The Hugging Face Mamba and Mamba-2 models end to end on the triton path: every scan / ssd call
of the compiled model runs the Triton kernels (forward and backward), and the model equals eager
(outputs and all parameter gradients).

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set per test by
conftest.py) on CPU tensors, at tiny sizes; ``runtime="triton"`` makes seqfuse use that path
instead of the C kernels.  On a GPU the same tests run the compiled kernels on CUDA tensors."""
import sys
import pathlib

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import test_recurrent_models as models  # noqa: E402

import seqfuse  # noqa: E402
from helpers import check_against_eager  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_triton(kind, report, n):
    """``n`` rewrites of ``kind``, every call of it on the triton path, none falling back."""
    assert report.count(kind) == n, str(report)
    calls = report.runtime.get(kind, {})
    assert calls.get("triton", 0) >= n and sum(v for p, v in calls.items() if p != "triton") == 0, calls
    assert not seqfuse.fallbacks().get(kind), seqfuse.fallbacks()


@pytest.mark.parametrize("algorithm", ["chunked"])      # the decode form has its own tests (T <= 16)
def test_mamba2_ssd_runs_on_triton(algorithm):
    model, tokens = models.tiny_mamba2(24)          # two chunks of 16, the second padded
    model, tokens = model.to(DEVICE).eval(), tokens.to(DEVICE)
    seqfuse.reset_counters()
    report = check_against_eager(model, tokens, options={
        "downstream": "aot_eager", "runtime": "triton", "algorithm": {"ssd": algorithm}})
    on_triton("ssd", report, model.lm.config.num_hidden_layers)


@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_mamba_scan_runs_on_triton(algorithm, monkeypatch):
    # the loop path; 32 channels and one sequence: the interpreter runs the backward kernel once per
    # program, about a second each
    model, tokens = models.tiny_mamba(layers=1, hidden=16, batch=1)
    model, tokens = model.to(DEVICE).eval(), tokens.to(DEVICE)
    if algorithm == "chunked":
        # the discretized scan's exp(Δ·A) and Δ·B·x are formed in the kernels, never materialized
        from seqfuse.lowering.triton import scan as tscan

        def materialized(*args):
            raise AssertionError("the chunked triton scan materialized its decays / inputs")
        monkeypatch.setattr(tscan, "discretize", materialized)
    seqfuse.reset_counters()
    report = check_against_eager(model, tokens, options={
        "downstream": "aot_eager", "runtime": "triton", "algorithm": {"scan": algorithm}})
    on_triton("scan", report, 1)
    (ir,) = [r.ir for r in report.rewrites if r.kind == "scan"]
    assert "dt=%" in ir and "u=%" in ir and "c=%" in ir, ir


def test_rwkv7_loop_runs_on_the_recurrent_triton_kernels():
    # RWKV-7's step loop (tests/delta_spellings.py): one delta op with a read key, an erase key and
    # read="previous", forward and backward on the recurrent kernels, every gradient equal to eager's
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from delta_spellings import rwkv7_loop
    B, T, H, N = 1, 9, 2, 8
    gen = torch.Generator().manual_seed(0)
    r, w, k, v = (torch.randn(B, T, H, N, generator=gen).to(DEVICE).requires_grad_() for _ in range(4))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1).to(DEVICE).requires_grad_()
    a = torch.sigmoid(torch.randn(B, T, H, N, generator=gen)).to(DEVICE)
    seqfuse.reset_counters()
    report = check_against_eager(lambda r, w, k, v, kk: rwkv7_loop(r, w, k, v, -kk, kk * a), r, w, k, v, kk,
                                 options={"runtime": "triton", "algorithm": {"delta": "recurrent"}})
    on_triton("delta", report, 1)
    (ir,) = [x.ir for x in report.rewrites if x.kind == "delta"]
    assert "read=previous" in ir and "p=%" in ir and "e=%" in ir and "algo=recurrent" in ir, ir
    backward = seqfuse.counters()["delta_backward"]
    assert backward["triton"] == 1 and sum(backward.values()) == 1, backward

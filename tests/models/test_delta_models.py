"""Qwen3-Next (transformers, tiny config, random weights) on its torch path: each Gated DeltaNet layer's
chunked WY program becomes one seqfuse.delta (the C kernel's step loop on CPU), and the logits and every
parameter gradient equal eager to 1e-5 -- or, for a value eager itself computes no better in fp32, are
within 4x eager's own error against an fp64 oracle (the rule of tests/fuzz).  That applies to A_log and
dt_bias only: they reach the loss through the log-decays alone, whose fp32 gradient is a sum of
cancelling terms, so any reordering of the fp32 work (the chunked vs the step-by-step algorithm, or
either vs transformers' own step-by-step function) moves them by 1-3e-5.  The oracle is the same model
in fp64 with modeling_qwen3_next's casts to fp32 kept in fp64.
The rest of the graph runs on the "eager" downstream: aot_eager's own backward of this model's torch
path fails in torch (a ``view`` of a non-contiguous gradient), with or without seqfuse.
The check is the example's own (examples/qwen3_next.py: ``compare``, ``within``), so this also runs it.
"""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

import seqfuse
pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "qwen3_next.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_qwen3_next", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def example():
    ex = _example()
    previous = ex.torch_path()
    yield ex
    ex.restore(previous)


def test_qwen3_next_one_delta_per_linear_attention_layer_and_gradients_equal_eager(example):
    model, ids = example.build(seq_len=256, batch=1, linear_layers=2)   # 4 chunks of 64
    report, rows = example.compare(model, ids, {"downstream": "eager"})
    assert report.count("delta") == 2, str(report)
    assert not [m for m in report.near_misses if m.kind in ("delta", "scan")], str(report)
    for r in report.rewrites:
        if r.kind == "delta":
            assert "gate=scalar" in r.ir and "algo=recurrent" in r.ir, r.ir   # the C kernel on CPU
    counts = seqfuse.counters()
    assert counts["delta"]["cpu"] == 2 and counts["delta_backward"]["cpu"] == 2, counts
    assert len(rows) == 1 + len(list(model.parameters()))
    for name, err, err64, eager64 in rows:
        assert example.within(err, err64, eager64), \
            f"{name}: relative error {err:.3g} vs eager, {err64:.3g} vs fp64 (eager's {eager64:.3g})"
        if err >= 1e-5:
            assert name.endswith(("linear_attn.A_log", "linear_attn.dt_bias")), name

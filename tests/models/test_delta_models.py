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


@pytest.mark.parametrize("seq_len", [128, 200])
def test_qwen3_next_dynamic_lengths(example, seq_len):
    # dynamic=True (what Dynamo's automatic-dynamic recompile gives a training run of varying lengths): the
    # sequence length is symbolic, but Dynamo unrolled the loop over chunks for the guarded chunk count, so
    # the chunk size, the count and the padded length are pinned by the guards and the program is read as in
    # the static case: 2 chunks (the short-program reading) and 200 padded to 4 chunks (a loop of 3, then
    # the last chunk, whose state update is dead).  Logits and every gradient as in the static test
    model, ids = example.build(seq_len=seq_len, batch=1, linear_layers=2)
    report, rows = example.compare(model, ids, {"downstream": "eager"}, dynamic=True)
    assert report.count("delta") == 2, str(report)
    assert not [m for m in report.near_misses if m.kind in ("delta", "scan")], str(report)
    for name, err, err64, eager64 in rows:
        assert example.within(err, err64, eager64), \
            f"{name}: relative error {err:.3g} vs eager, {err64:.3g} vs fp64 (eager's {eager64:.3g})"
        if err >= 1e-5:
            assert name.endswith(("linear_attn.A_log", "linear_attn.dt_bias")), name


OLMO_HYBRID = "transformers.models.olmo_hybrid.modeling_olmo_hybrid"


def build_olmo_hybrid(seq_len=256, linear_layers=2, seed=0):
    """A tiny random-weight OlmoHybridForCausalLM (``linear_layers`` Gated DeltaNet layers, then one attention
    layer) and token ids (1, seq_len)."""
    import torch
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM
    torch.manual_seed(seed)
    cfg = OlmoHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=linear_layers + 1,
        num_attention_heads=4, num_key_value_heads=2,
        layer_types=["linear_attention"] * linear_layers + ["full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        pad_token_id=0, eos_token_id=1)
    return OlmoHybridForCausalLM(cfg), torch.randint(0, cfg.vocab_size, (1, seq_len))


def test_olmo_hybrid_one_delta_per_linear_attention_layer_and_gradients_equal_eager():
    # OLMo hybrid's Gated DeltaNet layers run transformers' torch_chunk_gated_delta_rule (the same WY program
    # as Qwen3-Next, β scaled by 2 for negative eigenvalues): each becomes one seqfuse.delta; the logits and
    # every parameter gradient equal eager to 1e-5 (or, for A_log / dt_bias, the fp64 rule above)
    pytest.importorskip(OLMO_HYBRID)
    ex = _example()
    previous = ex.torch_path(OLMO_HYBRID)
    try:
        lm, ids = build_olmo_hybrid()
        model = ex.Logits(lm)
        report, rows = ex.compare(model, ids, {"downstream": "eager"}, OLMO_HYBRID)
    finally:
        ex.restore(previous, OLMO_HYBRID)
    assert report.count("delta") == 2, str(report)
    assert not [m for m in report.near_misses if m.kind in ("delta", "scan")], str(report)
    assert all("gate=scalar" in r.ir for r in report.rewrites if r.kind == "delta")
    assert len(rows) == 1 + len(list(model.parameters()))
    for name, err, err64, eager64 in rows:
        assert ex.within(err, err64, eager64), \
            f"{name}: relative error {err:.3g} vs eager, {err64:.3g} vs fp64 (eager's {eager64:.3g})"
        if err >= 1e-5:
            assert name.endswith(("linear_attn.A_log", "linear_attn.dt_bias")), name


KIMI_LINEAR = "transformers.models.kimi_linear.modeling_kimi_linear"
KIMI_KERNELIZED = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention", "causal_conv1d_fn",
                   "causal_conv1d_update")


def build_kimi_linear(seq_len=64, linear_layers=2, seed=0):
    """A tiny random-weight KimiLinearForCausalLM (``linear_layers`` KDA layers, then one MLA attention layer;
    dense MLPs) and token ids (1, seq_len)."""
    import torch
    from transformers import KimiLinearConfig, KimiLinearForCausalLM
    torch.manual_seed(seed)
    n = linear_layers + 1
    cfg = KimiLinearConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=2,
        num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, layer_types=["linear_attention"] * linear_layers + ["full_attention"],
        mlp_layer_types=["dense"] * n, linear_head_dim=8, linear_num_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    return KimiLinearForCausalLM(cfg), torch.randint(0, cfg.vocab_size, (1, seq_len))


def test_kimi_linear_one_vector_gated_delta_per_kda_layer_and_gradients_equal_eager():
    # Kimi Linear's KDA layers run transformers' chunk_kimi_delta_attention (a decay per key channel, the UT
    # inverse by forward substitution written in place); one KDA layer and chunks of 16 (the default is 64) keep the
    # unrolled program small: T = 64 is 4 chunks.  Each layer becomes one seqfuse.delta {gate=vector}; the
    # logits and every parameter gradient equal eager to 1e-5 (or, for the forget gate's A_log / dt_bias,
    # the fp64 rule above)
    import functools
    m = pytest.importorskip(KIMI_LINEAR)
    ex = _example()
    previous = ex.torch_path(KIMI_LINEAR, KIMI_KERNELIZED)
    m.chunk_kimi_delta_attention = functools.partial(m.chunk_kimi_delta_attention, chunk_size=16)
    try:
        lm, ids = build_kimi_linear(linear_layers=1)
        model = ex.Logits(lm)
        report, rows = ex.compare(model, ids, {"downstream": "eager"}, KIMI_LINEAR)
    finally:
        ex.restore(previous, KIMI_LINEAR)
    assert report.count("delta") == 1, str(report)
    assert not [m for m in report.near_misses if m.kind == "delta"], str(report)
    assert all("gate=vector" in r.ir for r in report.rewrites if r.kind == "delta")
    assert len(rows) == 1 + len(list(model.parameters()))
    for name, err, err64, eager64 in rows:
        assert ex.within(err, err64, eager64), \
            f"{name}: relative error {err:.3g} vs eager, {err64:.3g} vs fp64 (eager's {eager64:.3g})"
        if err >= 1e-5:
            assert name.endswith(("forget_gate.A_log", "forget_gate.dt_bias")), name

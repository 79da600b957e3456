"""Sequence-parallel ssd, scan and causal long_conv (seqfuse/lowering/sequence_parallel.py): one
sequence of T = 4096 (long_conv: 64 and 96) split evenly over 2 and 4 gloo ranks equals the
single-device op on the whole sequence in its outputs, its final state and the gradients of every
operand (fp32 relative error < 1e-5); the recurrences need one collective forward and one backward
whose payload is O(state), independent of T."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed.harness import spawn

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def _ssd_operands(T, decay, h0):
    g = torch.Generator().manual_seed(0)
    B, H, P, N = 1, 2, 4, 8
    x = torch.randn(B, T, H, P, generator=g)
    b = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    c = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    a = {"none": None, "scalar": -0.05 * torch.rand(B, T, H, generator=g),
         "vector": -0.05 * torch.rand(B, T, H, N, generator=g)}[decay]
    d = torch.randn(H, generator=g)
    s0 = torch.randn(B, H, P, N, generator=g) if h0 else None
    Ry, Rh = torch.randn(B, T, H, P, generator=g), torch.randn(B, H, P, N, generator=g)
    return dict(x=x, b=b, c=c, a=a, d=d, h0=s0), Ry, Rh


def _leaves(ops):
    return {k: v.clone().requires_grad_(True) for k, v in ops.items() if v is not None}


def ssd_rank(rank, world, T, decay, h0):
    from seqfuse.lowering import sequence_parallel as sp
    ops, Ry, Rh = _ssd_operands(T, decay, h0)
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    timed = {"x", "b", "c", "a"}
    mine = _leaves({k: (v[:, sl] if k in timed else v) for k, v in ops.items() if v is not None})
    sp.reset_payload_bytes()
    y, h = sp.ssd_sequence_parallel(mine["x"], mine["b"], mine["c"], mine.get("a"), mine["d"], mine.get("h0"),
                                    decay, 64, "chunked", "auto")
    forward_bytes = sp.payload_bytes()
    loss = (y * Ry[:, sl]).sum() + ((h * Rh).sum() if rank == world - 1 else 0)
    loss.backward()
    out = {"y": y.detach(), "h": h.detach(), "grads": {k: v.grad for k, v in mine.items()},
           "bytes": (forward_bytes, sp.payload_bytes() - forward_bytes)}
    if rank == 0:  # the single-device op on the whole sequence
        full = _leaves(ops)
        yr, hr = torch.ops.seqfuse.ssd(full["x"], full["b"], full["c"], full.get("a"), full["d"], full.get("h0"),
                                       decay, 64, "chunked", "auto")
        ((yr * Ry).sum() + (hr * Rh).sum()).backward()
        out["ref"] = {"y": yr.detach(), "h": hr.detach(), "grads": {k: v.grad for k, v in full.items()}}
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(results, world, timed, shared, final_rank=-1):
    ref = results[0]["ref"]
    assert rel(torch.cat([r["y"] for r in results], dim=timed["y"]), ref["y"]) < 1e-5
    assert rel(results[final_rank]["h"], ref["h"]) < 1e-5
    for k, g in ref["grads"].items():
        if k in shared:       # operands every rank reads whole: their gradients add up
            got = sum(r["grads"][k] for r in results if r["grads"].get(k) is not None)
        else:                 # operands split along time
            got = torch.cat([r["grads"][k] for r in results], dim=timed[k])
        assert rel(got, g) < 1e-5, f"gradient of {k}: relative error {rel(got, g):.3g}"


def _scan_operands(T, kind, h0):
    g = torch.Generator().manual_seed(1)
    Bt, D, N = 1, 3, 4
    if kind == "discretized":  # Mamba-1: A (D, 1, N) log-decays, B/C (B, 1, T, N), Δ/u (B, D, T, 1)
        ops = dict(a=-torch.rand(D, 1, N, generator=g), b=torch.randn(Bt, 1, T, N, generator=g),
                   c=torch.randn(Bt, 1, T, N, generator=g),
                   dt=0.05 * torch.rand(Bt, D, T, 1, generator=g), u=torch.randn(Bt, D, T, 1, generator=g))
    else:
        ops = dict(a=0.9 + 0.1 * torch.rand(Bt, D, T, N, generator=g), b=torch.randn(Bt, D, T, N, generator=g))
        if kind == "readout":
            ops["c"] = torch.randn(Bt, D, T, N, generator=g)
    if h0:
        ops["h0"] = torch.randn(Bt, D, N, generator=g)
    return ops


def scan_rank(rank, world, T, kind, h0, reverse):
    from seqfuse.lowering import sequence_parallel as sp
    ops = _scan_operands(T, kind, h0)
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    mine = _leaves({k: (v[..., sl, :] if v.dim() >= 2 and v.shape[-2] == T else v) for k, v in ops.items()})
    y, h = sp.scan_sequence_parallel(mine["a"], mine["b"], mine.get("c"), mine.get("h0"), reverse, "chunked",
                                     "auto", mine.get("dt"), mine.get("u"))
    gen = torch.Generator().manual_seed(2)
    # y is (*R, T, N) without a readout, (*R, T) with one
    Ry = torch.randn((*y.shape[:-2], T, y.shape[-1]) if mine.get("c") is None else (*y.shape[:-1], T),
                     generator=gen)
    Rh = torch.randn(h.shape, generator=gen)
    Ry_mine = Ry[..., sl, :] if mine.get("c") is None else Ry[..., sl]
    last = 0 if reverse else world - 1
    ((y * Ry_mine).sum() + ((h * Rh).sum() if rank == last else 0)).backward()
    out = {"y": y.detach(), "h": h.detach(), "grads": {k: v.grad for k, v in mine.items()}}
    if rank == 0:
        full = _leaves(ops)
        yr, hr = torch.ops.seqfuse.scan(full["a"], full["b"], full.get("c"), full.get("h0"), reverse, "chunked",
                                        "auto", full.get("dt"), full.get("u"))
        ((yr * Ry).sum() + (hr * Rh).sum()).backward()
        out["ref"] = {"y": yr.detach(), "h": hr.detach(), "grads": {k: v.grad for k, v in full.items()}}
    return out


def conv_rank(rank, world, T, Lk, algorithm):
    """A causal long_conv with a per-channel kernel of Lk taps, a skip d (C, 1), a gate over time
    and a bias, on 1/world of a length-T sequence."""
    from seqfuse.lowering import sequence_parallel as sp
    g = torch.Generator().manual_seed(3)
    Bt, C = 2, 3
    ops = dict(u=torch.randn(Bt, C, T, generator=g), k=torch.randn(C, Lk, generator=g) / Lk ** 0.5,
               d=torch.randn(C, 1, generator=g), gate=torch.randn(Bt, C, T, generator=g),
               bias=torch.randn(C, 1, generator=g))
    Ry = torch.randn(Bt, C, T, generator=g)
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    mine = _leaves({k: (v[..., sl] if k in ("u", "gate") else v) for k, v in ops.items()})
    y = sp.long_conv_sequence_parallel(mine["u"], mine["k"], mine["d"], mine["gate"], mine["bias"], True, 0, 1.0,
                                       "silu", algorithm, "auto")
    (y * Ry[..., sl]).sum().backward()
    out = {"y": y.detach(), "h": torch.zeros(()), "grads": {k: v.grad for k, v in mine.items()}}
    if rank == 0:
        full = _leaves(ops)
        yr = torch.ops.seqfuse.long_conv(full["u"], full["k"], full["d"], full["gate"], full["bias"], True, 0, 1.0,
                                         "silu", algorithm, "auto")
        (yr * Ry).sum().backward()
        out["ref"] = {"y": yr.detach(), "h": torch.zeros(()), "grads": {k: v.grad for k, v in full.items()}}
    return out


def cases_rank(rank, world, cases):
    """Every case on this rank, in order (one process start for all of them)."""
    fns = {"ssd": ssd_rank, "scan": scan_rank, "conv": conv_rank}
    return [fns[kind](rank, world, *args) for kind, args in cases]


SSD_CASES = [("scalar", True), ("vector", False), ("none", True)]
SCAN_CASES = [("plain", True, False), ("readout", False, True), ("discretized", True, False)]
# (T, kernel taps, algorithm): Mamba's short depthwise conv; a kernel longer than a slice (its
# halo spans several earlier ranks), by FFT
CONV_CASES = [(64, 4, "direct"), (96, 70, "fft")]
B, H, P, N = 1, 2, 4, 8  # the ssd operands' sizes (_ssd_operands)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_one_device(world):
    """T = 4096 split evenly: every ssd and scan case equals the op on the whole sequence."""
    cases = [("ssd", (4096, decay, h0)) for decay, h0 in SSD_CASES]
    cases += [("scan", (4096, kind, h0, reverse)) for kind, h0, reverse in SCAN_CASES]
    cases += [("conv", (T, Lk, algo)) for T, Lk, algo in CONV_CASES]
    cases += [("ssd", (512, "scalar", False))]  # the payload at another length
    per_rank = spawn(cases_rank, world, cases)
    results = [[r[i] for r in per_rank] for i in range(len(cases))]
    for (decay, h0), res in zip(SSD_CASES, results):
        _check(res, world, dict(y=1, x=1, b=1, c=1, a=1), shared={"d", "h0"})
        # one gathered pair per rank forward; one all-reduce of the gathered table backward
        fwd, bwd = res[0]["bytes"]
        state = B * H * P * N + B * H * (N if decay == "vector" else 1)
        assert fwd == 4 * state and bwd == 4 * state * world, (decay, fwd, bwd)
    for (kind, h0, reverse), res in zip(SCAN_CASES, results[len(SSD_CASES):]):
        y_axis = -2 if kind == "plain" else -1   # a readout's y has no state axis
        timed = dict(y=y_axis, a=-2, b=-2, c=-2, dt=-2, u=-2)
        shared = {"h0"} | ({"a"} if kind == "discretized" else set())   # Mamba's A is (D, 1, N): no time axis
        # a reversed scan's final state (the state at t = 0) is the first rank's
        _check(res, world, timed, shared, final_rank=0 if reverse else -1)
    conv_results = results[len(SSD_CASES) + len(SCAN_CASES):-1]
    for (T, Lk, algo), res in zip(CONV_CASES, conv_results):
        _check(res, world, dict(y=-1, u=-1, gate=-1), shared={"k", "d", "bias"})
    # the collectives' payload does not depend on the sequence length
    # (case 0 and the last case are both scalar-decay ssd, at T = 4096 and T = 512)
    assert results[-1][0]["bytes"] == results[0][0]["bytes"], (results[-1][0]["bytes"], results[0][0]["bytes"])


def mamba2_rank(rank, world, T):
    """transformers' Mamba-2 (its torch path) compiled with option sequence_parallel on this rank's
    slice of the tokens; rank 0 also runs the whole sequence eagerly in one process."""
    import seqfuse
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                    expand=2, n_groups=2, state_size=16, chunk_size=16, conv_kernel=4,
                                    use_cache=False)
    model = transformers.Mamba2ForCausalLM(cfg)
    tokens = torch.randint(0, 64, (2, T))
    R = torch.randn(2, T, 64)
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    out = {}
    if rank == 0:
        ref = model(tokens, use_cache=False).logits
        (ref * R).sum().backward()
        out["ref"] = {"y": ref.detach(), "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
        model.zero_grad(set_to_none=True)

    def logits(ids):
        return model(ids, use_cache=False).logits
    report = seqfuse.explain(logits, tokens[:, sl], options={"downstream": "aot_eager",
                                                             "sequence_parallel": {"group": None}})
    (report.output * R[:, sl]).sum().backward()
    out["y"] = report.output.detach()
    out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    out["counts"] = {kind: report.count(kind) for kind in ("ssd", "long_conv")}
    return out


def test_mamba2_sequence_parallel_equals_one_process():
    """Each of 2 ranks holds half of the tokens; the compiled model's logits and the sum over ranks of
    every parameter's gradient equal one process on the whole sequence (the causal conv1d reads
    its halo from the previous rank, the SSD its incoming state)."""
    pytest.importorskip("transformers")
    results = spawn(mamba2_rank, 2, 64)   # two chunks of 16 per rank
    ref = results[0]["ref"]
    for r in results:
        assert r["counts"] == {"ssd": 2, "long_conv": 2}, r["counts"]
    assert rel(torch.cat([r["y"] for r in results], dim=1), ref["y"]) < 1e-5
    for k, g in ref["grads"].items():
        got = sum(r["grads"][k] for r in results)
        assert rel(got, g) < 1e-5, f"gradient of {k}: relative error {rel(got, g):.3g}"


def attention_rank(rank, world):
    import seqfuse

    def attend(q, k, v):
        s = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    q = torch.randn(1, 2, 8, 4)
    try:
        torch.compile(attend, backend="seqfuse", options={"sequence_parallel": {"group": None}})(q, q, q)
    except Exception as exc:  # Dynamo wraps the backend's error
        return f"{type(exc).__name__}: {exc}"
    return "compiled"


def test_attention_under_sequence_parallel_is_refused_clearly():
    for message in spawn(attention_rank, 2):
        assert "sequence_parallel" in message and "attention op at" in message and "not supported" in message, \
            message


def test_option_errors_name_the_problem():
    from seqfuse.compiler.options import Options
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            Options.from_dict({"sequence_parallel": {"group": None}})
    with pytest.raises(ValueError, match="'sequence_parallel' must be None or a dict"):
        Options.from_dict({"sequence_parallel": {"grop": None}})
    with pytest.raises(ValueError, match="'sequence_parallel' must be None or a dict"):
        Options.from_dict({"sequence_parallel": True})
    assert Options.from_dict({}).sequence_parallel is None


def nonfinite_decay_rank(rank, world):
    """A quadratic ssd form whose decay is a difference of one cumulative sum, compiled with
    sequence_parallel, called with a -inf log-decay: the op refuses the call and the graph, which
    runs on one rank's slice, cannot be run as written instead."""
    import seqfuse

    def fn(X, A, B, C):
        t = A.shape[1]
        cs = A.permute(0, 2, 1).cumsum(-1)
        seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -torch.inf)
        return torch.einsum("blhn,bshn,bhls,bshp->blhp", C, B, seg.exp(), X)
    g = torch.Generator().manual_seed(rank)
    X, B, C = (torch.randn(1, 8, 2, k, generator=g) for k in (3, 4, 4))
    A = -torch.rand(1, 8, 2, generator=g)
    A[0, 5, 1] = -torch.inf
    compiled = torch.compile(fn, backend="seqfuse", options={"downstream": "aot_eager",
                                                             "sequence_parallel": {"group": None}})
    try:
        compiled(X, A, B, C)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ran"


def test_a_refused_call_under_sequence_parallel_raises_clearly():
    for message in spawn(nonfinite_decay_rank, 2):
        assert message.startswith("RuntimeError") and "rank's slice" in message and "non-finite log-decay" in message, \
            message

"""One command that measures everything on one GPU, time-boxed, printing as it goes.

    python benchmarks/gpu_suite.py                      # on a CUDA GPU: about 8 minutes at most
    python benchmarks/gpu_suite.py --json out.json      # also write every row as JSON
    python benchmarks/gpu_suite.py --only attention,models
    python benchmarks/gpu_suite.py --smoke              # every row at tiny shapes on CPU through
                                                        # TRITON_INTERPRET=1: checks the script, times nothing

Stages, in priority order, each with its own time box (``--budget`` scales them; a stage
that runs out of time prints ``cut`` and the next one starts; a row that hangs is
interrupted by an alarm at the end of its stage's box):

  kernels     ``pytest tests/kernels`` compiled on CUDA; failing tests are named as they fail
  attention   seqfuse::attention (triton) vs SDPA flash (FA2), FlexAttention and inductor on the
              naive program: D 64/128, causal and not, L 2k/8k, forward and forward+backward;
              TFLOP/s and seqfuse/flash.  seqfuse and flash first for every shape, then the
              peers that compile per shape (flex, inductor) while time remains
  recurrence  ssd (decay none / scalar / vector) at Mamba-2 2.7B-like sizes (H=80, P=64, N=128),
              the gated delta rule (H=16, K=V=128) and the discretized scan (Mamba-1's selective
              scan) vs mamba_ssm and fla when they import (why not is printed when they don't)
              and the eager reference
  long_conv   seqfuse::long_conv (fft, direct) vs the torch.fft program eager and under
              inductor; low-precision inputs are upcast for torch.fft, as a user must
              (cuFFT has no bf16)
  models      whole models (HF Llama, Mamba, Mamba-2; the Hyena example): eager vs inductor vs
              seqfuse, forward and forward+backward ms, and first-call (compile) seconds, with the
              paths seqfuse's ops ran (``seqfuse.counters()``); last, the Llama trained with
              ``gradient_checkpointing_enable()`` (forward+backward only: the mixers inside
              activation-checkpointed layers)
  resources   registers and spills of every seqfuse Triton kernel the run compiled (sm_90 spills)

Every row is printed the moment it is measured, and a markdown table of all rows is
printed at the end (so a cut run still reports).  On CPU without ``--smoke`` it says why it
cannot measure and exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# stage -> seconds of its time box on a GPU (sum: 480 s, the 8-minute target)
BUDGETS = {"kernels": 110, "attention": 130, "recurrence": 90, "long_conv": 40, "models": 100, "resources": 10}
SMOKE_BUDGETS = {"kernels": 60, "attention": 40, "recurrence": 40, "long_conv": 30, "models": 120, "resources": 10}


class StageTimeout(Exception):
    """The stage's time box ran out in the middle of a row."""


class Suite:
    """Collects rows, prints each as it arrives, and keeps the stage deadlines."""

    def __init__(self, device: str, smoke: bool):
        self.device, self.smoke = device, smoke
        self.rows: list[dict] = []
        self.deadline = math.inf

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        return self.time_left() <= 0

    def add(self, stage: str, **row) -> dict:
        row = {"stage": stage, **row}
        self.rows.append(row)
        print(f"  [{stage}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "stage"), flush=True)
        return row

    @contextlib.contextmanager
    def stage(self, name: str, seconds: float):
        print(f"\n== {name} (time box {seconds:.0f} s) ==", flush=True)
        start = time.monotonic()
        self.deadline = start + seconds
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds + 5)  # a hung row is interrupted 5 s after the box
        try:
            yield
        except StageTimeout:
            print(f"  [{name}] cut: the time box ran out inside a row", flush=True)
            self.add(name, cut=True)
        except Exception as exc:  # a stage that fails must not stop the others
            print(f"  [{name}] failed: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            self.add(name, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            print(f"  [{name}] {time.monotonic() - start:.1f} s", flush=True)
            self.deadline = math.inf


def _alarm(signum, frame):
    raise StageTimeout()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}")
    return str(v)


def _ms(fn, suite: Suite, backward: bool = False) -> float:
    """Milliseconds of one call (forward, or forward + backward of the sum of the outputs):
    triton.testing.do_bench on a GPU, the wall time of one call under --smoke."""
    import torch

    def step():
        out = fn()
        if backward:
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.backward(torch.ones_like(out))
    if suite.device != "cuda":
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start)
    from triton.testing import do_bench
    return do_bench(step, warmup=5, rep=20)


def _try_ms(fn, suite: Suite, backward: bool = False) -> float | str:
    """Milliseconds, or the reason the implementation could not run (printed, not fatal)."""
    import torch
    try:
        return _ms(fn, suite, backward)
    except StageTimeout:
        raise
    except Exception as exc:  # a peer's API drift or an OOM must not stop the table
        if suite.device == "cuda":
            torch.cuda.empty_cache()
        return f"{type(exc).__name__}: {str(exc)[:100]}"


def _peer(module: str, name: str):
    """(function, None) or (None, why it does not import) -- the reason is printed, never hidden."""
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:160]}"


# ----------------------------------------------------------------------------------------------
# stages

def stage_kernels(suite: Suite) -> None:
    """tests/kernels on this device; on CPU (--smoke) a small interpreted subset."""
    import importlib.util
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=line"]
    cmd += ["tests/kernels"] if not suite.smoke else ["tests/kernels/test_cache.py"]
    if not suite.smoke and importlib.util.find_spec("xdist") is not None:
        # ~380 tests, most of them a Triton compile: in parallel on the GPU machine's cores
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    passed = failed = skipped = 0
    failures: list[str] = []
    try:
        for line in proc.stdout:
            if " PASSED" in line:
                passed += 1
            elif " SKIPPED" in line:
                skipped += 1
            elif " FAILED" in line or " ERROR" in line:
                failed += 1
                # "tests/kernels/x.py::test FAILED", or under xdist "[gw1] [ 3%] FAILED tests/...::test"
                failures.append(next((w for w in line.split() if "::" in w), line.strip()))
                print(f"  [kernels] {line.strip()}", flush=True)
            elif line.startswith(("E ", "/")) or "Error" in line[:80]:
                print(f"  [kernels] {line.rstrip()[:300]}", flush=True)  # --tb=line: why a test failed
            if (passed + failed) and (passed + failed) % 50 == 0 and " PASSED" in line:
                print(f"  [kernels] {passed} passed, {failed} failed so far", flush=True)
            if suite.out_of_time():
                proc.kill()
                print("  [kernels] cut: the time box ran out", flush=True)
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    suite.add("kernels", passed=passed, failed=failed, skipped=skipped, failures=",".join(failures[:20]) or "-")


def _attention_naive(q, k, v, causal):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(torch_triu(L, s.device), float("-inf"))
    return s.float().softmax(-1).to(q.dtype) @ v


def torch_triu(L, device):
    import torch
    return torch.triu(torch.ones(L, L, dtype=torch.bool, device=device), 1)


def stage_attention(suite: Suite) -> None:
    import torch
    import torch.nn.functional as F

    import seqfuse.lowering.attention_op  # noqa: F401  (registers the op and its triton path)
    dev, smoke = suite.device, suite.smoke
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = [(D, causal, L) for L in ((2048, 8192) if not smoke else (48,)) for D in (64, 128)
              for causal in (True, False)]
    if smoke:
        shapes = [(16, c, 48) for c in (True, False)]

    def inputs(D, L):
        tokens = 16384 if not smoke else 48
        B, H = max(1, tokens // L), (2048 // D if not smoke else 2)
        return B, H, [torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]

    def flops(B, H, L, D, causal, backward):
        return 4 * B * H * L * L * D * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)

    def seqfuse_fn(q, k, v, causal):
        attrs = (None, "causal" if causal else "none", 0, 0, float("-inf"), False, 1, None, 0.0, "nan", 0, "triton")
        return lambda: torch.ops.seqfuse.attention(q, k, v, None, None, *attrs)[0]

    def flash_fn(q, k, v, causal):
        if dev != "cuda":
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    results: dict = {}
    # pass 1: seqfuse and flash (no per-shape compile) for every shape
    for D, causal, L in shapes:
        if suite.out_of_time():
            print("  [attention] cut: the time box ran out", flush=True)
            break
        B, H, (q, k, v) = inputs(D, L)
        for backward in (False, True):
            row = {}
            for name, make in (("seqfuse", seqfuse_fn), ("flash", flash_fn)):
                row[name] = _try_ms(make(q, k, v, causal), suite, backward)
            printed = _attention_row(suite, D, causal, L, backward, B, H, row, flops)
            results[(D, causal, L, backward)] = (B, H, row, printed)
        del q, k, v
    # pass 2: the peers that compile per shape, while time remains
    for (D, causal, L, backward), (B, H, row, printed) in list(results.items()):
        if suite.out_of_time():
            print("  [attention] flex / inductor cut: the time box ran out", flush=True)
            break
        _, _, (q, k, v) = inputs(D, L)
        if dev == "cuda":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            torch._dynamo.reset()
            flex = torch.compile(flex_attention)
            mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L) if causal else None
            row["flex"] = _try_ms(lambda: flex(q, k, v, block_mask=mask), suite, backward)
        else:
            row["flex"] = "needs CUDA"
        if L <= 8192:
            torch._dynamo.reset()
            naive = torch.compile(_attention_naive, backend="inductor" if dev == "cuda" else "aot_eager")
            row["inductor"] = _try_ms(lambda: naive(q, k, v, causal), suite, backward)
        suite.rows.remove(printed)  # the row again, with the peers' columns
        _attention_row(suite, D, causal, L, backward, B, H, row, flops, peers=True)
        del q, k, v


def _attention_row(suite, D, causal, L, backward, B, H, row, flops, peers=False):
    fl = flops(B, H, L, D, causal, backward)
    tf = {f"{n}_tflops": (fl / (ms * 1e-3) / 1e12 if isinstance(ms, float) else ms) for n, ms in row.items()}
    ratio = row["seqfuse"], row["flash"]
    extra = {"seqfuse/flash": ratio[1] / ratio[0]} if all(isinstance(x, float) for x in ratio) else {}
    if peers and isinstance(row.get("flex"), float) and isinstance(row["seqfuse"], float):
        extra["seqfuse/flex"] = row["flex"] / row["seqfuse"]
    return suite.add("attention", D=D, causal=causal, L=L, B=B, H=H, pass_="fwd+bwd" if backward else "fwd", **tf, **extra)


def stage_recurrence(suite: Suite) -> None:
    """Two passes, like the attention stage: seqfuse and the eager reference for every row first,
    then the peers (mamba_ssm, fla: they autotune dozens of configs per kernel on first use) while
    the time box lasts, each row printed again with their columns."""
    rows = _recurrence_rows(suite)
    done = []
    for key, make, ours, peers in rows:
        if suite.out_of_time():
            print("  [recurrence] cut: the time box ran out", flush=True)
            break
        args = make()
        row = {name: _try_ms(lambda f=fn: f(*args), suite, key["pass_"] == "fwd+bwd") for name, fn in ours.items()}
        done.append((key, make, peers, row, _ratio_row(suite, "recurrence", key, row)))
        del args
    for key, make, peers, row, printed in done:
        if not peers:
            continue
        if suite.out_of_time():
            print("  [recurrence] peers cut: the time box ran out", flush=True)
            break
        args = make()
        for name, fn in peers.items():
            row[name] = _try_ms(lambda f=fn: f(*args), suite, key["pass_"] == "fwd+bwd")
        suite.rows.remove(printed)
        _ratio_row(suite, "recurrence", key, row)
        del args


def _recurrence_rows(suite: Suite) -> list:
    """(key, make_inputs, {name: fn(*inputs)} of ours, {name: fn(*inputs)} of importable peers) per row."""
    import torch

    import seqfuse.lowering.delta_op  # noqa: F401
    import seqfuse.lowering.scan_op  # noqa: F401
    import seqfuse.lowering.ssd_op  # noqa: F401
    from seqfuse.lowering.reference.delta import delta_chunked
    from seqfuse.lowering.reference.scan import scan_reference
    from seqfuse.lowering.reference.ssd import ssd_chunked
    from gpu_recurrence import ssd_inputs
    dev, smoke = suite.device, suite.smoke
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    peer = {}
    for key, module, name in (("mamba_chunk", "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
                              ("mamba_scan", "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
                              ("fla_linear", "fla.ops.linear_attn", "chunk_linear_attn"),
                              ("fla_simple_gla", "fla.ops.simple_gla", "chunk_simple_gla"),
                              ("fla_gla", "fla.ops.gla", "chunk_gla"),
                              ("fla_delta", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule")):
        fn, why = _peer(module, name)
        peer[key] = fn
        if why:
            print(f"  [recurrence] {module}.{name} unavailable: {why}", flush=True)
    rows = []
    # Mamba-2 2.7B-like: H=80 heads of P=64, state N=128 (smoke: tiny)
    B, H, P, N = (1, 80, 64, 128) if not smoke else (1, 2, 8, 8)
    chunk = 64 if not smoke else 16
    for T in ((2048, 8192) if not smoke else (40,)):
        for decay in ("none", "scalar", "vector"):
            for backward in (False, True):
                key = dict(op=f"ssd/{decay}", T=T, B=B, H=H, P=P, N=N, pass_="fwd+bwd" if backward else "fwd")
                make = (lambda T=T, decay=decay, backward=backward:
                        ssd_inputs(T, decay, dtype, backward, B=B, H=H, P=P, N=N, dev=dev))
                ours = {"seqfuse": lambda x, b, c, a, decay=decay: torch.ops.seqfuse.ssd(
                            x, b, c, a, None, None, decay, chunk, "chunked", "triton"),
                        "eager": lambda x, b, c, a, decay=decay: ssd_chunked(x, b, c, a, decay=decay, chunk=chunk)}
                peers = {}
                if decay == "scalar" and peer["mamba_chunk"] is not None:
                    def mamba(x, b, c, a):
                        dt = (-a.detach()).clamp_min(1e-6)
                        return peer["mamba_chunk"](x / dt[..., None].to(x.dtype), dt, -torch.ones(H, device=dev),
                                                   b, c, chunk)
                    peers["mamba_ssm"] = mamba
                fla = peer[{"none": "fla_linear", "scalar": "fla_simple_gla", "vector": "fla_gla"}[decay]]
                if fla is not None:
                    peers["fla"] = (lambda x, b, c, a, fla=fla, decay=decay: fla(
                        *((c, b, x) if decay == "none" else (c, b, x, a.to(x.dtype) if decay == "vector" else a)),
                        scale=1.0))
                rows.append((key, make, ours, peers))
        # Gated DeltaNet (Qwen3-Next-like heads: K = V = 128): the triton chunked forward and backward
        Bd, Hd, K, V = (1, 16, 128, 128) if not smoke else (1, 2, 8, 8)
        for backward in (False, True):
            def make(T=T, backward=backward):
                q = torch.randn(Bd, T, Hd, K, device=dev, dtype=dtype).requires_grad_(backward)
                k = torch.nn.functional.normalize(torch.randn(Bd, T, Hd, K, device=dev), dim=-1).to(dtype)
                v = torch.randn(Bd, T, Hd, V, device=dev, dtype=dtype).requires_grad_(backward)
                beta = torch.rand(Bd, T, Hd, device=dev, dtype=dtype).requires_grad_(backward)
                g = (-torch.rand(Bd, T, Hd, device=dev) * 0.1).requires_grad_(backward)
                return q, k.requires_grad_(backward), v, beta, g
            ours = {"seqfuse": lambda q, k, v, beta, g: torch.ops.seqfuse.delta(
                        q, k, v, beta, g, None, "scalar", K ** -0.5, 64, "chunked", "triton")[0],
                    "eager": lambda q, k, v, beta, g: delta_chunked(q, k, v, beta, g, gate="scalar",
                                                                    scale=K ** -0.5)[0]}
            peers = {}
            if peer["fla_delta"] is not None:
                peers["fla"] = lambda q, k, v, beta, g: peer["fla_delta"](q, k, v, g, beta, scale=K ** -0.5)
            rows.append((dict(op="delta/scalar", T=T, B=Bd, H=Hd, K=K, V=V, pass_="fwd+bwd" if backward else "fwd"),
                         make, ours, peers))
        # RWKV-7-like generalized step (1.5B: 32 heads of 64; a vector gate, read key, erase key, read of the
        # state before its decay): the triton step loop against the general chunked form in torch ops
        Br, Hr, Nr = (1, 32, 64) if not smoke else (1, 2, 8)
        for backward in (False, True):
            def make(T=T, backward=backward):
                unit = lambda: torch.nn.functional.normalize(torch.randn(Br, T, Hr, Nr, device=dev), dim=-1)  # noqa: E731
                kk, a = unit(), torch.sigmoid(torch.randn(Br, T, Hr, Nr, device=dev))
                q, k, v = (torch.randn(Br, T, Hr, Nr, device=dev, dtype=dtype) for _ in range(3))
                g = -torch.exp(torch.randn(Br, T, Hr, Nr, device=dev) - 1)
                ops = (q, k, v, torch.ones(Br, T, Hr, device=dev, dtype=dtype), g, (-kk).to(dtype), (kk * a).to(dtype))
                return tuple(x.requires_grad_(backward) for x in ops)
            ours = {"seqfuse": lambda q, k, v, beta, g, p, e: torch.ops.seqfuse.delta(
                        q, k, v, beta, g, None, "vector", 1.0, 16, "recurrent", "triton", False, p, e, "previous")[0],
                    "eager": lambda q, k, v, beta, g, p, e: delta_chunked(q, k, v, beta, g, gate="vector", chunk=16,
                                                                          p=p, e=e, read="previous")[0]}
            rows.append((dict(op="delta/rwkv7", T=T, B=Br, H=Hr, K=Nr, V=Nr, pass_="fwd+bwd" if backward else "fwd"),
                         make, ours, {}))
        # Mamba-1 selective scan, discretized in the kernel: D = 2·d_model channels, N = 16
        Bs, D, Ns = (1, 5120, 16) if not smoke else (1, 8, 4)
        for backward in (False, True):
            def make(T=T, backward=backward):
                delta = torch.nn.functional.softplus(torch.randn(Bs, D, T, device=dev) - 2)
                A = -torch.rand(D, Ns, device=dev)
                u = torch.randn(Bs, D, T, device=dev, dtype=dtype)
                Bm, Cm = (torch.randn(Bs, Ns, T, device=dev, dtype=dtype) for _ in range(2))
                # the op's layout: A (D, 1, N), b/c (B, 1, T, N), dt/u (B, D, T, 1)
                ours = (A[:, None, :].clone().requires_grad_(backward),
                        Bm.transpose(1, 2)[:, None].clone().requires_grad_(backward), Cm.transpose(1, 2)[:, None],
                        delta[..., None].to(dtype).requires_grad_(backward), u[..., None].clone().requires_grad_(backward))
                theirs = [t.clone().requires_grad_(backward) for t in (u, delta.to(dtype), A, Bm, Cm)]
                return ours, theirs

            def seqfuse_scan(ours, theirs):
                A_, b_, c_, dt, uu = ours
                return torch.ops.seqfuse.scan(A_, b_, c_, None, False, "chunked", "triton", dt, uu)

            def eager_scan(ours, theirs):
                A_, b_, c_, dt, uu = ours
                return scan_reference(A_, b_, c_, dt=dt, u=uu, algorithm="chunked")
            peers = {}
            if peer["mamba_scan"] is not None:
                def mamba_scan(ours, theirs):
                    return peer["mamba_scan"](*theirs)
                peers["mamba_ssm"] = mamba_scan
            rows.append((dict(op="scan/selective", T=T, B=Bs, D=D, N=Ns, pass_="fwd+bwd" if backward else "fwd"),
                         make, {"seqfuse": seqfuse_scan, "eager": eager_scan}, peers))
    return rows


def _ratio_row(suite, stage, key, row):
    """ms per implementation, and peer/seqfuse ratios (above 1: seqfuse faster)."""
    ms = {f"{n}_ms": v for n, v in row.items()}
    ratios = {f"{n}/seqfuse": v / row["seqfuse"] for n, v in row.items()
              if n != "seqfuse" and isinstance(v, float) and isinstance(row["seqfuse"], float)}
    return suite.add(stage, **key, **ms, **ratios)


def stage_long_conv(suite: Suite) -> None:
    import torch

    import seqfuse.lowering.long_conv_op  # noqa: F401
    from gpu_long_conv import hyena
    dev, smoke = suite.device, suite.smoke
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, H = (4, 256) if not smoke else (1, 2)

    def upcast(u, k, D, v):
        """The torch.fft program as a user writes it for low-precision inputs: FFT in fp32."""
        return hyena(u.float(), k.float(), D.float(), v.float()).to(u.dtype)

    for L in ((4096, 16384) if not smoke else (48,)):
        for backward in (False, True):
            if suite.out_of_time():
                print("  [long_conv] cut: the time box ran out", flush=True)
                return
            u, v = (torch.randn(B, H, L, device=dev, dtype=dtype, requires_grad=backward) for _ in range(2))
            k = (torch.randn(H, L, device=dev) * L ** -0.5).to(dtype).requires_grad_(backward)
            D = torch.randn(H, device=dev, dtype=dtype, requires_grad=backward)
            torch._dynamo.reset()
            compiled = torch.compile(upcast, backend="inductor" if dev == "cuda" else "aot_eager")
            row = {}
            for algo in ("fft", "direct"):
                row[f"seqfuse-{algo}"] = _try_ms(lambda a=algo: torch.ops.seqfuse.long_conv(
                    u, k, D.unsqueeze(-1), v, None, True, 0, 1.0, "none", a, "triton"), suite, backward)
            row["seqfuse"] = min((x for x in row.values() if isinstance(x, float)), default="no seqfuse variant ran")
            row["eager"] = _try_ms(lambda: upcast(u, k, D, v), suite, backward)
            row["inductor"] = _try_ms(lambda: compiled(u, k, D, v), suite, backward)
            _ratio_row(suite, "long_conv", dict(program="hyena", L=L, B=B, H=H, dtype=str(dtype).split(".")[-1],
                                                pass_="fwd+bwd" if backward else "fwd"), row)


def _models(suite: Suite):
    """name -> (module, inputs) of whole models, at GPU size or --smoke size."""
    import torch
    import transformers as T
    smoke, dev = suite.smoke, suite.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(ids, use_cache=False).logits

    L = 2048 if not smoke else 32
    models = {}
    torch.manual_seed(0)
    d = 1024 if not smoke else 32
    models["llama"] = lambda: (Logits(T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=1024, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=4 if not smoke else 1,
        num_attention_heads=16 if not smoke else 4, num_key_value_heads=4 if not smoke else 2))), (4, L))
    models["mamba"] = lambda: (Logits(T.MambaForCausalLM(T.MambaConfig(
        vocab_size=1024, hidden_size=768 if not smoke else 32, num_hidden_layers=4 if not smoke else 1,
        state_size=16 if not smoke else 8,
        # without mamba_ssm the torch path is a Python loop over time that Dynamo unrolls for
        # minutes at L=2048; its associative_scan path is the same math, captured in seconds
        use_associative_scan=True))), (1, L))
    models["mamba2"] = lambda: (Logits(T.Mamba2ForCausalLM(T.Mamba2Config(
        vocab_size=1024, hidden_size=768 if not smoke else 32, num_hidden_layers=4 if not smoke else 1,
        num_heads=24 if not smoke else 4, head_dim=64 if not smoke else 16, state_size=128 if not smoke else 16,
        n_groups=1, chunk_size=256 if not smoke else 16))), (1, L))

    def llama_ckpt():
        model, shape = models["llama"]()
        model.lm.gradient_checkpointing_enable()
        return model, shape

    def hyena():
        from workloads import _example
        mod = _example("hyena")
        op, x = mod.build(batch=4 if not smoke else 1, seq_len=L, d_model=768 if not smoke else 32)
        return op, x
    models["hyena"] = hyena
    models["llama_ckpt"] = llama_ckpt
    for name, make in models.items():
        built = make()
        if name == "hyena":
            model, x = built
            yield name, model.to(dev, dtype), (x.to(dev, dtype),)
        else:
            model, (b, length) = built
            yield name, model.to(dev, dtype), (torch.randint(0, 1024, (b, length), device=dev),)


def stage_models(suite: Suite) -> None:
    import torch

    import seqfuse  # (also registers backend="seqfuse" where the package is not installed)
    if suite.smoke:
        # interpreted Triton kernels at model size take minutes: the smoke run checks the script on
        # the CPU paths (the kernels stage and the other stages run the interpreter)
        os.environ.pop("TRITON_INTERPRET", None)
    for name, model, args in _models(suite):
        for backward in ((True,) if name.endswith("_ckpt") else (False, True)):
            if suite.out_of_time():
                print("  [models] cut: the time box ran out", flush=True)
                return
            model.train(backward)
            row, compile_s, paths = {}, {}, ""
            for backend in ("eager", "inductor", "seqfuse"):
                torch._dynamo.reset()
                seqfuse.reset_counters()
                fn = model if backend == "eager" else torch.compile(model, backend=backend)
                if backend == "inductor" and suite.device != "cuda":
                    fn = torch.compile(model, backend="aot_eager")  # --smoke: keep the CPU run short
                ctx = torch.no_grad() if not backward else contextlib.nullcontext()
                with ctx:
                    start = time.perf_counter()
                    try:
                        first = fn(*args)
                        if backward:
                            first.float().sum().backward()
                        compile_s[backend] = time.perf_counter() - start
                        row[backend] = _try_ms(lambda: fn(*args), suite, backward)
                    except StageTimeout:
                        raise
                    except Exception as exc:
                        row[backend] = f"{type(exc).__name__}: {str(exc)[:100]}"
                if backend == "seqfuse":   # which op ran where, e.g. attention:triton,delta:cpu
                    paths = ",".join(f"{op}:{p}" for op, by in seqfuse.counters().items() for p, n in by.items() if n)
                model.zero_grad(set_to_none=True)
            ratios = {f"{n}/seqfuse": row[n] / row["seqfuse"] for n in ("eager", "inductor")
                      if isinstance(row.get(n), float) and isinstance(row.get("seqfuse"), float)}
            suite.add("models", model=name, pass_="fwd+bwd" if backward else "fwd",
                      **{f"{n}_ms": v for n, v in row.items()},
                      **{f"{n}_first_call_s": v for n, v in compile_s.items()}, **ratios,
                      seqfuse_paths=paths or "none")


def resources(suite: Suite) -> None:
    """Registers and spills of every seqfuse Triton kernel compiled in this process (all autotune
    candidates, not only the winners): one row per kernel function.  Nothing on CPU / --smoke."""
    from triton.runtime.jit import JITFunction
    for modname, mod in sorted(sys.modules.items()):
        if not (modname.startswith("seqfuse.lowering.triton.") and modname.endswith("_kernels")):
            continue
        for name, fn in sorted(vars(mod).items()):
            if not isinstance(fn, JITFunction):
                continue
            compiled = [k for caches in fn.device_caches.values() for k in caches[0].values()
                        if getattr(k, "n_regs", None) is not None]
            if not compiled:
                continue
            spills = [k.n_spills for k in compiled]
            suite.add("resources", kernel=f"{modname.rsplit('.', 1)[1]}.{name}", variants=len(compiled),
                      max_regs=max(k.n_regs for k in compiled), with_spills=sum(1 for x in spills if x),
                      max_spills=max(spills), max_shared_kb=max(k.metadata.shared for k in compiled) / 1024)


STAGES = {"kernels": stage_kernels, "attention": stage_attention, "recurrence": stage_recurrence,
          "long_conv": stage_long_conv, "models": stage_models, "resources": resources}


def markdown(rows: list[dict]) -> str:
    """One markdown table per stage, columns in order of first appearance."""
    out = []
    for stage in STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        if not mine:
            continue
        cols = []
        for r in mine:
            cols += [c for c in r if c != "stage" and c not in cols]
        out.append(f"\n### {stage}\n")
        out.append("| " + " | ".join(c.rstrip("_") for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in mine:
            out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through TRITON_INTERPRET=1")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {list(STAGES)}")
    p.add_argument("--budget", type=float, default=1.0, help="scale every stage's time box by this factor")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run interpreted
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA GPU here; it measures the Triton kernels on a GPU only "
              "(--smoke runs every row at tiny shapes on CPU to check the script).")
        return 1
    device = "cuda" if not args.smoke else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: interpreter, nothing timed)"
    import triton
    print(f"seqfuse gpu suite  {time.strftime('%Y-%m-%d')}  {name}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    suite = Suite(device, args.smoke)
    budgets = SMOKE_BUDGETS if args.smoke else BUDGETS
    start = time.monotonic()
    for stage in stages:
        with suite.stage(stage, budgets[stage] * args.budget):
            STAGES[stage](suite)
        if args.json:  # rewritten after every stage: a run cut from outside still leaves its rows
            pathlib.Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                           "rows": suite.rows}, indent=1, default=str))
    print(markdown(suite.rows))
    print(f"\ntotal {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Random delta-rule programs as the libraries write them (the delta pass): flash-linear-attention's
PyTorch references (recurrent and chunked Gated DeltaNet, KDA and DeltaNet; recurrent Comba and GDN-2,
which read the state with another key than they write, and IPLR / DPLR, which also erase along another
one) and transformers' Qwen3-Next
torch path, called with random sizes (chunk sizes, one to several chunks, grouped value heads), dtypes,
initial states, with or without the final state, weak or strong decays, β above 1, an optional NaN /
inf, and forced algorithms and runtimes; and broken copies of a reference (one piece of its source
changed) that must not become a delta op with the original's meaning.  Each program must equal eager
(outputs, gradients, NaN positions); the faithful ones are expected to become one delta op.
A function whose library is not installed is skipped (the family then draws from the others)."""
from __future__ import annotations

import importlib
import inspect
import os
import random
from typing import Iterator

import torch
import torch.nn.functional as F

from .check import Case
from .common import Maker, poison, reset, size, tags

#: (name, module, function, kind): kind "gdn" (scalar gate g (B, T, H)), "kda" (g (B, T, H, K)), "delta"
#: (no gate, fla's head-first (B, H, T, ·) layout), "comba" (a scalar gate and a read key p (B, T, H, K)),
#: "gdn2" (g (B, T, H, K), an erase gate b (B, T, H, K) and a write gate w (B, T, H, V)), "iplr" / "dplr"
#: (head-first, a read vector α and an erase vector β; dplr with a decay per key channel read after the
#: correction); "precond" (a scalar gate, the ATK scan's gate and strength (B, T, HK), grouped value heads);
#: "product" (Gated DeltaProduct: n Householder steps per token, k / v / β over T·n steps, an optional scalar
#: gate; n = 1 is the gated delta rule and lifted, n > 1 is not re-rolled and must run as written);
#: chunked ones take a chunk size
FUNCTIONS = [
    ("fla_gdn_recurrent", "fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule", "gdn"),
    ("fla_gdn_chunk", "fla.ops.gated_delta_rule.naive", "naive_chunk_gated_delta_rule", "gdn"),
    ("fla_kda_recurrent", "fla.ops.kda.naive", "naive_recurrent_kda", "kda"),
    ("fla_kda_chunk", "fla.ops.kda.naive", "naive_chunk_kda", "kda"),
    ("fla_delta_recurrence", "fla.ops.delta_rule.naive", "delta_rule_recurrence", "delta"),
    ("fla_delta_chunkwise", "fla.ops.delta_rule.naive", "delta_rule_chunkwise", "delta"),
    ("fla_delta_parallel", "fla.ops.delta_rule.naive", "delta_rule_parallel", "delta"),
    ("hf_gdn_chunk", "transformers.models.qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule", "gdn"),
    ("hf_gdn_recurrent", "transformers.models.qwen3_next.modeling_qwen3_next", "torch_recurrent_gated_delta_rule",
     "gdn"),
    ("fla_comba_recurrent", "fla.ops.comba.naive", "naive_recurrent_comba", "comba"),
    ("fla_gdn2_recurrent", "fla.ops.gdn2.naive", "naive_recurrent_gdn2", "gdn2"),
    ("fla_iplr_recurrence", "fla.ops.generalized_delta_rule.iplr.naive", "iplr_recurrence", "iplr"),
    ("fla_dplr_recurrence", "fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence", "dplr"),
    # the preconditioned gated delta rule: a second carried state (the ATK scan, per key head) scales the key
    ("fla_precond_gdn_recurrent", "fla.ops.precond_gated_delta_rule.naive",
     "naive_recurrent_precond_gated_delta_rule", "precond"),
    # RWKV-7's step loop as written out in tests/delta_spellings.py: batched, (state @ a) @ b or the key matrix
    # state @ (a ⊗ b); and the RWKV-LM v7 demo's unbatched sequence mode (rows (T, H·N), a given state)
    ("rwkv7_loop", "tests.delta_spellings", "rwkv7_loop", "rwkv7"),
    ("fla_gated_delta_product", "fla.ops.gated_delta_product.naive", "naive_recurrent_gated_delta_product",
     "product"),
    ("rwkv7_demo_seq", "tests.delta_spellings", "rwkv7_demo_seq", "rwkv7_demo"),
]

#: broken copies: (function name, source text, replacement) — each changes the recurrence's meaning
BREAKS = [
    ("fla_kda_chunk", "q_i * (g_i - g_j).exp()", "q_i * (g_j - g_i).exp()"),
    ("fla_kda_chunk", "A = A * beta[..., None]", "A = A * beta[..., None] * 2"),
    ("fla_gdn_chunk", "v = v * beta[..., None]", "v = v * beta[..., None] * beta[..., None]"),
    ("fla_gdn_recurrent", "h = h * torch.exp(g[:, :, i])", "h = h * torch.exp(g[:, :, i]) * torch.exp(g[:, :, i])"),
    # Comba with its decay dropped (a delta rule still, of another meaning); GDN-2 writing along its read key
    ("fla_comba_recurrent", "h = h.clone() * g[:, :, i].exp()[..., None, None]\n        b_beta",
     "b_beta"),
    ("fla_gdn2_recurrent", "h = h + b_k.unsqueeze(-1) * b_v_new.unsqueeze(-2)",
     "h = h + (b_b * b_k).unsqueeze(-1) * b_v_new.unsqueeze(-2)"),
    # the blocked form: a row mask off by one, the walk's query update with the wrong sign, the carried keys
    # made with the scores' mask (the diagonal kept)
    ("fla_delta_parallel", "torch.arange(i, i+BM) >= (j + BN)", "torch.arange(i, i+BM) >= (j + BN - 1)"),
    ("fla_delta_parallel", "q_i = q_i - A_ij @ k_beta", "q_i = q_i + A_ij @ k_beta"),
    # the preconditioner reading the delta state (two coupled states); the preconditioned key read as well
    ("fla_precond_gdn_recurrent", "* (b_k ** 2)", "* (b_k ** 2) + 0.01 * S.sum(-1)"),
    ("fla_precond_gdn_recurrent", "(S.clone() * b_k[..., None]).sum(-2)",
     "(S.clone() * b_k_precond[..., None]).sum(-2)"),
    # Gated DeltaProduct with a squared write strength (a delta rule of another meaning when n = 1)
    ("fla_gated_delta_product", "* beta_ij[..., None, None]", "* beta_ij[..., None, None] ** 2"),
    ("fla_delta_parallel", "(k @ k.transpose(-1, -2)).masked_fill(mask, 0)",
     "(k @ k.transpose(-1, -2)).masked_fill(mask2, 0)"),
    # RWKV-7: the key matrix's factors swapped (read along b, erase along a), the correction reading the
    # decayed state, the decay along the value axis (not the delta rule)
    ("rwkv7_demo_seq", "ab = (-kk_t).view(H, N, 1) @ (kk_t * a_t).view(H, 1, N)",
     "ab = (kk_t * a_t).view(H, N, 1) @ (-kk_t).view(H, 1, N)"),
    ("rwkv7_demo_seq", "state = state * w_t.view(H, 1, N) + state @ ab.float()",
     "state = state * w_t.view(H, 1, N) + (state * w_t.view(H, 1, N)) @ ab.float()"),
    ("rwkv7_demo_seq", "state = state * w_t.view(H, 1, N) + state @ ab.float()",
     "state = state * w_t.view(H, N, 1) + state @ ab.float()"),
]


def _import(module: str):
    """``module``, imported with TRITON_INTERPRET set where there is no GPU: fla's import pulls in triton's
    gluon, which asserts that triton.language's functions match the interpreter setting (tests/fuzz/
    conftest.py imports triton.language through the interpreter)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(module)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _load(module: str, name: str):
    try:
        f = getattr(_import(module), name)
    except (ImportError, AttributeError):
        return None
    while hasattr(f, "__wrapped__"):      # transformers' hub-kernel wrapper: its torch path
        f = f.__wrapped__
    return f


def _broken(module: str, name: str, old: str, new: str):
    """The library function with ``old`` replaced by ``new`` in its source (None when it no longer reads so)."""
    f = _load(module, name)
    if f is None:
        return None
    src = inspect.getsource(f)
    if old not in src:
        return None
    namespace = dict(vars(_import(module)))
    exec(compile(src.replace(old, new), f"<broken {name}>", "exec"), namespace)   # noqa: S102
    return namespace[name]


def _options(r: random.Random, triton: bool, forced: float) -> dict:
    """The compile options of a case: the Triton runtime when ``triton``, else sometimes the eager or C one;
    with probability ``forced`` an algorithm forced."""
    opts: dict = {}
    if triton:
        opts["runtime"] = "triton"
    elif r.random() < 0.4:
        opts["runtime"] = r.choice(("eager", "cpu"))
    if r.random() < forced:
        opts["algorithm"] = {"delta": r.choice(("recurrent", "chunked"))}
    return opts


def _program(r: random.Random, triton: bool):
    """(name, fn, inputs, expect, options) of one random delta-rule case, or None when no library is there."""
    entries = [e for e in FUNCTIONS if _load(e[1], e[2]) is not None]
    if not entries:
        return None
    broken = None
    if r.random() < 0.2:
        cands = [b for b in BREAKS if any(e[0] == b[0] for e in entries)]
        if cands:
            broken = r.choice(cands)
    name, module, fname, kind = next(e for e in entries if e[0] == broken[0]) if broken else r.choice(entries)
    f = _broken(module, fname, broken[1], broken[2]) if broken else _load(module, fname)
    if f is None:
        return None
    chunked = "chunk" in name or name == "fla_delta_parallel"
    C = r.choice((2, 4, 8)) if chunked else None
    T = C * r.choice((1, 1, 2, 3, 4)) if chunked else size(r, 1, 24, (1, 2, 3))
    BM = None
    if name == "fla_delta_parallel":        # blocks of BM rows, a whole number of them (fla needs both)
        BM = C * r.choice((1, 2, 3))
        T = BM * r.choice((1, 2, 3))
    if chunked and name.startswith("hf") and r.random() < 0.3:
        T = max(1, T - r.randint(1, C - 1))      # transformers pads the last chunk
    B, HK, G = size(r, 1, 2), size(r, 1, 3), r.choice((1, 1, 2))
    if kind in ("delta", "comba", "gdn2", "iplr", "dplr", "product") or name.startswith("fla_gdn") or \
            name == "fla_kda_recurrent":
        G = 1                                     # grouped value heads: KDA chunked and transformers only
    H, K, V = HK * G, size(r, 1, 8, (1, 2, 3)), size(r, 1, 8, (1, 2, 3))
    if kind in ("rwkv7", "rwkv7_demo"):
        return _rwkv7_program(r, name, kind, f, broken, B, H, size(r, 2, 8, (2, 3)), triton)
    dtypes = (torch.float32, torch.float32, torch.float64, torch.bfloat16)
    no_bf16 = name in ("fla_delta_chunkwise", "fla_delta_parallel")      # (they raise on bf16)
    m = Maker(r, r.choice(dtypes[:3] if no_bf16 else dtypes))
    head_first = kind in ("delta", "iplr", "dplr")
    shape = (lambda h, d, t=T: (B, h, t, d)) if head_first else (lambda h, d, t=T: (B, t, h, d))
    n = r.choice((1, 1, 2, 3)) if kind == "product" else 1   # Householder steps per token
    q = m.randn(*shape(HK, K))
    k = m.randn(*shape(HK, K, T * n), grad=False)
    with torch.no_grad():
        k = F.normalize(k.double(), dim=-1).to(k.dtype)
    if r.random() < 0.7:
        k.requires_grad_(True)
    v = m.randn(*shape(H, V, T * n))
    beta = m.uniform(0.0, r.choice((1.0, 1.0, 1.8)), *(shape(H, 1, T * n)[:-1]))
    strength = r.choice((0.1, 1.0, 4.0))
    g = None
    if kind in ("gdn", "comba", "precond") or kind == "product" and r.random() < 0.7:
        g = m.log_decay(B, T, H, strength=strength)
    elif kind in ("kda", "gdn2"):
        g = m.log_decay(B, T, H, K, strength=strength)
    elif kind == "dplr":
        g = m.log_decay(B, H, T, K, strength=strength)
    extra = []                                    # Comba's read key p; GDN-2's gates b (key axis), w (value axis)
    if kind == "comba":
        p = m.randn(*shape(H, K), grad=False)
        with torch.no_grad():
            p = F.normalize(p.double(), dim=-1).to(p.dtype)
        extra = [p.requires_grad_(r.random() < 0.7)]
    elif kind == "gdn2":
        extra = [m.uniform(0.0, 1.0, *shape(H, K)), m.uniform(0.0, 1.0, *shape(H, V))]
    elif kind in ("iplr", "dplr"):               # α = −a, β = a ⊙ b: the transition I − (a ⊙ b) aᵀ
        a = m.randn(*shape(H, K), grad=False)
        with torch.no_grad():
            a = F.normalize(a.double(), dim=-1).to(a.dtype)
        extra = [a.requires_grad_(r.random() < 0.7), m.uniform(0.0, 1.0, *shape(H, K))]
    elif kind == "precond":                      # the ATK scan's log-gate and strength, per key head
        extra = [m.log_decay(B, T, HK, strength=r.choice((0.1, 1.0))), m.uniform(0.0, 1.0, B, T, HK)]
    h0 = m.randn(B, H, K, V) if r.random() < 0.5 and name not in ("fla_delta_chunkwise", "fla_delta_parallel") \
        else None
    if kind == "precond" and h0 is not None:    # and the scan's (positive: a sum of squares) initial state
        extra.append(m.uniform(0.0, 1.0, B, HK, K))
    final = r.random() < 0.5
    has_gate = g is not None
    tag = tags(poison(r, [x for x in (q, v, beta, g, h0) if x is not None], p=0.08), reset(r, [g]))

    def fn(*xs):
        q, k, v, beta = xs[:4]
        rest = list(xs[4:])
        g = rest.pop(0) if kind not in ("delta", "iplr") and (kind != "product" or has_gate) else None
        s = rest.pop(0) if h0 is not None else None
        if kind in ("iplr", "dplr"):
            a, b = rest
            o, S = f(q, k, v, -a, a * b, *([g] if kind == "dplr" else []), initial_state=s,
                     output_final_state=final)
            return (o, S) if final else o
        if kind == "precond":
            out = f(q, k, v, rest[0], g, rest[1], beta, initial_state=s,
                    initial_A_state=rest[2] if len(rest) > 2 else None, output_final_state=final)
            return out if final else out[0]
        if kind == "product":
            o, S = f(q, k, v, g, beta, K ** -0.5, initial_state=s, output_final_state=final, num_householder=n)
            return (o, S) if final else o
        if kind == "comba":
            o, S = f(q, k, v, rest[0], beta, g, initial_state=s, output_final_state=final)
            return (o, S) if final else o
        if kind == "gdn2":                        # (no β: the gates b and w take its place)
            o, S = f(q, k, v, g, rest[0], rest[1], initial_state=s, output_final_state=final)
            return (o, S) if final else o
        if name == "fla_delta_recurrence":
            o, S = f(q, k, v, beta, initial_state=s)
            return (o, S) if final else o
        if name == "fla_delta_chunkwise":
            return f(q, k, v, beta, chunk_size=C)[0]
        if name == "fla_delta_parallel":      # (o, the attention matrix) or o alone
            out = f(q, k, v, beta, BM=BM, BN=C)
            return out if final else out[0]
        kw = dict(initial_state=s, output_final_state=final)
        if chunked:
            kw["chunk_size"] = C
        if name.startswith("hf"):
            o, S = f(q, k, v, g, beta, **kw)
        elif name.startswith("fla_gdn_recurrent"):
            o, S = f(q, k, v, beta, g, **kw)
        else:
            o, S = f(q, k, v, g, beta, **kw)
        return (o, S) if final else o

    inputs = tuple(x for x in (q, k, v, beta, g, h0, *extra) if x is not None)
    opts = _options(r, triton, 0.4)
    what = f"{name}{'/broken:' + broken[2][:24] if broken else ''}/C{C}" + (f"/BM{BM}" if BM else "") \
        + (f"/G{G}" if G > 1 else "") + (f"/n{n}" if kind == "product" else "") \
        + ("/h0" if h0 is not None else "") + ("/final" if final else "") + (f"+{tag}" if tag else "")
    # (the blocked form over one chunk has no walk: delta reads it as one chunk, which it does not lift)
    # (Gated DeltaProduct with n > 1: its n Householder steps per token are not re-rolled, a near miss)
    expect = None if (broken or T == 1 or (BM is not None and T == C) or n > 1) else "delta"
    return what, fn, inputs, expect, opts


def _rwkv7_program(r: random.Random, name, kind, f, broken, B, H, N, triton):
    """RWKV-7's recurrence, T steps of a (H, N, N) state: r, w, k, v rows, κ̂ (normalized) and a ∈ (0, 1)."""
    T = size(r, 1, 24, (1, 2, 3))
    # (the batched loop's state takes w's fp32 after one step: bf16 rows would not multiply with it)
    dtypes = (torch.float32, torch.float32, torch.float64) + ((torch.bfloat16,) if kind == "rwkv7_demo" else ())
    m = Maker(r, r.choice(dtypes))
    shape = (B, T, H, N) if kind == "rwkv7" else (T, H * N)
    rr, w, k, v = m.randn(*shape), m.randn(*shape), m.randn(*shape), m.randn(*shape)
    kk = m.randn(*shape[:-1], *((H, N) if kind == "rwkv7_demo" else (N,)), grad=False)
    with torch.no_grad():
        kk = F.normalize(kk.double(), dim=-1).to(kk.dtype).reshape(shape)
    kk.requires_grad_(r.random() < 0.7)
    a = m.uniform(0.0, 1.0, *shape)
    state = m.randn(H, N, N, scale=0.3, dtype=torch.float32, grad=r.random() < 0.5) if kind == "rwkv7_demo" else None
    tag = tags(poison(r, [rr, v, k], p=0.08))
    key_matrix = r.random() < 0.5

    def fn(*xs):
        rr, w, k, v, kk, a = xs[:6]
        if kind == "rwkv7_demo":
            return f(rr, w, k, v, kk, a, xs[6])
        return f(rr, w, k, v, -kk, kk * a, key_matrix=key_matrix)

    inputs = (rr, w, k, v, kk, a) + ((state,) if state is not None else ())
    opts = _options(r, triton, 0.3)
    what = f"{name}{'/broken:' + broken[2][:24] if broken else ''}" + ("/key_matrix" if key_matrix and kind == "rwkv7"
                                                                       else "") + (f"+{tag}" if tag else "")
    # the demo's rows in bf16 / fp64: its .float() casts round the key matrix (a near miss); T = 1: no loop
    lifts = kind == "rwkv7" or m.dtype == torch.float32
    expect = "delta" if (not broken and T > 1 and lifts) else None
    return what, fn, inputs, expect, opts


def cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    if not any(_load(e[1], e[2]) is not None for e in FUNCTIONS):
        return                                   # neither fla nor transformers: no program to draw
    made = 0
    while made < n:
        seed = rng.randrange(2 ** 31)
        got = _program(random.Random(seed), triton)
        if got is None:                          # a broken copy whose source no longer reads so: draw again
            continue
        what, fn, inputs, expect, opts = got
        made += 1
        yield Case("delta", what, fn, inputs, expect, opts, seed)

"""A Hyena operator (order 2, implicit long filter) written the way the paper's reference code
writes it, compiled with seqfuse: its FFT convolutions become seqfuse.long_conv ops (with the
D skip and the gates folded in), its short depthwise conv becomes a direct long_conv, and the
outputs and gradients equal eager.

    python examples/hyena.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqfuse


def fftconv(u, k, D):
    """The reference code's FFT convolution: y = (u ⊛ k)[:L] + u·D."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


class Sin(nn.Module):
    def __init__(self, dim, w=10.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """Complex exponential positional features z(t) of the implicit filter."""

    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = torch.linspace(0, 1, seq_len)[None, :, None]
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
        w = 2 * math.pi * t_rescaled / seq_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)

    def forward(self, L):
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    def __init__(self, d_model, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])

    def forward(self, t, x):
        return x * torch.exp(-t * self.deltas.abs())


class HyenaFilter(nn.Module):
    """The implicit long filter h(t) = MLP(z(t)) · decay(t), one per channel."""

    def __init__(self, d_model, emb_dim=3, order=16, seq_len=128):
        super().__init__()
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len)
        self.implicit_filter = nn.Sequential(nn.Linear(emb_dim, order), Sin(order), nn.Linear(order, order),
                                             Sin(order), nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model)
        self.bias = nn.Parameter(torch.randn(d_model))

    def filter(self, L):
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        return self.modulation(t, h)          # (1, L, d_model)


class HyenaOperator(nn.Module):
    """Order-2 Hyena: y = x2 · (h ⊛ (x1 · v)), after a short depthwise conv of the projections."""

    def __init__(self, d_model=32, l_max=128, order=2, filter_order=16):
        super().__init__()
        self.order = order
        inner = d_model * (order + 1)
        self.in_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(inner, inner, 3, padding=2, groups=inner)
        self.filter_fn = HyenaFilter(d_model * (order - 1), order=filter_order, seq_len=l_max)

    def forward(self, u):  # u: (B, L, d_model) -> (B, L, d_model)
        L = u.size(-2)
        u = self.in_proj(u).transpose(1, 2)                      # (B, inner, L)
        uc = self.short_filter(u)[..., :L]
        *x, v = uc.split(u.shape[1] // (self.order + 1), dim=1)
        k = self.filter_fn.filter(L)[0].transpose(0, 1)          # (d_model, L)
        k = k.reshape(self.order - 1, -1, L)
        bias = self.filter_fn.bias.reshape(self.order - 1, -1)
        for o, x_i in enumerate(reversed(x[1:])):
            v = v * x_i
            v = fftconv(v, k[o], bias[o])
        y = (v * x[0]).transpose(1, 2)
        return self.out_proj(y)


def build(batch=2, seq_len=64, d_model=32, seed=0):
    """Return (operator, input): a HyenaOperator and a (batch, seq_len, d_model) input."""
    torch.manual_seed(seed)
    return HyenaOperator(d_model=d_model, l_max=seq_len), torch.randn(batch, seq_len, d_model)


def main(tol=1e-4):
    op, x = build()
    x.requires_grad_(True)
    compiled = torch.compile(op, backend="seqfuse")
    errs = []
    for fn in (op, compiled):
        op.zero_grad(set_to_none=True)
        y = fn(x)
        g = torch.autograd.grad(y.square().sum(), [x, *op.parameters()])
        errs.append((y.detach(), g))
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    out_err = rel(errs[1][0], errs[0][0])
    grad_err = max(rel(a, b) for a, b in zip(errs[1][1], errs[0][1]))
    print(f"output rel. error vs eager: {out_err:.2e}; worst gradient rel. error: {grad_err:.2e}")
    report = seqfuse.explain(op, x)
    print(report)
    if not (out_err < tol and grad_err < tol):
        raise SystemExit(f"FAIL: compiled Hyena disagrees with eager (tolerance {tol})")
    if report.count("long_conv") != 2:
        raise SystemExit("FAIL: expected the short conv and the FFT conv as long_conv ops")
    print("OK")


if __name__ == "__main__":
    main()

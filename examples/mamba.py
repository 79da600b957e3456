"""A small Mamba language model compiled with seqfuse: the selective scan, a Python loop over
time that Dynamo unrolls, becomes one seqfuse.scan op per layer (the depthwise conv + SiLU in
front of it one seqfuse.long_conv), and the logits and gradients equal eager.

    python examples/mamba.py            # Hugging Face's Mamba when transformers is installed
    python examples/mamba.py --scratch  # the block written below, from the paper's equations

With ``transformers`` installed the model is a random-weight ``MambaForCausalLM`` from a tiny
config; on CPU (no mamba_ssm / causal_conv1d kernels) its mixers run the torch path with the
loop.  Without it (or with --scratch) the model is the from-scratch block below.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqfuse


def selective_scan(u, delta, A, B, C, D):
    """Mamba's selective scan as a loop over time.

    u, delta: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L); D: (d_inner,)
    -> y: (batch, d_inner, L), with per channel d and step t:
        h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t        h: (batch, d_inner, d_state)
        y_t = h_t · C_t + D · u_t
    """
    batch, d_inner, L = u.shape
    # 1. discretize: the decay exp(Δ·A) and the input Δ·B·u of every step
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    # 2. the recurrence, one step at a time
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    # 3. readouts of all steps, plus the skip
    return torch.stack(ys, dim=2) + u * D.unsqueeze(-1)


class MambaBlock(nn.Module):
    """in_proj -> (causal depthwise conv1d, SiLU, selective scan) ⊙ SiLU(gate) -> out_proj."""

    def __init__(self, d_model, d_state=16, expand=2, d_conv=4):
        super().__init__()
        d_inner, self.dt_rank, self.d_state = expand * d_model, math.ceil(d_model / 16), d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # S4D-real initialization: A = -(1, 2, ..., d_state) for every channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x):                                     # x: (batch, L, d_model)
        L = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :L])   # (batch, d_inner, L)
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # (batch, d_inner, L)
        y = selective_scan(u, delta, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D)
        return self.out_proj(y.transpose(1, 2) * F.silu(gate))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaLM(nn.Module):
    """Embedding, pre-norm residual Mamba blocks, final norm, tied LM head."""

    def __init__(self, vocab_size=256, d_model=64, n_layers=2, d_state=16):
        super().__init__()
        self.n_layers = n_layers
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MambaBlock(d_model, d_state) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)

    def forward(self, tokens):                                # tokens: (batch, L) -> logits (batch, L, vocab)
        x = self.embed(tokens)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.norm_f(x) @ self.embed.weight.T


class HFLogits(nn.Module):
    """A transformers MambaForCausalLM called without a cache: tokens -> logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.n_layers = lm, lm.config.num_hidden_layers

    def forward(self, tokens):
        return self.lm(tokens, use_cache=False).logits


def build(batch=2, seq_len=32, scratch=False, seed=0):
    """Return (model, tokens): a 2-layer Mamba LM (d_model 64, state 16, vocab 256) in eval mode
    and a (batch, seq_len) token batch; Hugging Face's unless ``scratch`` or transformers is absent."""
    torch.manual_seed(seed)
    try:
        if scratch:
            raise ImportError
        from transformers import MambaConfig, MambaForCausalLM
        # use_associative_scan=False: the Python loop over time (on CPU the associative-scan path is
        # torch's generic vmapped scan, which seqfuse leaves to the downstream compiler)
        cfg = MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                          conv_kernel=4, use_cache=False, use_associative_scan=False)
        model = HFLogits(MambaForCausalLM(cfg))
    except ImportError:
        model = MambaLM()
    tokens = torch.randint(0, 256, (batch, seq_len))
    return model.eval(), tokens


def main(argv=None, tol=1e-4):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", action="store_true", help="the from-scratch block even with transformers")
    args = p.parse_args(argv)
    model, tokens = build(scratch=args.scratch)
    print(f"model: {'transformers MambaForCausalLM' if isinstance(model, HFLogits) else 'from-scratch MambaLM'}, "
          f"{model.n_layers} layers, tokens {tuple(tokens.shape)}")

    report = seqfuse.explain(model, tokens)  # compiles with seqfuse (inductor downstream), runs once
    print(report)
    compiled = torch.compile(model, backend="seqfuse")
    results = []
    for fn in (model, compiled):
        logits = fn(tokens)
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        results.append((logits.detach(), grads))
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    out_err = rel(results[1][0], results[0][0])
    grad_err = max(rel(a, b) for a, b in zip(results[1][1], results[0][1]))
    print(f"logits rel. error vs eager: {out_err:.2e}; worst parameter gradient rel. error: {grad_err:.2e}")
    if not (out_err < tol and grad_err < tol):
        raise SystemExit(f"FAIL: compiled Mamba disagrees with eager (tolerance {tol})")
    if report.count("scan") != model.n_layers:
        raise SystemExit(f"FAIL: expected one scan per layer ({model.n_layers}), found {report.count('scan')}")
    print("OK")


if __name__ == "__main__":
    main()

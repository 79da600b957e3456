"""A small Llama, written from scratch, compiled with seqfuse.

The attention is spelled the way Meta's reference code spells it: rotary
embeddings, grouped-query attention (n_kv_heads < n_heads, k/v repeated with
expand + reshape), scores / sqrt(head_dim) plus an additive causal mask built
with torch.triu(torch.full((T, T), -inf), 1), softmax in fp32 cast back to the
input dtype. seqfuse recognizes it as one `seqfuse.attention` op per layer.

    python examples/llama.py

Prints the relative error of the logits and of every parameter gradient
against eager, then the explain() report. Exits non-zero if they disagree.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import seqfuse


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # each k/v head serves n_heads // n_kv_heads query heads
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 32


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_tables(head_dim, max_seq_len, theta):
    """cos, sin: (max_seq_len, head_dim), the two halves of the last dim share a frequency."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):  # x: (B, T, H, D); cos, sin: (T, D)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):  # (B, T, n_kv_heads, D) -> (B, T, n_kv_heads * n_rep, D)
    B, T, n_kv_heads, D = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(B, T, n_kv_heads, n_rep, D).reshape(B, T, n_kv_heads * n_rep, D)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):  # x: (B, T, dim)
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary(xq, cos, sin), apply_rotary(xk, cos, sin)

        n_rep = self.n_heads // self.n_kv_heads
        keys, values = repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, H, T, D)

        scores = xq @ keys.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, H, T, T)
        mask = torch.triu(torch.full((T, T), float("-inf"), device=x.device), diagonal=1)
        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = scores @ values  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).contiguous().view(B, T, -1))


class FeedForward(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)
        hidden = cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):  # tokens: (B, T) int64 -> logits (B, T, vocab_size) fp32
        T = tokens.size(1)
        h = self.tok_embeddings(tokens)
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)).float()


def build(config=None, batch=2, seq_len=None, seed=0):
    """Return (model, tokens): a Llama in eval mode and a (batch, seq_len) token batch."""
    torch.manual_seed(seed)
    cfg = config or LlamaConfig()
    model = Llama(cfg).eval()
    tokens = torch.randint(cfg.vocab_size, (batch, seq_len or cfg.max_seq_len))
    return model, tokens


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare_with_eager(model, tokens, compiled):
    """Relative error of the logits and the worst parameter gradient, compiled vs eager."""
    outs, grads = [], []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = fn(tokens)
        targets = tokens.roll(-1, dims=1)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        outs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    grad_errs = {n: rel_err(grads[1][n], grads[0][n]) for n in grads[0]}
    worst = max(grad_errs, key=grad_errs.get)
    return rel_err(outs[1], outs[0]), worst, grad_errs[worst]


def main(tol=1e-4):
    model, tokens = build()
    compiled = torch.compile(model, backend="seqfuse")
    out_err, worst, grad_err = compare_with_eager(model, tokens, compiled)
    print(f"logits    rel. error vs eager: {out_err:.2e}")
    print(f"gradients rel. error vs eager: {grad_err:.2e} (worst: {worst})")

    report = seqfuse.explain(model, tokens)
    print(report)

    if not (out_err < tol and grad_err < tol):
        raise SystemExit(f"FAIL: compiled model disagrees with eager (tolerance {tol})")
    if report.count("attention") != model.cfg.n_layers:
        raise SystemExit(f"FAIL: expected {model.cfg.n_layers} attention rewrites")
    print("OK")


if __name__ == "__main__":
    main()

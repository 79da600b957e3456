"""A small GPT-2, written from scratch, compiled with seqfuse.

The attention is spelled the naive nanoGPT way: q @ kᵀ * scale, masked_fill
with a registered tril buffer, softmax, dropout, @ v. seqfuse recognizes it
as one `seqfuse.attention` op per layer.

    python examples/gpt2.py

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
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 32  # longest sequence; the causal mask buffer is (block_size, block_size)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        tril = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", tril.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x):  # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2

    def forward(self, idx):  # idx: (B, T) int64 -> logits (B, T, vocab_size)
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(config=None, batch=2, seq_len=None, seed=0):
    """Return (model, idx): a GPT in eval mode and a (batch, seq_len) token batch."""
    torch.manual_seed(seed)
    cfg = config or GPTConfig()
    model = GPT(cfg).eval()
    idx = torch.randint(cfg.vocab_size, (batch, seq_len or cfg.block_size))
    return model, idx


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare_with_eager(model, idx, compiled):
    """Relative error of the logits and the worst parameter gradient, compiled vs eager."""
    outs, grads = [], []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = fn(idx)
        targets = idx.roll(-1, dims=1)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        outs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    grad_errs = {n: rel_err(grads[1][n], grads[0][n]) for n in grads[0]}
    worst = max(grad_errs, key=grad_errs.get)
    return rel_err(outs[1], outs[0]), worst, grad_errs[worst]


def main(tol=1e-4):
    model, idx = build()
    compiled = torch.compile(model, backend="seqfuse")
    out_err, worst, grad_err = compare_with_eager(model, idx, compiled)
    print(f"logits    rel. error vs eager: {out_err:.2e}")
    print(f"gradients rel. error vs eager: {grad_err:.2e} (worst: {worst})")

    report = seqfuse.explain(model, idx)
    print(report)

    if not (out_err < tol and grad_err < tol):
        raise SystemExit(f"FAIL: compiled model disagrees with eager (tolerance {tol})")
    if report.count("attention") != model.cfg.n_layer:
        raise SystemExit(f"FAIL: expected {model.cfg.n_layer} attention rewrites")
    print("OK")


if __name__ == "__main__":
    main()

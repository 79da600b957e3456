"""Benchmark workloads: name -> factory(quick, device) -> Workload.

A workload is a function and its inputs; benchmarks/run.py times it eagerly,
under torch.compile (inductor) and under torch.compile(backend="seqfuse").
"""

import dataclasses
import importlib.util
import pathlib

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@dataclasses.dataclass
class Workload:
    fn: object  # a function or nn.Module
    args: tuple
    shape: str  # a one-line description of the size, for the table


def _example(name):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"seqfuse_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_causal_attention(q, k, v):
    """q, k, v: (B, H, L, D) -> (B, H, L, D); the quadratic spelling seqfuse should replace."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    L = scores.shape[-1]
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool, device=q.device), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention_workload(quick, device):
    B, H, L, D = (2, 2, 128, 32) if quick else (2, 8, 2048, 64)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    return Workload(naive_causal_attention, (q, k, v), f"B={B} H={H} L={L} D={D} fp32")


def gpt2_workload(quick, device):
    gpt2 = _example("gpt2")
    if quick:
        cfg = gpt2.GPTConfig()
    else:
        cfg = gpt2.GPTConfig(vocab_size=512, block_size=512, n_layer=4, n_head=8, n_embd=256)
    model, idx = gpt2.build(cfg, batch=2)
    return Workload(
        model.to(device),
        (idx.to(device),),
        f"B=2 T={cfg.block_size} layers={cfg.n_layer} d={cfg.n_embd} heads={cfg.n_head}",
    )


def llama_workload(quick, device):
    llama = _example("llama")
    if quick:
        cfg = llama.LlamaConfig()
    else:
        cfg = llama.LlamaConfig(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=512)
    model, tokens = llama.build(cfg, batch=2)
    return Workload(
        model.to(device),
        (tokens.to(device),),
        f"B=2 T={cfg.max_seq_len} layers={cfg.n_layers} d={cfg.dim} heads={cfg.n_heads}/{cfg.n_kv_heads}",
    )


WORKLOADS = {
    "naive_causal_attention": attention_workload,  # the headline
    "gpt2": gpt2_workload,
    "llama": llama_workload,
}

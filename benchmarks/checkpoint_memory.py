"""Activation checkpointing through seqfuse: what the forward saves for the backward, and a training
step's time, for eager, inductor and seqfuse, with and without ``torch.utils.checkpoint``, in one run.

    python benchmarks/checkpoint_memory.py                    # 4 blocks, B=4, L=512, d=256 (CPU: ~2 min)
    python benchmarks/checkpoint_memory.py --layers 2 --length 128 --repeats 3   # a quick look
    python benchmarks/checkpoint_memory.py --backends eager,seqfuse               # without inductor

Each block is pre-norm causal attention written out (matmul, masked_fill, softmax, matmul) and an MLP;
with checkpointing every block is one region: "plain" recomputes all of it in the backward, "selective"
has a policy (torchtitan's kind) that saves what the linear layers compute and recomputes the rest.  "saved MB" is what the compiled (or eager) forward hands
to autograd for the backward, parameters not counted (they are held anyway), measured with
``torch.autograd.graph.saved_tensors_hooks`` on a call after the compiling one (n/a for eager's selective
checkpointing, whose saves those hooks do not see); "step ms" is the median
of ``--repeats`` forward+backward steps.  The ratios compare each row with eager without checkpointing.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("no", "plain", "selective")


def _save_linears(ctx, op, *args, **kwargs):
    save = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _selective():
    return create_selective_checkpoint_contexts(_save_linears)


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        x = x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Model(torch.nn.Module):
    def __init__(self, layers: int, d: int, heads: int, ckpt: str):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ckpt = ckpt

    def forward(self, x):
        for b in self.blocks:
            if self.ckpt == "plain":
                x = checkpoint(b, x, use_reentrant=False)
            elif self.ckpt == "selective":
                x = checkpoint(b, x, use_reentrant=False, context_fn=_selective)
            else:
                x = b(x)
        return x


def measure(fn, params, x, repeats: int) -> tuple[float, float, float]:
    """(saved MB, median step ms, first-call s) of fn on x."""
    t0 = time.perf_counter()
    fn(x).sum().backward()
    first = time.perf_counter() - t0
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).sum().backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return saved[0] / 2 ** 20, statistics.median(times), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="eager,inductor,seqfuse", help="comma-separated, eager first")
    args = ap.parse_args(argv)
    import seqfuse  # noqa: F401  (registers the backend)
    torch.manual_seed(0)
    base = Model(args.layers, args.dim, args.heads, ckpt="no")
    x = torch.randn(args.batch, args.length, args.dim)
    print(f"# {args.layers} blocks, B={args.batch}, L={args.length}, d={args.dim}, heads={args.heads}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}",
          flush=True)
    print(f"{'backend':10s} {'checkpoint':10s} {'saved MB':>9s} {'x eager':>8s} {'step ms':>9s} {'x eager':>8s} "
          f"{'first s':>8s}", flush=True)
    ref = None
    for backend in args.backends.split(","):
        for ckpt in MODES:
            torch._dynamo.reset()
            model = Model(args.layers, args.dim, args.heads, ckpt)
            model.load_state_dict(base.state_dict())
            fn = model if backend == "eager" else torch.compile(model, backend=backend)
            saved, ms, first = measure(fn, list(model.parameters()), x, args.repeats)
            ref = ref or (saved, ms)
            if backend == "eager" and ckpt == "selective":
                # eager's selective checkpointing keeps what its policy saves in its own storage, which
                # the saved-tensor hooks do not see: the number would read as nothing saved
                mb = f"{'n/a':>9s} {'':>8s}"
            else:
                mb = f"{saved:9.3f} {saved / ref[0]:8.2f}"
            print(f"{backend:10s} {ckpt:10s} {mb} {ms:9.1f} {ms / ref[1]:8.2f} {first:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

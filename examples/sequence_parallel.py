"""One sequence split across processes: transformers' Mamba-2 compiled with seqfuse's
``sequence_parallel`` option on 2 CPU processes (gloo), checked against one process on the
whole sequence, with the bytes each rank sent.

    python examples/sequence_parallel.py            # 2 ranks, T = 256
    python examples/sequence_parallel.py --world 4 --seq-len 1024

Each rank holds a contiguous slice of the tokens.  The SSD of every layer runs on its slice,
exchanges one (final state, decay) pair with the other ranks and corrects its output; the
causal conv1d in front of it reads the last (kernel - 1) inputs of the previous rank.  Prints
the logits' and the worst parameter gradient's relative error, and the payload per layer.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(seq_len: int):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    expand=2, n_groups=1, state_size=16, chunk_size=32, conv_kernel=4,
                                    use_cache=False)
    model = transformers.Mamba2ForCausalLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len))
    return model, tokens


def rank_main(rank: int, world: int, port: int, seq_len: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import seqfuse
    from seqfuse.lowering import sequence_parallel as sp
    model, tokens = build(seq_len)
    weights = torch.randn(*tokens.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    n = seq_len // world
    mine = slice(rank * n, (rank + 1) * n)
    compiled = torch.compile(lambda ids: model(ids, use_cache=False).logits, backend="seqfuse",
                             options={"sequence_parallel": {"group": None}})
    sp.reset_payload_bytes()
    logits = compiled(tokens[:, mine])
    (logits * weights[:, mine]).sum().backward()
    sent = sp.payload_bytes()
    grads = {k: p.grad for k, p in model.named_parameters()}
    buf = io.BytesIO()  # plain bytes: shared-memory tensors would not outlive this process
    torch.save((rank, logits.detach(), grads, sent), buf)
    queue.put(buf.getvalue())
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    if args.seq_len % (args.world * 64):
        p.error(f"--seq-len must split into {args.world} slices of whole chunks of 32 (at least two each): "
                f"a multiple of {args.world * 64}, got {args.seq_len}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args.world, port, args.seq_len, queue)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    results = sorted((torch.load(io.BytesIO(queue.get(timeout=600))) for _ in procs), key=lambda r: r[0])
    for proc in procs:
        proc.join()
    # one process, the whole sequence, eagerly
    model, tokens = build(args.seq_len)
    weights = torch.randn(*tokens.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    ref = model(tokens, use_cache=False).logits
    (ref * weights).sum().backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    logits_err = rel(torch.cat([r[1] for r in results], dim=1), ref.detach())
    grad_errs = {k: rel(sum(r[2][k] for r in results), p.grad) for k, p in model.named_parameters()}
    worst = max(grad_errs, key=grad_errs.get)
    layers = model.config.num_hidden_layers
    print(f"{args.world} ranks x {args.seq_len // args.world} tokens: logits rel. error {logits_err:.1e}, "
          f"worst gradient ({worst}) {grad_errs[worst]:.1e}")
    print(f"sent per rank per layer (forward + backward): {results[0][3] / layers:.0f} bytes "
          f"(state and decay, plus the conv's 3-step halo; independent of the sequence length)")
    ok = logits_err < 1e-4 and grad_errs[worst] < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark workloads of the delta rule: name -> factory(quick, device) -> Workload (benchmarks/workloads.py).

``qwen3_next_linear_attn``: a stack of transformers' Qwen3-Next Gated DeltaNet layers (the linear
attention of Qwen3-Next, residual connections between them) on their torch path -- the chunked WY
program ``torch_chunk_gated_delta_rule``, a Python loop over chunks of 64 steps that Dynamo unrolls --
at B=1, T=2048.  seqfuse lifts each layer's program to one seqfuse.delta (the C kernel's step loop on
CPU); eager and inductor run the chunked program as written.  Needs transformers.

``fla_kda_chunk``: flash-linear-attention's PyTorch reference ``naive_chunk_kda`` (B=1, T=256, 4 heads,
K=V=64, chunks of 32).  Lifted to one seqfuse.delta (gate vector) since its column loops are vectorized
(loop_map) and the per-channel WY form is proven on index forms; before that it measured loop_map and
triangular alone.  Needs flash-linear-attention.

``rwkv7_loop``: RWKV-7's time-mixing recurrence as the RWKV-LM v7 demo's CUDA-free sequence mode writes it
(a Python loop over T = 256 steps, the key matrix formed per step and contracted with the state, H=4, N=64,
with a batch axis B=1), one seqfuse.delta with a read key, an erase key and read=previous (the C kernel on
CPU).

``fla_delta_parallel``: flash-linear-attention's ``delta_rule_parallel`` (DeltaNet's blocked form, B=1,
H=4, T=1024, K=V=64, blocks of 128 rows, chunks of 32), one seqfuse.delta.  Needs flash-linear-attention.

To run it with benchmarks/run.py, merge the table into its workloads::

    from workloads_delta import WORKLOADS as DELTA_WORKLOADS
    WORKLOADS.update(DELTA_WORKLOADS)

then ``python benchmarks/run.py --workload qwen3_next_linear_attn [--train] [--quick]``.
"""
from __future__ import annotations

import torch

from workloads import Workload, _example


class GatedDeltaNetStack(torch.nn.Module):
    """x (B, T, hidden) -> x + layer(x) through each Gated DeltaNet layer, without a cache."""

    def __init__(self, config, layers):
        super().__init__()
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
        self.layers = torch.nn.ModuleList(Qwen3NextGatedDeltaNet(config, i) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def qwen3_next_linear_attn_workload(quick, device):
    from transformers import Qwen3NextConfig
    _example("qwen3_next").torch_path()   # the torch functions, not fla's GPU kernels (for this process)
    if quick:
        T, hidden, kh, vh, dk, layers = 256, 64, 2, 4, 16, 2
    else:
        T, hidden, kh, vh, dk, layers = 2048, 512, 4, 8, 64, 2
    cfg = Qwen3NextConfig(hidden_size=hidden, linear_num_key_heads=kh, linear_num_value_heads=vh,
                          linear_key_head_dim=dk, linear_value_head_dim=dk, linear_conv_kernel_dim=4,
                          num_hidden_layers=layers, layer_types=["linear_attention"] * layers)
    torch.manual_seed(0)
    model = GatedDeltaNetStack(cfg, layers).to(device)
    x = torch.randn(1, T, hidden, device=device)
    return Workload(model, (x,), f"B=1 T={T} layers={layers} hidden={hidden} heads k{kh}/v{vh}x{dk} fp32")


class FlaChunkKDA(torch.nn.Module):
    """(q, k, v, g, β) -> (o, final state) through flash-linear-attention's PyTorch reference
    ``naive_chunk_kda``: column loops (its UT system, and each chunk's scores inside the loop over chunks)
    and an in-place forward substitution, all unrolled by Dynamo.  seqfuse does not lift it to a delta op
    (docs/ir.md says why); it vectorizes the column loops (loop_map) and solves the UT system in one
    triangular solve (triangular): this workload measures those two passes."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v, g, beta):
        from fla.ops.kda.naive import naive_chunk_kda
        return naive_chunk_kda(q, k, v, g, beta, chunk_size=self.chunk, output_final_state=True)


def fla_kda_chunk_workload(quick, device):
    import torch.nn.functional as F
    B, T, H, K, C = (1, 64, 2, 16, 16) if quick else (1, 256, 4, 64, 32)
    torch.manual_seed(0)
    q, v = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=device)) * 0.1
    beta = torch.rand(B, T, H, device=device)
    args = tuple(x.requires_grad_() for x in (q, k, v, g, beta))     # (--train: the inputs get gradients)
    return Workload(FlaChunkKDA(C), args, f"fla naive_chunk_kda B={B} T={T} H={H} K=V={K} chunk={C} fp32")


class FlaDeltaParallel(torch.nn.Module):
    """(q, k, v, β) -> o through flash-linear-attention's PyTorch reference ``delta_rule_parallel``: DeltaNet's
    blocked form (a forward substitution per chunk, then each block of rows walks the earlier chunks
    backwards).  seqfuse lifts it to one seqfuse.delta (the delta_blocks pass)."""

    def __init__(self, block, chunk):
        super().__init__()
        self.block, self.chunk = block, chunk

    def forward(self, q, k, v, beta):
        from fla.ops.delta_rule.naive import delta_rule_parallel
        return delta_rule_parallel(q, k, v, beta, BM=self.block, BN=self.chunk)[0]


def fla_delta_parallel_workload(quick, device):
    import torch.nn.functional as F
    B, H, T, K, BM, BN = (1, 2, 64, 16, 32, 16) if quick else (1, 4, 1024, 64, 128, 32)
    torch.manual_seed(0)
    q, v = torch.randn(B, H, T, K, device=device), torch.randn(B, H, T, K, device=device)
    k = F.normalize(torch.randn(B, H, T, K, device=device), dim=-1)
    beta = torch.rand(B, H, T, device=device)
    args = tuple(x.requires_grad_() for x in (q, k, v, beta))
    return Workload(FlaDeltaParallel(BM, BN), args,
                    f"fla delta_rule_parallel B={B} H={H} T={T} K=V={K} blocks of {BM}, chunks of {BN} fp32")


class Rwkv7TimeMix(torch.nn.Module):
    """RWKV-7's state recurrence as the RWKV-LM v7 demo's CUDA-free sequence mode spells it, with a batch axis:
    a step loop over a (B, H, N, N) state, ab = a ⊗ b formed per step, state = state·w + state @ ab + v ⊗ k,
    the readout (state @ r) viewed back; a = −κ̂, b = κ̂ ⊙ σ(·) (the transition diag(w) − κ̂ (κ̂ ⊙ a)ᵀ read
    before the decay).  seqfuse lifts the loop to one seqfuse.delta with a read key, an erase key and
    read=previous (the C kernel's generalized step on CPU)."""

    def forward(self, r, w, k, v, kk, a):
        import torch.nn.functional as F
        B, T, H, N = r.shape
        w = torch.exp(-torch.exp(w))
        kk = F.normalize(kk, dim=-1)
        a, b = -kk, kk * torch.sigmoid(a)
        state = torch.zeros(B, H, N, N, device=r.device)
        out = torch.zeros(B, T, H, N, device=r.device)
        for t in range(T):
            kt, rt = k[:, t].view(B, H, 1, N), r[:, t].view(B, H, N, 1)
            vt, at, bt = v[:, t].view(B, H, N, 1), a[:, t].view(B, H, N, 1), b[:, t].view(B, H, 1, N)
            ab = at @ bt
            state = state * w[:, t, :, None, :] + state @ ab.float() + (vt @ kt).float()
            out[:, t] = (state @ rt).view(B, H, N)
        return out


def rwkv7_loop_workload(quick, device):
    B, T, H, N = (1, 32, 2, 16) if quick else (1, 256, 4, 64)
    torch.manual_seed(0)
    # inputs that require grad: --train differentiates the recurrence (the module has no parameters)
    xs = tuple(torch.randn(B, T, H, N, device=device, requires_grad=True) for _ in range(6))
    return Workload(Rwkv7TimeMix().to(device), xs, f"B={B} T={T} H={H} N={N} fp32 (a Python loop over T)")


WORKLOADS = {
    "rwkv7_loop": rwkv7_loop_workload,   # RWKV-LM's v7 reference loop (diagonal plus low rank)
    "qwen3_next_linear_attn": qwen3_next_linear_attn_workload,
    "fla_kda_chunk": fla_kda_chunk_workload,   # needs flash-linear-attention (its PyTorch reference)
    "fla_delta_parallel": fla_delta_parallel_workload,   # the same (DeltaNet's blocked form)
}

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


def hyena_gated_fft_conv(u, k, D, v):
    """Hyena's gated FFT convolution as its reference code writes it: (B, H, L) -> (B, H, L)."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return (v * (y + u * D.unsqueeze(-1))).to(dtype=u.dtype)


def hyena_workload(quick, device):
    B, H, L = (2, 8, 256) if quick else (4, 256, 8192)
    torch.manual_seed(0)
    u, v = (torch.randn(B, H, L, device=device) for _ in range(2))
    k, D = torch.randn(H, L, device=device), torch.randn(H, device=device)
    return Workload(hyena_gated_fft_conv, (u, k, D, v), f"B={B} H={H} L={L} fp32")


def s4d_conv(u, log_dt, A_re, A_im, C, D):
    """An S4D layer in convolution mode: the Vandermonde kernel, then an FFT convolution with D skip."""
    length = u.shape[-1]
    dtA = torch.complex(-torch.exp(A_re), A_im) * torch.exp(log_dt).unsqueeze(-1)
    Cc = C * (torch.exp(dtA) - 1.0) / torch.complex(-torch.exp(A_re), A_im)
    k = 2 * torch.einsum("hn,hnl->hl", Cc, torch.exp(dtA.unsqueeze(-1) * torch.arange(length, device=u.device))).real
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(k, n=2 * length), n=2 * length)
    return y[..., :length] + u * D.unsqueeze(-1)


def s4d_workload(quick, device):
    B, H, L, N = (2, 8, 256, 8) if quick else (4, 256, 4096, 32)
    torch.manual_seed(0)
    args = (torch.randn(B, H, L, device=device), torch.rand(H, device=device).log(),
            torch.randn(H, N, device=device) * 0.1, torch.randn(H, N, device=device),
            torch.randn(H, N, dtype=torch.complex64, device=device), torch.randn(H, device=device))
    return Workload(s4d_conv, args, f"B={B} H={H} L={L} N={N} fp32")


def tiny_mamba(hidden=64, layers=2, state=16, vocab=256, associative_scan=False, seed=0):
    """A random-weight Hugging Face MambaModel; on CPU (no mamba_ssm / causal_conv1d kernels)
    its mixers run the torch path: depthwise conv1d, then mamba_selective_scan's Python loop
    over time (or torch's associative_scan with ``associative_scan=True`` under torch.compile)."""
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=state,
                      expand=2, conv_kernel=4, use_cache=False, use_associative_scan=associative_scan)
    return MambaModel(cfg).eval()


class MambaHidden(torch.nn.Module):
    """input_ids (B, L) -> last hidden state (B, L, hidden), without a cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).last_hidden_state


def mamba_loop_workload(quick, device):
    L = 16 if quick else 512
    model = MambaHidden(tiny_mamba()).to(device)
    ids = torch.randint(0, model.model.config.vocab_size, (1, L), device=device)
    return Workload(model, (ids,), f"HF MambaModel B=1 L={L} layers=2 d=64 state=16, Python-loop path")


def mamba_assoc_scan_workload(quick, device):
    """HF Mamba with ``use_associative_scan=True``: under torch.compile on CPU each mixer runs
    torch's associative_scan(combine_mode="generic") over all states, then reads them out with C."""
    L = 16 if quick else 512
    model = MambaHidden(tiny_mamba(associative_scan=True)).to(device)
    ids = torch.randint(0, model.model.config.vocab_size, (1, L), device=device)
    return Workload(model, (ids,), f"HF MambaModel B=1 L={L} layers=2 d=64 state=16, associative_scan path")


def gla_recurrent_workload(quick, device):
    from fla.ops.gla.naive import naive_recurrent_gla

    def gla_recurrent(q, k, v, gk):
        """fla's recurrent GLA reference: q, k, v, gk (B, T, H, K) -> (o (B, T, H, V), state (B, H, K, V))."""
        return naive_recurrent_gla(q, k, v, gk, output_final_state=True)

    B, T, H, K = (2, 16, 4, 32) if quick else (2, 256, 4, 32)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, device=device) for _ in range(3))
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device))
    return Workload(gla_recurrent, (q, k, v, gk), f"fla naive_recurrent_gla B={B} T={T} H={H} K=V={K} fp32")


class Mamba2Hidden(torch.nn.Module):
    """input_ids (B, L) -> last hidden state of a Hugging Face Mamba2Model, without a cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).last_hidden_state


def mamba2_chunked_workload(quick, device):
    """HF Mamba-2 on its torch path (no mamba_ssm kernels): the chunked SSD program per layer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    expand=2, n_groups=1, state_size=64, chunk_size=64, conv_kernel=4,
                                    use_cache=False)
    model = Mamba2Hidden(transformers.Mamba2Model(cfg)).to(device).eval()
    L = 128 if quick else 1024
    ids = torch.randint(0, cfg.vocab_size, (2, L), device=device)
    return Workload(model, (ids,), f"HF Mamba2Model B=2 L={L} layers=2 d=64 heads=8x16 state=64 chunk=64, torch path")


class HFLogits(torch.nn.Module):
    """input_ids (B, L) -> logits of a Hugging Face causal LM, without a cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def hf_llama_workload(quick, device):
    """transformers' LlamaForCausalLM with its eager attention: each layer adds transformers 5's
    ``where(causal, 0, finfo.min)`` mask to the scores (seqfuse: mask=causal, bias_mask)."""
    import transformers

    torch.manual_seed(0)
    d, layers, heads, kv = (64, 2, 4, 2) if quick else (256, 4, 8, 2)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                                   attn_implementation="eager")
    model = HFLogits(transformers.LlamaForCausalLM(cfg)).to(device).eval()
    L = 32 if quick else 1024
    ids = torch.randint(0, cfg.vocab_size, (2, L), device=device)
    return Workload(model, (ids,), f"HF LlamaForCausalLM eager attention B=2 L={L} layers={layers} d={d} "
                                   f"heads={heads}/{kv} fp32")


def minimax_lightning_workload(quick, device):
    """transformers' MiniMax lightning attention (its own module): a Python loop over blocks of 256 steps
    with decay tables kept as buffers (seqfuse: one ssd with a = -slope_rate, under a value guard)."""
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    class Layer(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.attn = MiniMaxLightningAttention(cfg, 0)

        def forward(self, x):
            return self.attn(x, None, None)[0]

    torch.manual_seed(0)
    d, heads, hd, block = (64, 4, 16, 16) if quick else (512, 8, 64, 256)
    cfg = transformers.MiniMaxConfig(hidden_size=d, num_attention_heads=heads, head_dim=hd, num_hidden_layers=2,
                                     num_key_value_heads=heads, block_size=block, intermediate_size=d,
                                     layer_types=["linear_attention", "full_attention"])
    model = Layer(cfg).to(device).eval()
    L = 64 if quick else 2048
    x = torch.randn(2, L, d, device=device)
    return Workload(model, (x,), f"MiniMax lightning attention B=2 L={L} d={d} heads={heads}x{hd} block={block} fp32")


def xlstm_mlstm_workload(quick, device):
    """transformers' chunkwise mLSTM kernel (``mlstm_chunkwise_native_autograd``, xLSTM's training path): a
    stabilized loop over chunks filling state buffers, then the intra-chunk form (seqfuse: one fp64 ssd
    under value guards, ssd_stabilized)."""
    from transformers.models.xlstm.modeling_xlstm import mlstm_chunkwise_native_autograd

    B, H, T, D, Q = (1, 2, 32, 8, 8) if quick else (1, 4, 1024, 64, 64)

    class Kernel(torch.nn.Module):
        def forward(self, q, k, v, i_gate, f_gate):
            return mlstm_chunkwise_native_autograd(q, k, v, i_gate, f_gate, chunk_size=Q)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(3))
    i_gate, f_gate = torch.randn(B, H, T, generator=g).to(device), (torch.randn(B, H, T, generator=g) + 3).to(device)
    # the kernel has no parameters: --train differentiates with respect to its inputs
    return Workload(Kernel(), tuple(x.requires_grad_() for x in (q, k, v, i_gate, f_gate)),
                    f"xLSTM chunkwise mLSTM B={B} H={H} T={T} K=V={D} chunk={Q} fp32")


def xlstm_mlstm_loop_workload(quick, device):
    """transformers' recurrent mLSTM (``mlstm_recurrent_sequence_native``, xLSTM's sequence kernel): a Python
    loop over time steps that Dynamo unrolls (seqfuse: one fp64 ssd under value guards, mlstm_loop)."""
    from transformers.models.xlstm.modeling_xlstm import mlstm_recurrent_sequence_native

    B, H, T, D = (1, 2, 16, 8) if quick else (1, 4, 256, 64)

    class Kernel(torch.nn.Module):
        def forward(self, q, k, v, i_gate, f_gate):
            return mlstm_recurrent_sequence_native(q, k, v, i_gate, f_gate)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(3))
    i_gate, f_gate = torch.randn(B, H, T, generator=g).to(device), (torch.randn(B, H, T, generator=g) + 3).to(device)
    return Workload(Kernel(), tuple(x.requires_grad_() for x in (q, k, v, i_gate, f_gate)),
                    f"xLSTM recurrent mLSTM loop B={B} H={H} T={T} K=V={D} fp32")


WORKLOADS = {
    "naive_causal_attention": attention_workload,  # the headline
    "gpt2": gpt2_workload,
    "llama": llama_workload,
    "hf_llama": hf_llama_workload,   # transformers' own code: its additive masks
    "hyena_gated_fft_conv": hyena_workload,
    "s4d_conv": s4d_workload,
    # linear recurrences written as Python loops over time (transformers / fla are optional)
    "mamba_loop": mamba_loop_workload,
    "mamba_assoc_scan": mamba_assoc_scan_workload,
    "gla_recurrent": gla_recurrent_workload,
    # a chunked (loop-free) SSD program
    "mamba2_chunked": mamba2_chunked_workload,
    # a chunk loop with decay tables as module buffers (transformers' MiniMax)
    "minimax_lightning": minimax_lightning_workload,
    # a stabilized chunk loop writing state buffers (transformers' xLSTM)
    "xlstm_mlstm": xlstm_mlstm_workload,
    # the same mixer as a Python loop over time steps (transformers' xLSTM sequence kernel)
    "xlstm_mlstm_loop": xlstm_mlstm_loop_workload,
}

# the delta-rule workloads live in benchmarks/workloads_delta.py (it imports Workload and _example
# from here, which are defined by now)
from workloads_delta import WORKLOADS as _DELTA_WORKLOADS  # noqa: E402

WORKLOADS.update(_DELTA_WORKLOADS)

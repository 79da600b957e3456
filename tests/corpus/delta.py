"""The delta family of the held-out corpus: delta-rule programs seqfuse should turn into ``seqfuse.delta``.

    python -m tests.corpus --family delta               # every delta case
    python -m tests.corpus --only qwen3_next fla_kda_chunk_h0

Two kinds of case, each run in training mode, fp32, on CPU, compiled with ``backend="seqfuse"``
(downstream ``eager``: aot_eager's own backward of transformers' delta-rule torch path fails in torch
itself, a ``view`` of a non-contiguous gradient, with or without seqfuse):

- transformers causal LMs with linear-attention layers (tiny random configs, MoE experts run as
  ``experts_implementation="eager"`` so that an fp64 oracle exists), on the torch paths transformers falls
  back to without a GPU (``torch_chunk_gated_delta_rule`` / ``chunk_kimi_delta_attention``; the hub / fla
  kernel wrappers are undone for the run): the logits and the gradient of every parameter are compared
  with eager; one ``seqfuse.delta`` is expected per linear-attention layer.  Qwen3-Next, OLMo hybrid and
  Kimi Linear are also built by tests/models (here with other head counts, head sizes, lengths, batch
  and layer orders); Qwen3.5, Qwen3.5-MoE, Lara mini, Bailing hybrid and Qwen4-exp are built nowhere else.
  GLM-5-Next (KDA beside DSA-indexed MLA) has no causal-LM class: its text model runs, its last hidden
  state standing for the logits.  Its MLA attention is a near miss there: the DSA indexer's ``nonzero``
  breaks the graph, so ``eager_attention_forward`` is compiled on its own and returns its
  probabilities (with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` the model is
  one graph and the attention is fused too).
- PyTorch reference functions at sizes and chunk sizes other than those of tests/golden/test_delta.py
  (T = 48 / 90 / 96, H = 3 or 6 value heads over 3 key heads, K = 12 / 16, V = 12 / 16, chunks 16 / 32,
  ragged lengths, with and without an initial state): flash-linear-attention 0.6.0's own
  (``fla.ops.{gated_delta_rule,delta_rule,kda,comba,gdn2,generalized_delta_rule}.naive``, not the Triton
  kernels; ``fla_*``; Comba and GDN-2 read the state with another key than they write, the op's read key
  ``p``; IPLR and DPLR also erase along another key, the op's ``e``, DPLR reading the state before its
  decay), and
  transformers' torch functions called directly (``hf_*``).  The outputs (and the final state where the
  function returns one) and the gradient of every input are compared with eager; one ``seqfuse.delta``
  is expected per call.

Errors are relative RMS errors against eager with the corpus's bound (1e-5).  A gradient eager itself
computes no better in fp32 (the log-decay parameters A_log / dt_bias, whose gradient is a sum of
cancelling terms) is judged against an fp64 oracle instead: seqfuse's distance to it at most 4x eager's
plus 256 fp32 roundings of the largest gradient (tests.corpus's rule).  The oracle runs the same program
in fp64 with the library modules' casts to fp32 kept in fp64.

A case is ``ok`` when it equals eager and shows the expected number of delta ops, ``MISS`` when it equals
eager but seqfuse found fewer (or more) delta ops than expected (the near misses say why), ``WRONG`` when
it differs from eager, ``CRASH`` when it did not run.  The cases run in two subprocesses (the models, the
fla functions), each case guarded on its own; a process that dies reports its remaining cases as crashed.
"""
from __future__ import annotations

from tests.corpus import cases

GDN_KERNELIZED = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                  "causal_conv1d_update")
KDA_KERNELIZED = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention", "causal_conv1d_fn",
                  "causal_conv1d_update")

_TINY = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
             tie_word_embeddings=False)

#: transformers models: name -> (modeling module, config class, model class, kernelized functions,
#: config (layer_types: the linear-attention layers, expected one delta op each), (batch, seq_len))
MODELS = {
    # Qwen3-Next: Gated DeltaNet (torch_chunk_gated_delta_rule, chunks of 64); 3 key heads x 1 value head
    # each, K=12, V=16, a ragged length (150 -> 3 chunks), batch 2, a sparse-MoE layer
    "qwen3_next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=12,
        linear_value_head_dim=16, linear_conv_kernel_dim=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_only_layers=[0, 1],
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        (2, 150)),
    # OLMo hybrid: Gated DeltaNet with negative eigenvalues (beta x 2); grouped value heads (1 key head, 3
    # value heads), T = 140 (3 chunks, ragged)
    "olmo_hybrid": ("olmo_hybrid", "OlmoHybridConfig", "OlmoHybridForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
        layer_types=["linear_attention", "linear_attention", "full_attention"], linear_num_key_heads=1,
        linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=12), (2, 140)),
    # Kimi Linear: KDA (chunk_kimi_delta_attention at its default chunk of 64, a decay per key channel),
    # 3 heads of 12, T = 130 (3 chunks, ragged), then an MLA layer
    "kimi_linear": ("kimi_linear", "KimiLinearConfig", "KimiLinearForCausalLM", KDA_KERNELIZED, dict(
        hidden_size=36, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "dense"],
        linear_head_dim=12, linear_num_heads=3), (1, 130)),
    # Qwen3.5 (text): Gated DeltaNet, a model no test of this repository builds
    "qwen3_5": ("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=16,
        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]), (1, 160)),
    # Bailing hybrid: KDA layers beside MLA, a model no test of this repository builds
    "bailing_hybrid": ("bailing_hybrid", "BailingHybridConfig", "BailingHybridForCausalLM", KDA_KERNELIZED, dict(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, head_dim=16, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, num_mtp_layers=0,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "dense"]), (1, 130)),
    # Lara mini: Gated DeltaNet beside sliding-window attention, sparse-MoE MLPs; unseen by this repository
    "lara_mini": ("lara_mini", "LaraMiniConfig", "LaraMiniForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=12, linear_value_head_dim=12,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"]), (1, 140)),
    # Qwen3.5-MoE (text): Gated DeltaNet, sparse-MoE MLPs; unseen by this repository
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=12,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"]), (1, 150)),
    # Qwen4-exp (text): Gated DeltaNet in a model with hyper-connections and n-gram embeddings; unseen
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", GDN_KERNELIZED, dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=12, linear_value_head_dim=16,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=32, indexer_compress_ratio=8,
        layer_types=["linear_attention", "full_attention"]), (1, 140)),
    # GLM-5-Next (text model; the multimodal model is the only one with a head): KDA beside DSA-indexed MLA,
    # two hyper-connection residual streams; its last hidden state stands in for the logits
    "glm5_next": ("glm5_next", "Glm5NextTextConfig", "Glm5NextTextModel", KDA_KERNELIZED, dict(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=0,
        qk_nope_head_dim=8, v_head_dim=8, index_topk=32, index_kpool=8, index_head_dim=8, index_n_heads=2,
        n_routed_experts=4, num_experts_per_tok=2, hc_mult=2, linear_head_dim=12, linear_num_heads=3,
        layer_types=["linear_attention", "indexed_attention"], mlp_layer_types=["dense", "dense"]), (1, 130)),
}


def _operands(B=2, T=48, H=3, K=12, V=16, gate="scalar", h0=True, HK=None, layout="bthd", seed=0, extra=()):
    """Delta-rule operands as the fla reference functions take them: q, k (B, T, HK, K) (k L2-normalized),
    v (B, T, H, V), beta (B, T, H) in (0, 1), g log-decays (B, T, H) or (B, T, H, K) for ``gate="vector"``
    (logsigmoid of a normal: decays in (0, 1), a few of them strong), h0 (B, H, K, V) or None; ``layout
    "bhtd"`` transposes T and H (fla.ops.delta_rule's head-first layout).  ``extra`` names more operands:
    "p" a read key like k (Comba), "b" a gate in (0, 1) on the key axis and "w" one on the value axis
    (GDN-2), "ga" a second log-decay and "ba" a second strength in (0, 1), both (B, T, H)."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)
    HK = HK or H
    q = torch.randn(B, T, HK, K, generator=gen)
    k = F.normalize(torch.randn(B, T, HK, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if gate == "vector" else ()), generator=gen) + 2)
    s = torch.randn(B, H, K, V, generator=gen) if h0 else None
    if layout == "bhtd":
        q, k, v, beta = (x.transpose(1, 2).contiguous() for x in (q, k, v, beta))
    xs = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "h0": s}
    shapes = {"p": (B, T, HK, K), "b": (B, T, H, K), "w": (B, T, H, V), "ga": (B, T, H), "ba": (B, T, H)}
    for name in extra:
        x = torch.randn(*shapes[name], generator=gen)
        xs[name] = F.normalize(x, dim=-1) if name == "p" else F.logsigmoid(x + 2) if name == "ga" else torch.sigmoid(x)
    return {n: x.requires_grad_() for n, x in xs.items() if x is not None}


_GDN = "fla.ops.gated_delta_rule.naive"
_DR = "fla.ops.delta_rule.naive"
_KDA = "fla.ops.kda.naive"

_QN = "transformers.models.qwen3_next.modeling_qwen3_next"
_OH = "transformers.models.olmo_hybrid.modeling_olmo_hybrid"
_Q35 = "transformers.models.qwen3_5.modeling_qwen3_5"
_KL = "transformers.models.kimi_linear.modeling_kimi_linear"
_BH = "transformers.models.bailing_hybrid.modeling_bailing_hybrid"


def _gdn(f, o):   # fla's gated delta rule argument order (beta before g)
    return f(o["q"], o["k"], o["v"], o["beta"], o["g"], initial_state=o.get("h0"), output_final_state=True)


def _hf(f, o, **kw):   # transformers' order (g before beta), its own L2 normalization of q and k
    return f(o["q"], o["k"], o["v"], o["g"], o["beta"], initial_state=o.get("h0"), output_final_state=True,
             use_qk_l2norm_in_kernel=True, **kw)


#: reference functions: name -> (module, function (its hub / fla wrapper undone), operands kwargs,
#: call(fn, operands) -> the tensors compared, expected delta ops).  fla's naive functions are the point;
#: transformers' own torch functions (the ones its models call) are called directly at other sizes too.
FUNCTIONS = {
    # fla.ops.gated_delta_rule.naive (Gated DeltaNet, gate=scalar)
    "fla_gdn_recurrent_h0": (_GDN, "naive_recurrent_gated_delta_rule", dict(T=48, K=12, V=16), _gdn, 1),
    "fla_gdn_recurrent": (_GDN, "naive_recurrent_gated_delta_rule", dict(T=96, K=16, V=16, h0=False),
                          lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], o["g"], scale=0.3)[:1], 1),
    "fla_gdn_chunk_h0": (_GDN, "naive_chunk_gated_delta_rule", dict(T=48, K=12, V=16), lambda f, o: f(
        o["q"], o["k"], o["v"], o["g"], o["beta"], chunk_size=16, initial_state=o["h0"], output_final_state=True), 1),
    "fla_gdn_chunk_ragged": (_GDN, "naive_chunk_gated_delta_rule", dict(T=90, K=16, V=12, h0=False), lambda f, o: f(
        o["q"], o["k"], o["v"], o["g"], o["beta"], chunk_size=32, output_final_state=True), 1),
    # fla.ops.delta_rule.naive (DeltaNet, gate=none; head-first layout)
    "fla_delta_recurrence_h0": (_DR, "delta_rule_recurrence", dict(T=48, K=12, V=16, gate="none", layout="bhtd"),
                                lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], initial_state=o["h0"]), 1),
    "fla_delta_recurrence": (_DR, "delta_rule_recurrence", dict(T=96, K=16, V=16, gate="none", layout="bhtd",
                                                               h0=False),
                             lambda f, o: f(o["q"], o["k"], o["v"], o["beta"]), 1),
    "fla_delta_chunkwise": (_DR, "delta_rule_chunkwise", dict(T=48, K=12, V=16, gate="none", layout="bhtd", h0=False),
                            lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], chunk_size=16), 1),
    "fla_delta_chunkwise_c32": (_DR, "delta_rule_chunkwise", dict(T=96, K=16, V=16, gate="none", layout="bhtd",
                                                                 h0=False),
                                lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], chunk_size=32), 1),
    # the parallel (intra-block / inter-block) form: the outputs only (its second result is the attention matrix)
    "fla_delta_parallel": (_DR, "delta_rule_parallel", dict(T=96, K=16, V=16, gate="none", layout="bhtd", h0=False),
                           lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], BM=48, BN=16)[:1], 1),
    # the same at other block and chunk sizes (4 blocks of 2 chunks; one block over every row), and with the
    # attention matrix returned too (the program keeps filling it)
    "fla_delta_parallel_bm32": (_DR, "delta_rule_parallel", dict(T=128, K=16, V=12, gate="none", layout="bhtd",
                                                                h0=False),
                                lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], BM=32, BN=16)[:1], 1),
    "fla_delta_parallel_one_block": (_DR, "delta_rule_parallel", dict(T=64, K=12, V=16, gate="none",
                                                                     layout="bhtd", h0=False),
                                     lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], BM=64, BN=8)[:1], 1),
    "fla_delta_parallel_with_attn": (_DR, "delta_rule_parallel", dict(T=48, K=12, V=12, gate="none",
                                                                     layout="bhtd", h0=False),
                                     lambda f, o: f(o["q"], o["k"], o["v"], o["beta"], BM=24, BN=8), 1),
    # fla.ops.kda.naive (KDA, gate=vector)
    "fla_kda_recurrent_h0": (_KDA, "naive_recurrent_kda", dict(T=48, K=12, V=16, gate="vector"), lambda f, o: f(
        o["q"], o["k"], o["v"], o["g"], o["beta"], initial_state=o["h0"], output_final_state=True), 1),
    "fla_kda_recurrent_gva": (_KDA, "naive_recurrent_kda", dict(T=96, H=6, HK=3, K=16, V=12, gate="vector", h0=False),
                              lambda f, o: f(o["q"], o["k"], o["v"], o["g"], o["beta"], output_final_state=True), 1),
    "fla_kda_chunk_h0": (_KDA, "naive_chunk_kda", dict(T=48, K=12, V=16, gate="vector"), lambda f, o: f(
        o["q"], o["k"], o["v"], o["g"], o["beta"], initial_state=o["h0"], output_final_state=True, chunk_size=16), 1),
    "fla_kda_chunk": (_KDA, "naive_chunk_kda", dict(T=96, K=16, V=16, gate="vector", h0=False), lambda f, o: f(
        o["q"], o["k"], o["v"], o["g"], o["beta"], chunk_size=32)[:1], 1),
    # transformers' torch functions, called directly (grouped value heads, h0, other chunk sizes)
    "hf_gdn_recurrent_gva_h0": (_QN, "torch_recurrent_gated_delta_rule", dict(T=48, H=6, HK=3, K=12, V=16), _hf, 1),
    "hf_gdn_chunk_h0": (_OH, "torch_chunk_gated_delta_rule", dict(T=48, K=12, V=16),
                        lambda f, o: _hf(f, o, chunk_size=16), 1),
    "hf_gdn_chunk_c32_ragged": (_Q35, "torch_chunk_gated_delta_rule", dict(T=90, H=6, HK=3, K=16, V=12, h0=False),
                                lambda f, o: _hf(f, o, chunk_size=32), 1),
    "hf_kda_recurrent_h0": (_KL, "recurrent_kimi_delta_attention", dict(T=48, K=12, V=16, gate="vector"), _hf, 1),
    "hf_kda_chunk_h0": (_KL, "chunk_kimi_delta_attention", dict(T=48, K=12, V=16, gate="vector"),
                        lambda f, o: _hf(f, o, chunk_size=16), 1),
    "hf_kda_chunk_c32_ragged": (_BH, "chunk_kimi_delta_attention", dict(T=90, K=16, V=12, gate="vector", h0=False),
                                lambda f, o: _hf(f, o, chunk_size=32), 1),
    # a read key other than the written key (the op's p): fla.ops.comba.naive (Comba: S' = α S − β k ⊗ (Sᵀ p)
    # + β k ⊗ v) and fla.ops.gdn2.naive (GDN-2: the read key b ⊙ k, the values w ⊙ v, a decay per key channel)
    "fla_comba_recurrent_h0": ("fla.ops.comba.naive", "naive_recurrent_comba", dict(T=48, K=12, V=16, extra=("p",)),
                               lambda f, o: f(o["q"], o["k"], o["v"], o["p"], o["beta"], o["g"],
                                              initial_state=o["h0"], output_final_state=True), 1),
    "fla_gdn2_recurrent": ("fla.ops.gdn2.naive", "naive_recurrent_gdn2", dict(T=90, K=16, V=12, gate="vector",
                                                                           h0=False, extra=("b", "w")),
                           lambda f, o: f(o["q"], o["k"], o["v"], o["g"], o["b"], o["w"], output_final_state=True),
                           1),
    # an erase key other than the written key (the op's e): fla.ops.generalized_delta_rule's IPLR
    # (S' = S + β ⊗ (Sᵀ α) + k ⊗ v, here α = −p, β = b ⊙ p) and DPLR (the same with a decay per key channel,
    # its correction reading the state before the decay: read=previous), head-first (B, H, T, ·)
    "fla_iplr_recurrent_h0": ("fla.ops.generalized_delta_rule.iplr.naive", "iplr_recurrence",
                              dict(T=48, K=12, V=16, gate="none", extra=("p", "b")),
                              lambda f, o: f(*_heads(o, "q", "k", "v"), -_heads(o, "p")[0],
                                             *_heads(o, "pb"), initial_state=o["h0"]), 1),
    "fla_dplr_recurrent": ("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence",
                           dict(T=90, K=16, V=12, gate="vector", h0=False, extra=("p", "b")),
                           lambda f, o: f(*_heads(o, "q", "k", "v"), -_heads(o, "p")[0], *_heads(o, "pb", "g")), 1),
    # the preconditioned gated delta rule and KDA: a second carried state, the ATK preconditioner scan (which
    # does not read the delta state), scales the written key by a squash of its value; one delta op beside it
    "fla_precond_gdn_recurrent": ("fla.ops.precond_gated_delta_rule.naive",
                                  "naive_recurrent_precond_gated_delta_rule",
                                  dict(T=24, K=12, V=16, h0=False, extra=("ga", "ba")),
                                  lambda f, o: f(o["q"], o["k"], o["v"], o["ga"], o["g"], o["ba"], o["beta"],
                                                 output_final_state=True), 1),
    "fla_precond_kda_recurrent": ("fla.ops.precond_kda.naive", "naive_recurrent_precond_kda",
                                  dict(T=40, K=12, V=16, gate="vector", extra=("ga", "ba")),
                                  lambda f, o: f(o["q"], o["k"], o["v"], o["g"], o["ga"], o["ba"], o["beta"],
                                                 initial_state=o["h0"], output_final_state=True), 1),
    # held out and not lifted (0 ops expected: each must equal eager as written, near misses named):
    # fla's chunked Comba, which reads the state before the decay (its recurrent reference reads it after:
    # the two differ, session 41), and the momentum delta rule (two coupled matrix states)
    "fla_comba_chunk": ("fla.ops.comba.naive", "naive_chunk_comba", dict(T=40, K=12, V=16, extra=("p",)),
                        lambda f, o: f(o["q"], o["k"], o["v"], o["p"], o["g"], o["beta"], chunk_size=16,
                                       initial_state=o["h0"], output_final_state=True), 0),
    "fla_momentum_delta_recurrent": ("fla.ops.momentum_delta_rule.naive", "recurrent_momentum_delta_rule_ref",
                                     dict(T=24, K=12, V=16, h0=False, extra=("p", "ga", "ba")),
                                     lambda f, o: f(o["q"], o["k"], o["v"], o["g"], o["ga"], o["p"], o["beta"],
                                                    o["ba"], output_final_state=True), 0),
}


def _heads(o, *names):
    """The operands ``names`` in the head-first layout (B, H, T, ·); "pb" is p ⊙ b."""
    return [(o["p"] * o["b"] if n == "pb" else o[n]).transpose(1, 2) for n in names]

CASES = list(MODELS) + list(FUNCTIONS)


def describe(name: str) -> str:
    """One line naming what case ``name`` runs (for ``--list``)."""
    if name in MODELS:
        _, _, model, _, cfg, (b, t) = MODELS[name]
        n = cfg["layer_types"].count("linear_attention")
        return f"transformers.{model} ({n} linear-attention layers, batch {b}, T={t})"
    module, fn, ops, _, _ = FUNCTIONS[name]
    return f"{module}.{fn} ({', '.join(f'{k}={v}' for k, v in ops.items())})"


def run_case(name: str) -> dict:
    """One case of this family, run and judged (tests.corpus.cases)."""
    if name in MODELS:
        module_name, cfg_name, model_name, kernelized, overrides, shape = MODELS[name]
        expected = {"delta": overrides["layer_types"].count("linear_attention")}
        return cases.model_case(name, module_name, cfg_name, model_name, kernelized, {**_TINY, **overrides}, shape,
                                expected)
    module, fn_name, kwargs, call, n = FUNCTIONS[name]
    return cases.function_case(name, module, fn_name, _operands(**kwargs), call, {"delta": n})

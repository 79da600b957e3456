"""A held-out corpus of real models: what seqfuse finds in code the project was not written against.

    python -m tests.corpus                      # every case of the corpus (both families)
    python -m tests.corpus --family attention   # the attention family only (the 37 LMs below)
    python -m tests.corpus --family delta       # the delta-rule family only (tests/corpus/delta.py)
    python -m tests.corpus --only qwen3 opt qwen3_next fla_kda_chunk_h0   # some cases, of either family
    python -m tests.corpus --list
    python -m tests.corpus --checkpointing      # the models trained with gradient_checkpointing_enable()
    python -m tests.corpus --checkpointing selective   # ... with a selective checkpointing policy

The corpus is transformers 5 causal LMs that no test, example or benchmark of this repository
builds (tests/models, tests/golden, benchmarks/workloads.py and examples/ use others), with tiny
random configs, eager attention, fp32, in training mode without dropout.  Each model runs in its
own subprocess (a crash is reported as one), compiled with ``backend="seqfuse"`` (downstream
aot_eager) on one batch: the logits and the gradient of every parameter are compared with eager
(relative RMS error; the bound is 1e-5; a gradient the math makes zero, where eager's own value is
rounding noise, is judged against an fp64 copy of the model as the fuzzer does), and the report's rewrites (with the attention ops' mask
attribute) and near misses are printed.  Exit status 1 when any model is wrong or crashed.

The delta family (``--family delta``; tests/corpus/delta.py says what it runs and how it judges) is
transformers models with linear-attention layers (Gated DeltaNet / KDA on their torch paths) and
flash-linear-attention's PyTorch reference functions at held-out sizes: per case the number of
``seqfuse.delta`` ops found against the number expected, the near misses, and the errors of the outputs
and of every gradient; ``MISS`` marks a case that equals eager but where seqfuse found fewer delta ops
than expected.  Exit status 1 when any case is wrong, crashed or missed.

It is a measurement, not a CI test: run it when the recognizers change, and keep its models out of
the other tests so that it stays a check on code nobody tuned seqfuse for.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from tests.corpus import cases, delta, recurrence

#: the case families beside the attention models: name -> module (MODELS, FUNCTIONS, CASES, describe, run_case)
FAMILIES = {"delta": delta, "recurrence": recurrence}

BOUND = cases.BOUND

#: name -> (config class, model class, config overrides); sizes are filled in by _config
CORPUS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"rotary_dim": 4}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {"rotary_dim": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"word_embed_proj_dim": 32}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"multi_query": True}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 4}),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 16,
                                                            "shared_expert_intermediate_size": 16}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", {}),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", {}),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", {"state_size": 4, "conv_kernel": 4}),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", {"mamba_d_state": 4, "mamba_headdim": 8, "n_mamba_heads": 8,
                                                      "num_hidden_layers": 2, "layers_block_type": ["mamba", "hybrid"],
                                                      "hybrid_layer_ids": [1], "use_mem_rope": False, "head_dim": None,
                                                      "num_key_value_heads": 4}),
    "bamba": ("BambaConfig", "BambaForCausalLM", {"mamba_d_state": 4, "mamba_d_head": 8, "mamba_n_heads": 8,
                                                   "attn_layer_indices": [1], "mamba_chunk_size": 4}),
    # MiniMax-M3: a lightning indexer picks, per query and key-value head, the top key blocks; eager
    # attention then runs with that selection as a per-head additive mask (build_block_mask)
    "minimax_m3": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", {
        "layer_types": ["minimax_m3_sparse", "full_attention"], "mlp_layer_types": ["dense", "dense"],
        "dense_intermediate_size": 64, "rotary_dim": 4, "index_n_heads": 2, "index_head_dim": 8,
        "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1}),
    # Inkling: a learned, hidden-state-conditioned relative position bias (gathered per distance) is added
    # to the scores; keys and values go through causal short convolutions; q/k RMS-normed with scale 1/d;
    # sliding-window layers with their own head counts, and log-scaled queries in the full layers
    "inkling": ("InklingTextConfig", "InklingForCausalLM", {
        "layer_types": ["hybrid_sliding", "hybrid"], "mlp_layer_types": ["dense", "sparse"],
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8, "sliding_window_size": 4,
        "d_rel": 4, "rel_extent": 8, "log_scaling_n_floor": 4, "moe_intermediate_size": 16, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1}),
    # Inkling 2: per-token, data-dependent attention sinks (sink_proj of the hidden state); a relative position
    # bias; q/k/relative states L2-clipped; static (sliding) / input-dependent (full) short convolutions on k
    # and v; and block attention residuals: a learned query attends, per token, over the earlier blocks' outputs
    "inkling2": ("Inkling2TextConfig", "Inkling2ForCausalLM", {
        "layer_types": ["hybrid_sliding", "hybrid"], "unpadded_vocab_size": 64, "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2, "swa_head_dim": 8, "sliding_window_size": 4, "d_rel": 4, "rel_extent": 8,
        "log_scaling_n_floor": 4, "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_layers_per_attn_res_block": 1, "eos_token_id": 2}),
    # ZAYA: compressed convolutional attention (CCA): q and k are mixed by two stacked causal convolutions
    # (depthwise, then grouped per head) plus residual paths that average q with its GQA key; half of each
    # value head is the previous token's projection (a one-step delay); hybrid / sliding-window layers
    "zaya": ("ZayaConfig", "ZayaForCausalLM", {
        "layer_types": ["hybrid_sliding", "hybrid"], "sliding_window": 4, "num_experts": 4,
        "num_experts_per_tok": 1, "moe_intermediate_size": 16, "router_hidden_size": 16, "eos_token_id": 2}),
    # HY-V4: MLA with a DeepSeek sparse-attention indexer (top-k keys per query, scattered into the additive
    # mask; the second layer reuses the first layer's selection), learned per-head sinks concatenated to the
    # scores with a max-subtracted softmax, a sigmoid output gate, and hyper-connection residual streams
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM", {
        "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "index_topk": 4, "index_head_dim": 8, "index_n_heads": 2, "indexer_types": ["full", "shared"],
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "hc_mult": 2,
        "learnable_sink_init": 0.5, "bos_token_id": 1, "eos_token_id": 2}),
    # Laguna: per-layer head counts, a softplus per-head output gate, sliding / full layers with different
    # RoPE (partial rotary in the full layers)
    "laguna": ("LagunaConfig", "LagunaForCausalLM", {
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
        "num_attention_heads_per_layer": [4, 2], "mlp_layer_types": ["dense", "sparse"], "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}),
    # DeepSeek-V4: shared-KV MQA (one head read as both key and value, RoPE undone on the output), per-head
    # learned sinks, sliding windows; compressed layers append pooled KV blocks to the keys (CSA: picked by
    # an indexer; HCA: heavily compressed) with a block causality bias; hyper-connection residual streams
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", {
        "num_hidden_layers": 3, "num_key_value_heads": 1,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        "mlp_layer_types": ["hash_moe", "moe", "moe"], "sliding_window": 4,
        "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 8, "index_n_heads": 2, "index_head_dim": 8,
        "index_topk": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "hc_mult": 2, "hc_sinkhorn_iters": 3, "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 0}),
    # LFM3: gated short-convolution layers (B*x, causal depthwise conv, *C) beside sliding-window and full
    # attention layers with q/k norms, a sigmoid per-head output gate, and "proportional" partial RoPE
    "lfm3": ("Lfm3Config", "Lfm3ForCausalLM", {
        "num_hidden_layers": 3, "layer_types": ["conv", "sliding_attention", "full_attention"],
        "sliding_window": 4, "conv_L_cache": 3, "bos_token_id": 1, "eos_token_id": 2}),
    # Step-3.7 (text path of the VL model; no ForCausalLM): sliding / full layers with their own head counts
    # (per_layer_config), q/k norms and a sigmoid per-head output gate
    "step3p7": ("Step3p7Config", "Step3p7ForConditionalGeneration", {
        "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                        "max_position_embeddings": 64, "pad_token_id": 0, "layer_types": ["sliding_attention",
                        "full_attention"], "sliding_window": 4, "num_sliding_attention_heads": 2,
                        "mlp_layer_types": ["dense", "sparse"], "n_routed_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 16, "share_expert_dim": 16},
        "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                          "max_position_embeddings": 4}}),
    # DiffLlama: differential attention, softmax(Q1 K1^T) - lambda * softmax(Q2 K2^T) as two attention calls
    # on the halves of the heads, with value heads chunked and repeated, a learned lambda and a group RMSNorm
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", {}),
    # Llama 4: chunked attention (blocks of attention_chunk_size keys) in the RoPE layers with L2-normed q/k;
    # NoPE full-attention layers whose queries are scaled by a position-dependent temperature (log1p(floor))
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", {
        "no_rope_layers": [1, 0], "attention_chunk_size": 4, "floor_scale": 4, "attn_scale": 0.5,
        "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 16, "intermediate_size_mlp": 64,
        "moe_layers": [1]}),
    # DeepSeek-V3.2: MLA (low-rank q and kv, a shared RoPE key slice, qk and v head dims differ) with the
    # DeepSeek sparse-attention indexer: a no-grad top-k over ReLU'd index scores, scattered into the mask
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", {
        "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "index_topk": 4, "index_head_dim": 8, "index_n_heads": 2, "first_k_dense_replace": 1,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1,
        "topk_group": 1, "num_key_value_heads": 4, "bos_token_id": 1, "eos_token_id": 2}),
}

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4,
             n_positions=64, ffn_dim=64, pad_token_id=0, d_model=32, attention_dropout=0.0, hidden_dropout=0.0,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, tie_word_embeddings=False)


def _config(cfg_cls, overrides):
    """A tiny config: the SIZES keys the config class takes, then ``overrides``."""
    import inspect
    params = set(inspect.signature(cfg_cls.__init__).parameters)
    kwargs = {k: v for k, v in SIZES.items() if k in params or hasattr(cfg_cls(), k)}
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None in overrides: the config's default
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def child(name: str) -> dict:
    """One model in this process: build, compile, compare; the result as a dict."""
    import torch
    import transformers as T

    import seqfuse
    from seqfuse.compiler.report import collecting
    cfg_name, model_name, overrides = CORPUS[name]
    torch.manual_seed(0)
    model = getattr(T, model_name)(_config(getattr(T, cfg_name), overrides)).train()
    cases.maybe_checkpoint(model)
    tokens = torch.randint(0, 64, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logits = fn(tokens, use_cache=False).logits
        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        logits.backward(g)
        return logits.detach(), [None if p.grad is None else p.grad.clone() for p in params]

    ref, ref_grads = run(model)
    import copy
    oracle_model = copy.deepcopy(model).double()
    oracle_params = [p for p in oracle_model.parameters() if p.requires_grad]
    oracle_grads = [None] * len(oracle_params)   # no oracle where no fp64 run is possible
    for experts in (None, "eager"):
        # the MoE models' grouped_mm has no fp64 kernel: the fp64 copy then runs the experts one by one
        # (transformers' "eager" experts implementation, the same function)
        try:
            if experts is not None:
                oracle_model.set_experts_implementation(experts)
            oracle_model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            logits64 = oracle_model(tokens, use_cache=False).logits
            logits64.backward(torch.randn(logits64.shape, generator=torch.Generator().manual_seed(2)).double())
            oracle_grads = [None if p.grad is None else p.grad for p in oracle_params]
            break
        except (RuntimeError, ValueError, AttributeError):
            continue
    report = seqfuse.Report()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="seqfuse", options={"downstream": "aot_eager"})
    start = time.perf_counter()
    with collecting(report):
        out, grads = run(compiled)
    seconds = time.perf_counter() - start

    # a gradient the math makes (nearly) zero, e.g. of a key bias under softmax, is rounding noise in
    # eager too: there seqfuse is held to the fuzzer's rule against the fp64 oracle (cases.judge)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out_err, grad_err, worst = cases.judge([out], [ref], grads, ref_grads, oracle_grads, names)
    rewrites = [r.kind + (f"[{m.group(1)}]" if (m := re.search(r"mask=(\w+)", r.ir)) and r.kind == "attention"
                          else "") for r in report.rewrites]
    return {"model": name, "out_err": out_err, "grad_err": grad_err, "worst_grad": worst,
            "n_params": len(params), "oracle": any(g is not None for g in oracle_grads), "rewrites": rewrites, "near_misses": sorted({f"{m.kind}: {m.reason}"
                                                                                  for m in report.near_misses}),
            "seconds": seconds}


def _run_cases(family: str, names, timeout) -> list[dict]:
    """The cases ``names`` of ``family`` in one subprocess (its cases guarded one by one), results as they
    come; a case the process did not report (it died or timed out) is a crash."""
    import threading
    proc = subprocess.Popen([sys.executable, "-m", "tests.corpus", "--child-cases", family, *names],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = []
    killer = threading.Timer(timeout, lambda: (timed_out.append(True), proc.kill()))
    killer.start()
    stderr = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    got = {}
    try:
        for ln in proc.stdout:
            if ln.startswith("RESULT "):
                res = json.loads(ln[len("RESULT "):])
                got[res["case"]] = res
                for row in cases.line(res):
                    print(row, flush=True)
        proc.wait()
    finally:
        killer.cancel()
    drain.join(1)
    why = (f"timed out after {timeout:.0f} s" if timed_out
           else ([x.strip() for x in stderr if x.strip()] or [f"process died (status {proc.returncode})"])[-1][:200])
    for name in names:
        if name not in got:
            got[name] = {"case": name, "error": why}
            for row in cases.line(got[name]):
                print(row, flush=True)
    return [got[n] for n in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "families: attention = the transformers LMs of CORPUS (one subprocess each); delta = delta-rule cases "
        "(transformers linear-attention models and fla's reference functions, tests/corpus/delta.py); "
        "recurrence = linear recurrences and long convolutions (tests/corpus/recurrence.py): "
        "per case ops found/expected, near misses, output and gradient errors, ok / MISS / WRONG / CRASH"))
    every = [n for fam in FAMILIES.values() for n in fam.CASES]
    p.add_argument("--only", nargs="+", choices=list(CORPUS) + every, metavar="CASE",
                   help="these cases only (see --list), of any family")
    p.add_argument("--family", choices=["attention", *FAMILIES, "all"], default="all",
                   help="which family to run (default all; ignored with --only)")
    p.add_argument("--list", action="store_true", help="print the corpus and exit")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model / per case of the other families")
    p.add_argument("--checkpointing", nargs="?", const="plain", choices=["plain", "selective"],
                   help="train the transformers models with gradient_checkpointing_enable() (every layer an "
                        "activation-checkpoint region); 'selective': with a policy (context_fn) saving the matmuls")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-cases", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.checkpointing:
        os.environ[cases.CHECKPOINTING] = "1" if args.checkpointing == "plain" else "selective"  # read by the children
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return 0
    if args.child_cases:
        family = FAMILIES[args.child_cases[0]]
        for res in cases.child(args.child_cases[1:], family.run_case):
            print("RESULT " + json.dumps(res), flush=True)
        return 0
    attention = [n for n in CORPUS if args.family in ("attention", "all")]
    chosen = {f: [n for n in fam.CASES if args.family in (f, "all")] for f, fam in FAMILIES.items()}
    if args.only:
        attention = [n for n in args.only if n in CORPUS]
        chosen = {f: [n for n in args.only if n in fam.CASES] for f, fam in FAMILIES.items()}
    if args.list:
        print("\n".join([f"{n}: transformers.{CORPUS[n][1]}" for n in attention]
                        + [f"{n}: {FAMILIES[f].describe(n)}" for f, names in chosen.items() for n in names]))
        return 0
    bad = 0
    rows = []
    for name in attention:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "tests.corpus", "--child", name], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, timeout=args.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[len("RESULT "):]) if line else {
                "model": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            res = {"model": name, "error": f"timed out after {args.timeout:.0f} s"}
        rows.append(res)
        if "error" in res:
            bad += 1
            print(f"{name:14s} CRASH/ERROR  {res['error']}", flush=True)
            continue
        ok = res["out_err"] < BOUND and res["grad_err"] < BOUND
        bad += not ok
        found = ", ".join(f"{k} x{res['rewrites'].count(k)}" for k in sorted(set(res["rewrites"]))) or "nothing"
        print(f"{name:14s} {'ok   ' if ok else 'WRONG'} logits {res['out_err']:.1e}  grads {res['grad_err']:.1e} "
              f"(worst {res['worst_grad']}, {res['n_params']} params)  {res['seconds']:.1f} s  found: {found}",
              flush=True)
        for m in res["near_misses"]:
            print(f"{'':14s}   near miss  {m}", flush=True)
    if attention:
        print(f"\n{len(rows)} models, {bad} wrong or crashed")
    for f, names in chosen.items():
        if not names:
            continue
        print()
        family = FAMILIES[f]
        # the models in one process, the functions in another: one import of torch/seqfuse per group
        results = []
        for group in ([n for n in names if n in family.MODELS], [n for n in names if n not in family.MODELS]):
            if group:
                results += _run_cases(f, group, args.timeout * len(group))
        counts = {s: sum(cases.status(r) == s for r in results) for s in ("ok", "MISS", "WRONG", "CRASH")}
        print(f"\n{len(results)} {f} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        bad += len(results) - counts["ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation with a cache (transformers' ``generate``): the prefill and the decode steps run through
seqfuse, and greedy decoding gives eager's tokens with eager's logits.

The prefill is a causal mixer over the prompt; each decode step is a mixer over one new position
(attention of one query against the cached keys, or one step of the recurrence from the cached
state), in graphs of their own.
"""
from __future__ import annotations

import pytest
import torch

import seqfuse
from seqfuse.compiler.report import collecting
from helpers import rel_err

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg), "attention"


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg), "attention"


def _mamba2():
    cfg = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
                                    vocab_size=128, n_groups=1, expand=2, chunk_size=8)
    return transformers.Mamba2ForCausalLM(cfg), "ssd"


@pytest.mark.parametrize("build", [_gpt2, _llama, _mamba2], ids=["gpt2", "llama_gqa", "mamba2"])
def test_greedy_generation_equals_eager(build):
    torch.manual_seed(0)
    model, kind = build()
    model.config._attn_implementation = "eager"
    model.eval()
    prompt = torch.randint(0, 128, (2, 12))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, **kwargs)
    model.forward = torch.compile(model.forward, backend="seqfuse", options={"downstream": "aot_eager"})
    report = seqfuse.Report()
    with collecting(report):
        got = model.generate(prompt, **kwargs)
    assert report.count(kind) >= 2, report   # the prefill's, one a layer
    assert torch.equal(got.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(got.logits, ref.logits)):
        assert rel_err(a, b) < 1e-5, f"step {step}: logits off by {rel_err(a, b):.3g}"

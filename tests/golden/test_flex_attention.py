"""FlexAttention in a graph: its block mask, built in the graph with ``create_block_mask`` (which vmaps
the mask function), used to make seqfuse leave the whole graph to the downstream compiler ("the graph
uses torch.func transforms"), so no other mixer of that graph was found.  Levels computed from sizes
alone are now folded into constants (seqfuse/compiler/vmap.py: fold_shape_only_vmaps); FlexAttention
itself is left to the downstream compiler, which fuses it, and the mixers beside it are found.

FlexAttention has no backward on CPU, so these compare outputs only (grads=False).
"""
import pytest
import torch

flex = pytest.importorskip("torch.nn.attention.flex_attention")
from helpers import check_against_eager  # noqa: E402


def _causal(b, h, q, kv):
    return q >= kv


def hybrid(q, k, v):
    """A FlexAttention layer with a causal block mask beside causal linear attention."""
    n = q.shape[-2]
    block_mask = flex.create_block_mask(_causal, None, None, n, n, device=q.device)
    soft = flex.flex_attention(q, k, v, block_mask=block_mask)
    i = torch.arange(n, device=q.device)
    linear = ((q @ k.transpose(-1, -2)) * (i[:, None] >= i[None, :])) @ v
    return soft + linear


def score_mod_only(q, k, v):
    """No block mask: FlexAttention still builds an empty one in the graph."""
    return flex.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + (qi - ki) * 0.05)


def test_mixers_beside_flex_attention_are_found():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    report = check_against_eager(hybrid, q, k, v, grads=False)
    assert [r.kind for r in report.rewrites] == ["ssd"], report
    assert not any("torch.func" in m.reason for m in report.near_misses), report


def test_flex_attention_with_a_score_mod_compiles_through():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    report = check_against_eager(score_mod_only, q, k, v, grads=False)
    assert not report.near_misses, report


def test_transformers_hybrid_with_flex_attention():
    """Nemotron-H (Mamba-2 layers beside attention) with ``attn_implementation="flex_attention"``: the
    model runs as several graphs, and the one that builds the block mask was left whole (a near miss
    naming torch.func); now no graph is, the Mamba-2 layers are found (ssd, and the short convolution
    as long_conv) and the logits are eager's.
    Inference only (FlexAttention has no CPU backward); downstream aot_eager (inductor's CPU lowering
    of this FlexAttention call fails on its own, seqfuse or not: torch 2.13)."""
    transformers = pytest.importorskip("transformers")
    from helpers import rel_err
    import seqfuse
    cfg = transformers.NemotronHConfig(
        hidden_size=32, layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, use_mamba_kernels=False,
        ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, chunk_size=8, conv_kernel=4,
        vocab_size=100)
    cfg._attn_implementation = "flex_attention"
    torch.manual_seed(0)
    lm = transformers.NemotronHForCausalLM(cfg).eval()
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        ref = lm(tokens).logits
        report = seqfuse.explain(lambda t: lm(t).logits, tokens, options={"downstream": "aot_eager"})
    assert sorted(r.kind for r in report.rewrites) == ["long_conv", "long_conv", "ssd", "ssd"], report
    assert not report.near_misses, report
    assert rel_err(report.output, ref) < 1e-5

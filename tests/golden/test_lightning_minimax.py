"""MiniMax's lightning attention (transformers ``MiniMaxLightningAttention``, its own code): a Python loop
over blocks of the sequence, ``x[:, :, 8i:8i+8]``, with decays kept as module buffers built from one rate
per head (``slope_rate``, also a buffer).

Three pieces make it one ssd: the block slices become a loop over chunks (canonicalize.block_slices), the
decay buffers are read back as the expressions that built them, bit for bit, under a value guard
(compiler/decay_buffers.py), and the chunk loop with a constant rate is fused (ssd_chunks).  Every case
compares the outputs and the gradient of every parameter with eager."""

import pytest
import torch

from helpers import call_past_a_changed_guard, check_against_eager, rel_err
import seqfuse  # noqa: F401 - registers the backend
from seqfuse.runtime.counters import counting

minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
GUARDED = ["query_decay", "key_decay", "diagonal_decay", "slope_rate"]


class Layer(torch.nn.Module):
    """One lightning-attention layer (block 8, 4 heads of 8) as a module of its own."""

    def __init__(self, layer_idx=0):
        super().__init__()
        from transformers import MiniMaxConfig
        cfg = MiniMaxConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                            block_size=8, layer_types=["linear_attention", "full_attention"])
        torch.manual_seed(layer_idx)
        self.attn = minimax.MiniMaxLightningAttention(cfg, layer_idx)

    def forward(self, x):
        return self.attn(x, None, None)[0]


def _x(t):
    return torch.randn(2, t, 32, generator=torch.Generator().manual_seed(t), requires_grad=True)


def _line(text):
    """``modeling_minimax.py:N in forward``, N the line of ``text`` in the lightning attention's forward."""
    import inspect
    lines, first = inspect.getsourcelines(minimax.MiniMaxLightningAttention.forward)
    return f"modeling_minimax.py:{first + next(k for k, line in enumerate(lines) if text in line)} in forward"


def _guards(report):
    return sorted(g.split("_buffers_")[-1].rstrip("_") for graph in report.graphs for g in graph.guards)


@pytest.mark.parametrize("t,layer", [(16, 0), (24, 0), (40, 1)], ids=["2_blocks", "3_blocks", "5_blocks_layer1"])
def test_whole_blocks_are_one_ssd(t, layer):
    # 2 blocks: the second block's update is dead code (the loop drops its state); 3 blocks: the middle
    # step follows the first, whose update from the zero state is an invariant (loop_reroll reads the
    # first step's carried values through its own match)
    report = check_against_eager(Layer(layer), _x(t))
    assert report.count("ssd") == 1 and report.count("scan") == 0, str(report)
    assert not [m for m in report.near_misses if m.kind in ("ssd", "scan")], str(report)
    assert "decay=scalar" in report.rewrites[0].ir and "h0=" not in report.rewrites[0].ir, str(report)
    assert _guards(report) == sorted(GUARDED), str(report)


@pytest.mark.parametrize("t", [20, 44], ids=["2_blocks_and_4", "5_blocks_and_4"])
def test_a_ragged_last_block_continues_the_ssd_of_the_whole_blocks(t):
    # t = 8·n + 4: the whole blocks are one ssd; the last block, its masked term plus its read of the state
    # entering it, is an ssd of 4 steps entered with that ssd's final state, which nothing else reads: the
    # two are one ssd over the t steps (ssd_chunks concatenates them).  With two whole blocks, the last
    # block's code is told from the loop's second step by the values it reads that no earlier step reads
    report = check_against_eager(Layer(), _x(t))
    assert report.count("ssd") == 1 and report.count("scan") == 0, str(report)
    assert not [m for m in report.near_misses if m.kind in ("ssd", "scan")], str(report)
    assert "h0=" not in report.rewrites[0].ir, str(report)


def test_one_block_and_a_ragged_one_are_two_ssds():
    # 12 = 8 + 4: no loop (one step): the first block is an ssd from the zero state, the second one
    # entered with the state the first block's update computes
    report = check_against_eager(Layer(), _x(12))
    assert report.count("ssd") == 2, str(report)
    first, last = (r.ir for r in report.rewrites if r.kind == "ssd")
    assert "h0=" not in first and "h0=" in last, (first, last)


def test_decay_buffers_that_change_run_the_graph_unrewritten():
    torch.manual_seed(0)
    m, ref = Layer(), Layer()
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, backend="seqfuse", options={"downstream": "aot_eager"})
    x = _x(16).detach()
    with counting() as tally:
        assert rel_err(compiled(x), ref(x)) < 1e-5
        assert not tally.fallbacks().get("graph"), tally.fallbacks()
        # a decay table no longer a power of the rate (the rate itself unchanged): the guard sees it
        with torch.no_grad():
            for mod in (m, ref):
                mod.attn.diagonal_decay.mul_(0.5)
        out = call_past_a_changed_guard(compiled, x)
        assert rel_err(out, ref(x)) < 1e-5
        assert sum(tally.fallbacks().get("graph", {}).values()) == 1, tally.fallbacks()


class _Cache:
    """The two methods MiniMaxLightningAttention calls on its cache."""

    def __init__(self, state):
        self.state = state

    def get_linear_cache(self, layer_idx):
        return self.state

    def set_linear_cache(self, layer_idx, state):
        self.state = state


class CachedLayer(Layer):
    """The layer continuing from a cached state: its per-step loop S = exp(-s)·S + k_tᵀ·v_t, o_t = q_t·S."""

    def forward(self, x, state):
        cache = _Cache(state)
        out = self.attn(x, None, None, cache=cache)[0]
        return out, cache.state


def test_the_cached_path_is_one_scan_with_its_readout():
    # the loop is an elementwise scan over (K, V) from the cache; its readout q_t·S sums K, so the scan
    # is read with K last (scan_readout): c = q, h0 = the cache, the states never materialized
    state = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    report = check_against_eager(CachedLayer(), _x(12), state)
    assert report.count("scan") + report.count("ssd") == 1 and not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    assert report.count("ssd") == 1 or ("c=%" in ir and "h0=%" in ir), ir

"""compiler/decay_buffers.py on the tables of MiniMax-Text-01's own configuration (64 heads, blocks of 256,
80 layers): every table of every kind of layer is read back bit for bit, the strongest decays underflowing
to zero inside the triangle and the last layer's nearly-1 powers (rates of 1e-8) included."""
import pytest
import torch

from seqfuse.compiler.decay_buffers import _fit, _same_bits

minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")


@pytest.mark.parametrize("layer", [0, 40, 79])
def test_minimax_text_01_tables_are_read_bit_for_bit(layer):
    from transformers import MiniMaxConfig
    cfg = MiniMaxConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                        block_size=256, layer_types=["linear_attention"] * 80)
    m = minimax.MiniMaxLightningAttention(cfg, layer)
    rate = m.slope_rate
    want = {"query_decay": ([-1, -1], None), "key_decay": ([-255, 1], None), "diagonal_decay": ([0, -1, 1], (2, 3, 0))}
    for name, (coef, keep) in want.items():
        table = getattr(m, name)
        fit = _fit(table, rate)
        assert fit is not None and fit[:2] == (coef, keep), (name, fit)
        assert _same_bits(*fit, rate, table), name
    if layer == 0:      # the strongest decays underflow to 0 inside the triangle: still read
        assert bool((m.diagonal_decay[0, 0].tril() == 0).any())


def test_a_table_one_ulp_off_or_not_a_power_is_refused():
    rate = torch.tensor([0.5, 0.25])[:, None, None]
    pos = torch.arange(8) + 1
    table = torch.exp(-rate * pos[:, None])
    assert _same_bits(*_fit(table, rate), rate, table)
    off = table.clone()
    off[1, 3, 0] = torch.nextafter(off[1, 3, 0], torch.tensor(0.0))
    fit = _fit(off, rate)
    assert fit is None or not _same_bits(*fit, rate, off)
    assert _fit(torch.rand(2, 8, 1) + 0.1, rate) is None

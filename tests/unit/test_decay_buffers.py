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


class _Tables(torch.nn.Module):
    """A rate buffer and a table buffer built from it (or not quite), both read by forward."""

    def __init__(self, rate, table):
        super().__init__()
        self.register_buffer("rate", rate)
        self.register_buffer("table", table)

    def forward(self, x):
        return x * self.table + torch.exp(-self.rate * 2).sum()


def _random_table(g):
    """(rate (H, 1, 1), table (H, T, T) or (H, T, 1), exact?) with table = where(keep, exp(-rate·E), 0),
    E = β + α_i·i + α_j·j, keep a lower triangle or all; one entry moved by an ulp when not exact."""
    H, T = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
    rate = (0.01 + torch.rand(H, 1, 1, generator=g)) * (10.0 ** float(torch.randint(-3, 1, (1,), generator=g)))
    a_i, a_j, beta = (int(v) for v in torch.randint(-2, 3, (3,), generator=g))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    two_d = bool(torch.rand(1, generator=g) < 0.6)
    E = beta + a_i * i + (a_j * j if two_d else 0)
    table = torch.exp(-rate * E)
    if two_d and bool(torch.rand(1, generator=g) < 0.5):
        k = int(torch.randint(-1, 2, (1,), generator=g))
        table = torch.where(j <= i + k, table, 0.0)
    exact = bool(torch.rand(1, generator=g) < 0.6)
    if not exact:
        flat = table.reshape(-1)
        nz = torch.nonzero(flat).reshape(-1)
        at = nz[int(torch.randint(0, nz.numel(), (1,), generator=g))]
        flat[at] = torch.nextafter(flat[at], torch.tensor(float("inf")))
    return rate, table, exact, (a_i, a_j if two_d else 0)


def test_random_tables_are_read_only_when_they_are_the_expression_bit_for_bit():
    import seqfuse
    g = torch.Generator().manual_seed(0)
    read = 0
    for case in range(40):
        rate, table, exact, alphas = _random_table(g)
        m = _Tables(rate, table)
        x = torch.randn(table.shape, generator=g)
        torch._dynamo.reset()           # a fresh compile per table (a graph of another case would be reused)
        report = seqfuse.explain(m, x, options={"downstream": "eager"})
        assert torch.equal(report.output, m(x)), case          # the same bits, read or not
        guarded = [gd for graph in report.graphs for gd in graph.guards]
        if not exact:
            assert "l_self_buffers_table_" not in guarded, (case, guarded)
        elif any(alphas) and float(rate.max()) > 1e-3:
            # an exact table whose powers the fit can resolve is read (and so guarded)
            assert "l_self_buffers_table_" in guarded, (case, alphas, guarded)
            read += 1
    assert read >= 10, read

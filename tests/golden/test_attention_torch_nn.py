"""PyTorch's own attention modules: ``nn.MultiheadAttention`` (with and without the averaged weights,
boolean and additive masks, key padding) and ``nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``.

No test covered them before.  In training they run ``F.multi_head_attention_forward``: SDPA where the
weights are not asked for, else the product, softmax and product written out (the weights averaged over
heads and returned).  Each test checks the rewrites (report) and the output and every gradient, of the
inputs and of every parameter, against eager.
"""
from __future__ import annotations

import pytest
import torch

from helpers import check_against_eager

B, L, S, E, H = 2, 16, 10, 32, 4


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)   # True: not allowed (nn.MultiheadAttention's rule)


class SelfAttention(torch.nn.Module):
    def __init__(self, need_weights: bool, mask: str, **kw):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(E, H, batch_first=True, **kw)
        self.need_weights, self.mask = need_weights, mask

    def forward(self, x, pad):
        mask = {"none": None, "causal": causal(x.shape[1]),
                "additive": torch.zeros(x.shape[1], x.shape[1]).masked_fill(causal(x.shape[1]), float("-inf"))}[self.mask]
        if self.mask == "additive":   # masks of one type (mixed types warn, and Dynamo then runs the module eagerly)
            pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
        out, _ = self.mha(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=self.need_weights)
        return out   # the weights, when computed, are dropped


def _padding() -> torch.Tensor:
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -3:] = True
    return pad


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights_dropped"])
@pytest.mark.parametrize("mask", ["none", "causal", "additive"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_multihead_attention(need_weights, mask, bias):
    torch.manual_seed(0)
    model = SelfAttention(need_weights, mask, bias=bias)
    x = torch.randn(B, L, E, requires_grad=True)
    report = check_against_eager(model, x, _padding())
    assert report.count("attention") == 1, report


def test_multihead_attention_returning_its_weights_is_a_near_miss():
    """The averaged weights read the probabilities a second time: the attention is left as written,
    with a near miss, and the numbers are eager's."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            out, weights = self.mha(x, x, x, attn_mask=causal(x.shape[1]))
            return out, weights

    report = check_against_eager(Both(), torch.randn(B, L, E, requires_grad=True))
    assert report.count("attention") == 0, report
    assert any("the probabilities are used" in m.reason for m in report.near_misses), report


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=norm_first)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, pad):
            return self.layer(x, src_mask=causal(x.shape[1]), src_key_padding_mask=pad, is_causal=True)

    report = check_against_eager(Encoder(), torch.randn(B, L, E, requires_grad=True), _padding())
    assert report.count("attention") == 1, report


def test_transformer_decoder_layer():
    """Causal self-attention and cross-attention to a memory of another length: two attentions."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, memory):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.layer(x, memory, tgt_mask=mask, tgt_is_causal=True)

    report = check_against_eager(Decoder(), torch.randn(B, L, E, requires_grad=True),
                                 torch.randn(B, S, E, requires_grad=True))
    assert report.count("attention") == 2, report

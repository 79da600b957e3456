"""index_form: trees of delta._Chunked written with named indices; equal values spelled differently get
equal forms, different values different ones, and masks resolve over a region of the last two indices."""
import math

import pytest
import torch
import torch.fx

from seqfuse.passes.index_form import ZERO, NoForm, form


def _invs(**shapes):
    """Loop-invariant trees ("inv", node) of the given shapes (placeholders with a value)."""
    g = torch.fx.Graph()
    out = {}
    for name, shape in shapes.items():
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(shape)
        out[name] = ("inv", n)
    return out


def _mask(C, kind):
    ii, jj = torch.meshgrid(torch.arange(C), torch.arange(C), indexing="ij")
    m = {"lower": jj <= ii, "strict_lower": jj < ii}[kind]
    return ("mask", (C, C), tuple(bool(b) for b in m.reshape(-1).tolist()))


L = ("b", "h", "i", "j")
B, H, C, D = 2, 3, 4, 5


def test_a_product_written_as_an_einsum_or_as_moved_operands_is_one_form():
    t = _invs(a=(B, H, C, D), b=(B, H, C, D))
    mmt = ("ein", "abcd,abed->abce", t["a"], t["b"])                        # a · bᵀ
    # the same sum with the operands' roles swapped and the result transposed back
    swapped = ("ax", ("ein", "abcd,abed->abce", t["b"], t["a"]), (0, 1, 3, 2), ("2", "3", "4", "4"))
    assert form(None, mmt, L) == form(None, swapped, L)
    # a · aᵀ is another value
    assert form(None, mmt, L) != form(None, ("ein", "abcd,abed->abce", t["a"], t["a"]), L)


def test_exponentials_of_a_product_merge_into_one():
    t = _invs(x=(B, H, C, C), y=(B, H, C, C))
    two = ("mul", ("exp", t["x"]), ("exp", ("neg", t["y"])))
    one = ("exp", ("sub", t["x"], t["y"]))
    assert form(None, two, L) == form(None, one, L)
    assert form(None, ("exp", ("add", t["x"], t["y"])), L) != form(None, one, L)


def test_a_mask_outside_or_inside_the_exponent_reads_the_same_over_its_region():
    t = _invs(s=(B, H, C, C), d=(B, H, C, C))
    outside = ("where", _mask(C, "lower"), ("mul", t["s"], ("exp", t["d"])), 0.0)
    inside = ("mul", t["s"], ("exp", ("where", _mask(C, "lower"), t["d"], -math.inf)))
    assert form(None, outside, L, "lower") == form(None, inside, L, "lower") == form(None, ("mul", t["s"], ("exp", t["d"])), L)
    assert form(None, outside, L, "strict_upper") == ZERO
    assert form(None, inside, L, "strict_upper") == ZERO
    # unmasked: not zero above the diagonal
    assert form(None, ("mul", t["s"], ("exp", t["d"])), L, "strict_upper") != ZERO


def test_a_mask_that_is_not_constant_over_the_region_has_no_form():
    t = _invs(s=(B, H, C, C))
    strict = ("where", _mask(C, "strict_lower"), t["s"], 0.0)
    assert form(None, strict, L, "strict_lower") == form(None, t["s"], L)
    with pytest.raises(NoForm):
        form(None, strict, L, "lower")           # the diagonal is kept by one, zeroed by the other
    with pytest.raises(NoForm):
        form(None, strict, L)                    # no region: a where stays unresolved


def test_the_vectorized_column_build_of_fla_is_the_einsum_of_transformers():
    # Σ_d k_c,d · exp(γ_c,d − γ_i,d) · k_i,d built with the column index i first (loop_map's layout)
    # and moved last, against the einsum over k[..., :, None, :] · k[..., None, :, :] · exp(γ_i − γ_j)
    t = _invs(k=(B, H, C, D), g=(B, H, C, D))
    k, g = t["k"], t["g"]
    g_cols = ("ax", g, (2, 0, 1, None, 3), ("4", "2", "3", "1", "5"))           # (C_i, B, H, 1, D)
    cols = ("ein", "eabcd,eabd->eabc",
            ("mul", ("exp", ("sub", g, g_cols)), k),                               # (C_i, B, H, C_c, D)
            ("ax", k, (2, 0, 1, 3), ("4", "2", "3", "5")))                         # (C_i, B, H, D)
    fla = ("ax", cols, (1, 2, 3, 0), ("2", "3", "4", "4"))                        # (B, H, C_c, C_i)
    rows = ("ax", k, (0, 1, 2, None, 3), ("2", "3", "4", "1", "5"))
    colk = ("ax", k, (0, 1, None, 2, 3), ("2", "3", "1", "4", "5"))
    decay = ("exp", ("sub", ("ax", g, (0, 1, 2, None, 3), ("2", "3", "4", "1", "5")),
                     ("ax", g, (0, 1, None, 2, 3), ("2", "3", "1", "4", "5"))))
    hf = ("ein", "abcde,abcde->abcd", ("mul", rows, colk), decay)
    assert form(None, fla, L) == form(None, hf, L)

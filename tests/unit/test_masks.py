"""classify_mask / position_mask: structural masks round-trip, anything else stays a tensor mask (None)."""
import itertools

import pytest
import torch

from seqfuse.ir.masks import classify_mask, position_mask


def brute(lq, lk, kind, diag=0, window=0):
    """The mask written out element by element from the documented rules."""
    m = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            ok = kind == "none" or j <= i + diag
            if kind == "window":
                ok = ok and j > i + diag - window
            m[i, j] = ok
    return m


@pytest.mark.parametrize("lq, lk, kind, diag, window", [
    (8, 8, "causal", 0, 0),
    (8, 8, "causal", -2, 0),
    (8, 8, "causal", 3, 0),
    (6, 10, "causal", 0, 0),
    (6, 10, "causal", -2, 0),
    (6, 10, "causal", 3, 0),
    (10, 6, "causal", 0, 0),
    (10, 6, "causal", -2, 0),
    (10, 6, "causal", 3, 0),
    (8, 8, "window", 0, 3),
    (8, 8, "window", -2, 3),
    (8, 8, "window", 3, 4),
    (8, 8, "window", 0, 1),
    (6, 10, "window", 2, 4),
    (10, 6, "window", -2, 2),
    (12, 5, "window", 0, 3),      # the window leaves the last rows empty
])
def test_round_trip(lq, lk, kind, diag, window):
    m = position_mask(lq, lk, kind, diag, window)
    assert m.dtype == torch.bool and m.shape == (lq, lk)
    assert torch.equal(m, brute(lq, lk, kind, diag, window))
    assert classify_mask(m) == (kind, diag, window)


@pytest.mark.parametrize("lq, lk", [(8, 8), (4, 9), (9, 4), (1, 1)])
def test_all_true_is_none(lq, lk):
    assert position_mask(lq, lk, "none") is None
    assert classify_mask(torch.ones(lq, lk, dtype=torch.bool)) == ("none", 0, 0)
    # a causal mask whose diagonal is past the last key is no mask at all
    assert classify_mask(position_mask(lq, lk, "causal", lk - 1)) == ("none", 0, 0)


def test_position_mask_rejects_unknown_kind():
    with pytest.raises(ValueError, match="mask must be none|causal|window"):
        position_mask(4, 4, "diagonal")


def test_sweep_never_misclassifies():
    """Over every small size, diagonal and window: a classification always reproduces the mask
    exactly, and every mask with an unclipped row upper end (j <= i + diag active) is classified."""
    classified = 0
    for lq, lk in itertools.product((1, 3, 4, 6), repeat=2):
        for kind, diag, window in itertools.chain(
                (("causal", d, 0) for d in range(-5, 6)),
                (("window", d, w) for d in range(-5, 6) for w in range(1, 7))):
            m = position_mask(lq, lk, kind, diag, window)
            c = classify_mask(m)
            upper_active = bool((m.any(dim=1) & ~m[:, -1]).any())
            if c is None:
                assert not upper_active, (lq, lk, kind, diag, window)
                continue
            classified += 1
            back = position_mask(lq, lk, *c)
            back = torch.ones(lq, lk, dtype=torch.bool) if back is None else back
            assert torch.equal(back, m), (lq, lk, kind, diag, window, c)
    assert classified > 500


@pytest.mark.parametrize("seed", range(5))
def test_random_masks_are_rejected(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(8, 8, generator=g) < 0.5
    assert classify_mask(m) is None


@pytest.mark.parametrize("kind, diag, i, j", [
    ("causal", 0, 3, 1),      # a hole inside the triangle
    ("causal", 0, 1, 4),      # one key above the diagonal
    ("causal", 0, 0, 0),      # the first row emptied, the others unchanged
    ("causal", -2, 5, 5),
    ("causal", 3, 2, 5),      # the diagonal of one row shifted by one
    ("window", 0, 4, 2),
])
def test_one_flipped_entry_is_rejected(kind, diag, i, j):
    m = position_mask(6, 6, kind, diag, 3 if kind == "window" else 0)
    m[i, j] = ~m[i, j]
    assert classify_mask(m) is None


def test_every_single_flip_is_rejected_or_exact():
    """Flipping one entry of a causal mask mostly breaks it; the few flips that give another
    structural mask (e.g. the last row's first key: a window) must be classified exactly."""
    base = position_mask(6, 6, "causal")
    rejected = 0
    for i, j in itertools.product(range(6), repeat=2):
        m = base.clone()
        m[i, j] = ~m[i, j]
        c = classify_mask(m)
        if c is None:
            rejected += 1
        else:
            assert torch.equal(position_mask(6, 6, *c), m), (i, j, c)
    assert rejected == 35  # all but (5, 0): the last row losing key 0 is a window of 5


def test_block_diagonal_is_rejected():
    m = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 2)
    assert classify_mask(m) is None
    # and its causal version (causal within each document)
    assert classify_mask(m & position_mask(8, 8, "causal")) is None


@pytest.mark.parametrize("m", [
    torch.zeros(6, 6, dtype=torch.bool),                    # every row empty
    position_mask(6, 6, "causal").float(),                  # not bool
    position_mask(6, 6, "causal")[None],                    # not 2-D
    ~position_mask(6, 6, "causal"),                         # strictly upper triangle
    position_mask(6, 6, "causal").flip(0),                  # anti-diagonal causal
])
def test_other_masks_are_rejected(m):
    assert classify_mask(m) is None

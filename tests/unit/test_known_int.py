"""pattern.known_int: a symbolic size counts as an int only where the shape environment's guards pin it
to one value (proven by the environment, or by evaluating every guard over the symbol's whole proven
range when that range is small, leaving out the guards that also read another symbol)."""
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from seqfuse.passes.pattern import known_int


def sym(env, name, hint):
    s = env.create_symbol(hint, source=ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(s, hint=hint)


def test_ints_and_plain_symbols():
    env = ShapeEnv()
    t = sym(env, "t", 13)
    assert known_int(7) == 7
    assert known_int(t) is None                  # nothing guarded: any length
    assert known_int(2.0) is None


def test_pinned_by_guards_on_a_small_range():
    env = ShapeEnv()
    t = sym(env, "t", 13)
    assert bool(t >= 12) and bool(t < 16)        # the range [12, 15]
    assert known_int(t) is None                  # four lengths still possible
    assert bool(t % 2 == 1) and bool(t // 2 % 2 == 0)   # 13 is the only odd t in [12, 15] with t//2 even
    assert known_int(t) == 13
    assert known_int(t * 2 + 1) == 27            # any expression of the pinned symbol


def test_a_wide_range_is_not_enumerated():
    env = ShapeEnv()
    t = sym(env, "t", 600)
    assert bool(t >= 512) and bool(t < 1024) and bool(t % 600 == 0)   # pins 600, but 512 values to check
    assert known_int(t) is None


def test_a_guard_coupling_two_symbols_does_not_unpin_it():
    env = ShapeEnv()
    t, b = sym(env, "t", 13), sym(env, "b", 3)
    assert bool(t >= 12) and bool(t < 16) and bool(t % 2 == 1) and bool(t // 2 % 2 == 0)
    assert bool(t * b > 30)                      # t and b vary together: it can only rule out more t
    assert known_int(t) == 13


def test_a_pin_only_through_another_symbol_is_not_trusted():
    env = ShapeEnv()
    t, b = sym(env, "t", 13), sym(env, "b", 3)
    assert bool(t >= 12) and bool(t < 16)
    assert bool(t * b == 39)                     # only at b = 3 does this pin t; b may differ at run time
    assert known_int(t) is None

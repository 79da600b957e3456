"""Linearity of a re-rolled loop's carried updates, proven over the body template.

Each template value is either *constant* (reads no carried value) or ``Lin``:

    value = (Π coef) ⊙ h_k  +  Σ_terms sign · (Π factors)

in exactly one carried value h_k of the previous step, where every factor is constant (a
template entry, an invariant or a number).  Only the operations that keep that form are
accepted; anything else is a near miss naming the operation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqfuse.passes.loop_reroll import Loop, NoLoop
from seqfuse.passes.pattern import CASTS, IDENTITIES, arg, is_op, op_name

aten = torch.ops.aten

#: casts and copies of the state keep it linear (the IR op computes in the promoted dtype)
PASS_THROUGH = CASTS + IDENTITIES


@dataclass
class Lin:
    """(Π coef) ⊙ h_state + Σ sign·Π factors.  Factors are roles: ("L", j), ("I", node), ("C", number)."""

    state: int
    coef: list = field(default_factory=list)      # [(factor, power)]
    terms: list = field(default_factory=list)     # [(sign, [(factor, power)])]

    def scaled(self, factor, power=1) -> "Lin":
        # (a·h + Σ b)·c = (a·c)·h + Σ (b·c)
        return Lin(self.state, self.coef + [(factor, power)],
                   [(s, fs + [(factor, power)]) for s, fs in self.terms])

    def negated(self) -> "Lin":
        # -(a·h + Σ b) = (-1·a)·h + Σ (-b)
        return Lin(self.state, self.coef + [(("C", -1), 1)], [(-s, fs) for s, fs in self.terms])

    def plus(self, factor, sign) -> "Lin":
        # (a·h + Σ b) ± c
        return Lin(self.state, list(self.coef), self.terms + [(sign, [(factor, 1)])])


class Analysis:
    """Which template entries depend on which carried values, and the Lin form of the updates."""

    def __init__(self, loop: Loop):
        self.loop = loop
        n = len(loop.template)
        self.deps: list[frozenset] = [frozenset()] * n
        for j in range(n):
            if loop.roles[j] is None:
                continue
            d = set()
            for r in _leaves(loop.roles[j]):
                if r[0] == "P":
                    d.add(r[1])
                elif r[0] == "L":
                    d |= self.deps[r[1]]
            self.deps[j] = frozenset(d)
        self._lin: dict[int, Lin | None] = {}

    def const(self, role) -> bool:
        """Whether an argument role reads no carried value."""
        if role[0] == "P":
            return False
        if role[0] == "L":
            return not self.deps[role[1]]
        if role[0] == "T":
            return all(self.const(e) for e in role[2])
        return True

    def update(self, k: int) -> Lin:
        """The Lin form of carried value k's update, or NoLoop with the reason."""
        loop = self.loop
        if loop.roles[k] is None:
            raise NoLoop("a step reads the previous step's input slice (a lag, not a recurrence)")
        if not self.deps[k]:
            raise NoLoop("a value carried between steps does not depend on its previous value")
        lin = self.lin(("L", k))
        if lin.state != k:
            raise NoLoop("a carried value is computed from another carried value (coupled states)")
        return lin

    def lin(self, role) -> Lin | None:
        """Lin of an argument role (None when it is constant)."""
        if role[0] == "P":
            return Lin(role[1])
        if role[0] != "L" or not self.deps[role[1]]:
            return None
        j = role[1]
        if j not in self._lin:
            self._lin[j] = self._node(j)
        return self._lin[j]

    def _node(self, j: int) -> Lin:
        loop = self.loop
        node = loop.template[j]
        args, kwargs = loop.roles[j]
        a = args[2]
        if len(self.deps[j]) > 1:
            raise NoLoop("the state is combined with another carried value (coupled states, e.g. an LSTM/GRU cell)")
        if is_op(node, *PASS_THROUGH) and len(a) >= 1:
            # a cast or copy of a·h + b is a·h + b
            dtype = getattr(node.meta.get("val"), "dtype", None)
            if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
                raise NoLoop(f"the state is cast to {dtype} (not linear)")
            if any(not self.const(r) for r in a[1:]):
                raise NoLoop(f"the state passes through {op_name(node)} with a state-dependent argument")
            return self.lin(a[0])
        if is_op(node, aten.mul):
            x, y = self.lin(a[0]), self.lin(a[1])
            if x is not None and y is not None:
                what = "itself" if x.state == y.state else "another carried value"
                raise NoLoop(f"the state is multiplied by {what} (not linear)")
            return x.scaled(a[1]) if x is not None else y.scaled(a[0])
        if is_op(node, aten.div):
            x, y = self.lin(a[0]), self.lin(a[1])
            if y is not None:
                raise NoLoop("the carried update divides by the state (not linear)")
            if kwargs.get("rounding_mode", ("C", None))[1] is not None:
                raise NoLoop("the carried update rounds a division of the state (not linear)")
            return x.scaled(a[1], -1)
        if is_op(node, aten.add, aten.sub, aten.rsub):
            alpha = kwargs.get("alpha", a[2] if len(a) > 2 else ("C", 1))
            if not self.const(alpha):
                raise NoLoop("the carried update scales a term by the state")
            x, y = self.lin(a[0]), self.lin(a[1])
            if x is not None and y is not None:
                raise NoLoop("the carried update adds two terms that both depend on the state (not diagonal)")
            sign = -1 if is_op(node, aten.sub) else 1
            if is_op(node, aten.rsub):   # rsub(x, y) = y - alpha·x
                x, y, a = y, x, (a[1], a[0])
                sign = -1
            if x is not None:            # x ± alpha·c
                term = a[1] if alpha == ("C", 1) else None
                if term is None:
                    return Lin(x.state, list(x.coef), x.terms + [(sign, [(a[1], 1), (alpha, 1)])])
                return x.plus(term, sign)
            # c ± alpha·y
            y = y.scaled(alpha) if alpha != ("C", 1) else y
            y = y.negated() if sign < 0 else y
            return y.plus(a[0], 1)
        if is_op(node, aten.neg):
            return self.lin(a[0]).negated()
        if is_op(node, aten.einsum, aten.matmul, aten.mm, aten.bmm):
            raise NoLoop(f"the carried update contracts the state with {op_name(node)} (not elementwise)")
        if is_op(node, aten.maximum, aten.max, aten.amax, aten.clamp_min):
            # xLSTM's mLSTM, a changed RWKV-4 WKV: num·e^m and den·e^m are linear, the stabilizer m is not
            raise NoLoop(f"the carried update applies {op_name(node)} to the state (not linear): a running "
                         "maximum, the stabilizer of a log-space recurrence (xLSTM's m), is not lifted unless the "
                         "loop is RWKV-4's WKV (loop_stabilized) or xLSTM's mLSTM step (mlstm_loop) step for step")
        raise NoLoop(f"the carried update applies {op_name(node)} to the state (not linear)")


def _leaves(roles):
    args, kwargs = roles
    stack = [args, *kwargs.values()]
    while stack:
        x = stack.pop()
        if x[0] == "T":
            stack.extend(x[2])
        else:
            yield x


def leaves(roles):
    return _leaves(roles)


__all__ = ["Analysis", "Lin", "PASS_THROUGH", "leaves", "arg"]

"""Runtime: per-call dispatch of IR ops to triton / aten / eager implementations, and counters."""
from seqfuse.runtime.counters import counters, fallbacks, reset_counters
from seqfuse.runtime.values import all_finite, all_within, below_pos_inf
from seqfuse.runtime.dispatch import PATHS, RUNTIME_CHOICES, Impl, ProgramRequired, choose, poisoned, \
    refuse_nonfinite_decay, refuse_or_poison, register_impl, run

__all__ = ["all_finite", "all_within", "below_pos_inf", "counters", "fallbacks", "reset_counters", "PATHS", "RUNTIME_CHOICES", "Impl", "ProgramRequired", "choose",
           "poisoned", "refuse_nonfinite_decay", "refuse_or_poison", "register_impl", "run"]

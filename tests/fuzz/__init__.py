"""seqfuse's differential fuzzer: random programs of each mixer family, run eagerly, through
``backend="seqfuse"`` and on fp64 copies (the oracle); see check.py and docs/reliability.md.

``python -m tests.fuzz --help``; each family module (attention, recurrence, long_conv) exposes
``cases(rng, n, triton) -> Iterator[Case]``.
"""

"""Options of the seqfuse backend, as given to ``torch.compile(..., options={...})``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from collections.abc import Mapping
from typing import Any

DOWNSTREAMS = ("inductor", "aot_eager", "eager")
RUNTIMES = ("auto", "triton", "cpu", "aten", "eager")
#: the algorithms a user may force per IR op kind with ``options={"algorithm": {kind: name}}``
ALGORITHMS = {"attention": ("fused",), "long_conv": ("fft", "direct"),
              "ssd": ("quadratic", "chunked", "recurrent"), "scan": ("recurrent", "chunked"),
              "delta": ("recurrent", "chunked")}


@dataclass(frozen=True)
class Options:
    """Validated backend options.

    downstream: compiler for the rest of the graph: "inductor" (default), "aot_eager" or "eager".
    passes:     {pass name: enabled}; passes not named keep their default (built-ins on).
    dump_dir:   directory to write the graph before/after each pass and the IR into, or None.
    verify:     run the original graph eagerly on the first call and compare outputs.
    runtime:    path for IR ops: "auto" (best available), "triton", "cpu" (generated C kernels), "aten" or "eager".
    algorithm:  {IR op kind: algorithm} forcing the cost model's choice, e.g.
                {"ssd": "chunked", "scan": "recurrent"}; see ALGORITHMS for the names.
    sequence_parallel: None, or {"group": a torch.distributed ProcessGroup, or None for the
                default group}: each rank holds a contiguous slice of the sequence and the ssd / scan
                ops compute the recurrence over the whole sequence (docs/distributed.md).  Stored as
                the group's name.
    """

    downstream: str = "inductor"
    passes: dict = field(default_factory=dict)
    dump_dir: str | None = None
    verify: bool = False
    runtime: str = "auto"
    algorithm: dict = field(default_factory=dict)
    sequence_parallel: str | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "Options":
        """Validate a user's options dict; raises ValueError naming the bad option."""
        if options is not None and not isinstance(options, Mapping):
            hint = ""
            if isinstance(options, (list, tuple, set)) and all(isinstance(o, str) for o in options):
                hint = "; e.g. options={" + ", ".join(f"{o!r}: True" for o in options) + "}"
            raise ValueError(f"seqfuse: argument 'options' must be a dict {{option name: value}} or None, got "
                             f"{type(options).__name__} {options!r}{hint}; valid option names are "
                             f"{[f.name for f in fields(cls)]}")
        options = dict(options or {})
        bad_keys = [k for k in options if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"seqfuse: argument 'options' must have option names (str) as keys, got {bad_keys!r}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"seqfuse: unknown option(s) {unknown}; valid options are {valid}")
        downstream = options.get("downstream", "inductor")
        if downstream not in DOWNSTREAMS:
            raise ValueError(f"seqfuse: option 'downstream' must be one of {DOWNSTREAMS}, got {downstream!r}")
        runtime = options.get("runtime", "auto")
        if runtime not in RUNTIMES:
            raise ValueError(f"seqfuse: option 'runtime' must be one of {RUNTIMES}, got {runtime!r}")
        passes = _validate_passes(options.get("passes", {}))
        dump_dir = options.get("dump_dir")
        if isinstance(dump_dir, os.PathLike):
            dump_dir = os.fspath(dump_dir)
        if dump_dir is not None and not isinstance(dump_dir, str):
            raise ValueError(f"seqfuse: option 'dump_dir' must be a path (str or os.PathLike) or None, "
                             f"got {dump_dir!r}")
        verify = options.get("verify", False)
        if not isinstance(verify, bool):
            raise ValueError(f"seqfuse: option 'verify' must be a bool, got {verify!r}")
        algorithm = options.get("algorithm", {})
        if not isinstance(algorithm, dict):
            raise ValueError(f"seqfuse: option 'algorithm' must be a dict {{op kind: algorithm}}, got {algorithm!r}")
        for kind, name in algorithm.items():
            if kind not in ALGORITHMS:
                raise ValueError(f"seqfuse: option 'algorithm' names unknown op kind {kind!r}; "
                                 f"kinds: {sorted(ALGORITHMS)}")
            if name not in ALGORITHMS[kind]:
                raise ValueError(f"seqfuse: option 'algorithm' for {kind!r} must be one of {ALGORITHMS[kind]}, "
                                 f"got {name!r}")
        return cls(downstream=downstream, passes=passes, dump_dir=dump_dir, verify=verify, runtime=runtime,
                   algorithm=dict(algorithm), sequence_parallel=_validate_sequence_parallel(options))


def _validate_sequence_parallel(options: dict) -> str | None:
    """Option 'sequence_parallel': None, or {"group": ProcessGroup | None} -> the group's name."""
    sp = options.get("sequence_parallel")
    if sp is None:
        return None
    if not isinstance(sp, dict) or set(sp) - {"group"}:
        raise ValueError("seqfuse: option 'sequence_parallel' must be None or a dict {'group': ProcessGroup or None}, "
                         f"got {sp!r}")
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("seqfuse: option 'sequence_parallel' needs torch.distributed initialized "
                         "(torch.distributed.init_process_group) before compiling")
    group = sp.get("group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"seqfuse: option 'sequence_parallel' 'group' must be a ProcessGroup or None, got {group!r}")
    from seqfuse.lowering.sequence_parallel import group_name_of
    return group_name_of(group)


def _validate_passes(passes: Any) -> dict:
    """Normalize option 'passes' to {name: bool} or {"__only__": [names]}, checking every name
    against the pass registry now, so that a misspelt pass name is an option error raised at
    compile time (and by ``seqfuse.explain`` up front) rather than a pipeline failure that
    non-strict mode would turn into a warning and an unchanged graph."""
    if isinstance(passes, (list, tuple)):
        names = list(passes)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"seqfuse: option 'passes' as a list must hold pass names (str), got {passes!r}")
        normalized = {"__only__": names}
    elif isinstance(passes, dict) and all(isinstance(n, str) for n in passes) and \
            all(isinstance(v, bool) for v in passes.values()):
        names, normalized = list(passes), dict(passes)
    else:
        raise ValueError("seqfuse: option 'passes' must be a dict {pass name: bool} or a list of pass "
                         f"names to run, got {passes!r}")
    from seqfuse.passes import registered_passes  # the package import registers the built-ins
    known = sorted(p.name for p in registered_passes())
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"seqfuse: option 'passes' names unknown pass(es) {unknown}; registered: {known}")
    return normalized

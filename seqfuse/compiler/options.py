"""Options of the seqfuse backend, as given to ``torch.compile(..., options={...})``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DOWNSTREAMS = ("inductor", "aot_eager", "eager")
RUNTIMES = ("auto", "triton", "aten", "eager")


@dataclass(frozen=True)
class Options:
    """Validated backend options.

    downstream: compiler for the rest of the graph: "inductor" (default), "aot_eager" or "eager".
    passes:     {pass name: enabled}; passes not named keep their default (built-ins on).
    dump_dir:   directory to write the graph before/after each pass and the IR into, or None.
    verify:     run the original graph eagerly on the first call and compare outputs.
    runtime:    path for IR ops: "auto" (best available), "triton", "aten" or "eager".
    """

    downstream: str = "inductor"
    passes: dict = field(default_factory=dict)
    dump_dir: str | None = None
    verify: bool = False
    runtime: str = "auto"

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "Options":
        """Validate a user's options dict; raises ValueError naming the bad option."""
        options = dict(options or {})
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
        passes = options.get("passes", {})
        if isinstance(passes, (list, tuple)):
            passes = {"__only__": list(passes)}
        elif not isinstance(passes, dict) or not all(isinstance(v, bool) for v in passes.values()):
            raise ValueError("seqfuse: option 'passes' must be a dict {pass name: bool} or a list of pass "
                             f"names to run, got {passes!r}")
        dump_dir = options.get("dump_dir")
        if dump_dir is not None and not isinstance(dump_dir, str):
            raise ValueError(f"seqfuse: option 'dump_dir' must be a path string or None, got {dump_dir!r}")
        verify = options.get("verify", False)
        if not isinstance(verify, bool):
            raise ValueError(f"seqfuse: option 'verify' must be a bool, got {verify!r}")
        return cls(downstream=downstream, passes=passes, dump_dir=dump_dir, verify=verify, runtime=runtime)

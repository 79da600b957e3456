"""The ``torch.compile`` backend entry point: ``backend="seqfuse"``."""
from __future__ import annotations

import functools
import os
import threading
import time
import warnings

import torch
import torch.fx

from seqfuse import log
from seqfuse.compiler.options import Options
from seqfuse.compiler.canonicalize import Untraceable
from seqfuse.compiler.constants import guarded, guards_of, mutates, rerunning
from seqfuse.compiler.pipeline import run_pipeline
from seqfuse.compiler.report import GraphReport, publish
from seqfuse.compiler.verify import verifying
from seqfuse.compiler.checkpoint import signature as region_signature
from seqfuse.lowering.sequence_parallel import SequenceParallelUnsupported
from seqfuse.passes import enabled_passes


def _strict() -> bool:
    """SEQFUSE_STRICT=1 makes pipeline errors raise (tests set it) instead of compiling unchanged."""
    return os.environ.get("SEQFUSE_STRICT", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cache_key() -> str:
    """A hash of the seqfuse custom ops' schemas, version and defining sources (their fake
    implementations, which fix the output layouts inductor plans for).  Inductor's on-disk caches
    key compiled graphs by op names, not schemas: without this, a cached graph compiled against an
    older seqfuse could call an op with the wrong arguments or expect other output strides."""
    import hashlib
    import importlib

    import seqfuse
    names = ("attention", "attention_backward", "long_conv", "long_conv_backward",
             "ssd", "ssd_backward", "scan", "scan_backward", "delta", "delta_backward")
    schemas = sorted(str(getattr(torch.ops.seqfuse, name).default._schema) for name in names)
    sources = []
    for module in _OP_MODULES:
        path = importlib.import_module(module).__file__
        with open(path, "rb") as f:
            sources.append(hashlib.sha256(f.read()).hexdigest())
    return hashlib.sha256("\n".join([seqfuse.__version__, *schemas, *sources]).encode()).hexdigest()


#: the modules that define seqfuse's custom ops and their fake implementations
_OP_MODULES = ("seqfuse.lowering.attention_op", "seqfuse.lowering.long_conv_op", "seqfuse.lowering.ssd_op",
               "seqfuse.lowering.scan_op", "seqfuse.lowering.delta_op", "seqfuse.lowering.autograd")


def _inductor_patches(mode: str | None, regions: str = "") -> dict:
    """Inductor's config patches for one graph; ``regions`` is the graph's checkpoint-region signature
    (``seqfuse.compiler.checkpoint.signature``), which goes into the cache key with the op schemas."""
    from torch._inductor import config, list_mode_options
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class SeqfuseCacheKey(CustomGraphPass):
        """A no-op post-grad pass whose uuid puts seqfuse's op schemas into inductor's cache key, and
        the graph's recompute tags: inductor keys a graph by its code, and the partitioner reads the
        tags, so a graph cached without them would be reused for the same code with them."""

        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return _cache_key() + regions

    patches = dict(list_mode_options(mode)) if mode else {}
    if config.post_grad_custom_pre_pass is None:
        patches["post_grad_custom_pre_pass"] = SeqfuseCacheKey()
    return patches


def compile_downstream(gm: torch.fx.GraphModule, example_inputs, downstream: str, mode: str | None = None):
    """Compile the rewritten graph with the downstream compiler named by ``downstream``."""
    if downstream == "eager":
        return gm.forward
    if downstream == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, region_signature(gm.graph)))


#: IR op kind -> (module of its generated C kernels, the algorithms that run them)
_CPU_KERNELS = {"scan": ("scan", None), "ssd": ("ssd", ("recurrent",)), "delta": ("delta", ("recurrent",))}


def prefetch_cpu_kernels(report: GraphReport, example_inputs, runtime: str, gm: torch.fx.GraphModule | None = None):
    """Start building (or loading from the cache) the CPU path's C kernels this graph's IR ops will
    call, in a background thread, so that a first build overlaps the downstream compile instead of
    adding to the first call.  With the lowered graph ``gm``, exactly the kernel variants its ops
    call (``seqfuse.lowering.cpu.graph_variants``: one small library each); without, each kernel
    module's default check.  The dispatcher's own load waits for it (the build holds a lock); a
    build that fails is reported there as before.  Returns the thread, or None when nothing is to
    be built."""
    if runtime not in ("auto", "cpu"):
        return None
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.device.type != "cpu" for x in tensors):
        return None
    modules = sorted({_CPU_KERNELS[r.kind][0] for r in report.rewrites if r.kind in _CPU_KERNELS
                      and (_CPU_KERNELS[r.kind][1] is None or r.algorithm in _CPU_KERNELS[r.kind][1])})
    if not modules:
        return None
    variants: dict = {}
    if gm is not None:  # read now: the downstream compiler may change the graph while the thread runs
        try:
            from seqfuse.lowering.cpu import graph_variants
            variants = graph_variants(gm, example_inputs)
        except Exception as exc:  # noqa: BLE001 - then each module's default check, as before
            log.cache.debug("could not list the graph's C kernel variants: %s", exc)

    def build():
        import importlib
        for name in modules:
            wanted = variants.get(name)
            try:
                module = importlib.import_module(f"seqfuse.lowering.cpu.{name}")
                reasons = [module.available()] if wanted is None else [module.available(v) for v in wanted]
                reason = next((r for r in reasons if r), None)
            except Exception as exc:  # noqa: BLE001 - the dispatcher reports it on the call
                reason = f"{type(exc).__name__}: {exc}"
            log.cache.debug("prefetched the %s C kernels%s: %s", name,
                            "" if wanted is None else f" {[v.name for v in wanted]}", reason or "ready")

    thread = threading.Thread(target=build, name="seqfuse-cpu-kernels", daemon=True)
    thread.start()
    return thread


def _once(compile_fn):
    """``compile_fn(args)``, called at most once; later calls return the first result."""
    done: list = []

    def get(args):
        if not done:
            done.append(compile_fn(args))
        return done[0]
    return get


def seqfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Compile one Dynamo graph: find mixers, lift them to IR ops, lower them, compile the rest.

    ``options`` as in :class:`seqfuse.compiler.options.Options`; ``mode`` is
    forwarded to inductor.  If the pipeline itself fails on a graph, that graph
    is compiled unchanged with a warning (and the failure is in the report),
    unless SEQFUSE_STRICT=1.  A graph seqfuse does not re-trace (torch.func transforms
    inlined by Dynamo) is compiled unchanged with a near miss saying so, strict or not.
    """
    opts = Options.from_dict(options)
    enabled_passes(opts.passes)  # unknown pass names are the user's error: raise, don't fall back
    report = GraphReport()
    try:
        rewritten = run_pipeline(gm, example_inputs, opts, report)
    except Untraceable as exc:
        report.add_near_miss("graph", str(exc), exc.node)
        if opts.sequence_parallel is not None:
            raise SequenceParallelUnsupported(f"seqfuse: option 'sequence_parallel': a graph was left to the "
                                              f"downstream compiler ({exc}); its recurrences would cover this "
                                              "rank's slice only") from exc
        rewritten = gm
    except SequenceParallelUnsupported:
        raise  # compiling unchanged would run the recurrences on this rank's slice alone
    except Exception as exc:
        if _strict():
            raise
        warnings.warn(f"seqfuse: pipeline failed on a graph ({type(exc).__name__}: {exc}); compiling it unchanged")
        report.add_near_miss("pipeline", f"{type(exc).__name__}: {exc}")
        rewritten = gm
    guards = guards_of(rewritten) if rewritten is not gm else []
    report.guards = [name for _, name, _ in guards]
    publish(report)
    prefetch_cpu_kernels(report, example_inputs, opts.runtime, rewritten)
    start = time.perf_counter()
    compiled = compile_downstream(rewritten, example_inputs, opts.downstream, mode)
    report.downstream_seconds = time.perf_counter() - start
    unrewritten = _once(lambda args: compile_downstream(gm, args, opts.downstream, mode))
    if rewritten is not gm:
        # an op whose fast paths are not the program's for some values refuses such a call
        # (ProgramRequired, e.g. ssd's finite_only): the call runs the program as written
        cannot = ("the graph runs on this rank's slice of a sequence" if opts.sequence_parallel is not None else
                  "the graph also writes its inputs in place" if mutates(gm) else None)
        compiled = rerunning(compiled, cannot, unrewritten)
    if guards:
        # module buffers read as constants: a call whose buffers changed runs the graph unrewritten
        compiled = guarded(compiled, guards, unrewritten)
    log.pipeline.debug("graph: %d rewrite(s), %d near miss(es); seqfuse %.3f s, downstream %s %.3f s",
                       len(report.rewrites), len(report.near_misses), sum(report.seconds.values()),
                       opts.downstream, report.downstream_seconds)
    return verifying(compiled, gm) if opts.verify else compiled

"""TORCH_LOGS="seqfuse" / "+seqfuse": the passes' decisions, the algorithms, the runtime paths."""
import os
import subprocess
import sys
import textwrap

import torch

import seqfuse

SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    import seqfuse

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v

    def returns_probabilities(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return p @ v, p

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    seqfuse.explain(attention, q, k, v, options={"downstream": "eager"})
    seqfuse.explain(returns_probabilities, q, k, v, options={"downstream": "eager"})
    with warnings.catch_warnings(record=True) as caught:   # a warning stays a warning
        warnings.simplefilter("always")
        seqfuse.explain(attention, q, k, v, options={"downstream": "eager", "runtime": "triton"})
    assert any("runtime='triton' requested" in str(w.message) for w in caught), [str(w.message) for w in caught]
    print("DONE")
""")


def run(torch_logs):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TRITON_INTERPRET")}
    env.update(SEQFUSE_STRICT="1", OMP_NUM_THREADS="1")
    if torch_logs is not None:
        env["TORCH_LOGS"] = torch_logs
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("DONE")
    return proc.stderr


def test_debug_logs_every_decision():
    err = run("+seqfuse")
    assert err.count("rewrote attention at") == 2, err[-3000:]  # two explains of attention, each line once
    assert "rewrote attention at" in err and "(algorithm fused)" in err, err[-3000:]  # seqfuse.passes, INFO
    assert "near miss: attention at" in err and "probabilities are used 2 times" in err, err[-3000:]
    assert "attention %attention: algorithm fused" in err, err[-3000:]           # seqfuse.select, DEBUG
    assert "attention runs on the aten path" in err, err[-3000:]                # seqfuse.runtime, DEBUG
    assert "attention: path not taken: triton:" in err, err[-3000:]             # fallback reasons
    assert "canonicalize took" in err and "downstream eager" in err, err[-3000:]  # seqfuse.pipeline, DEBUG


def test_info_logs_rewrites_and_near_misses_only():
    err = run("seqfuse")
    assert "rewrote attention at" in err and "near miss: attention at" in err, err[-3000:]
    assert "runs on the aten path" not in err and "took" not in err, err[-3000:]


def test_one_component_by_name():
    err = run("+seqfuse.runtime")
    assert "attention runs on the aten path" in err, err[-3000:]
    assert "rewrote attention" not in err, err[-3000:]


def test_silent_by_default():
    err = run(None)
    assert "rewrote" not in err and "runs on the" not in err, err[-3000:]


def test_seqfuse_is_a_registered_torch_log_name():
    from torch._logging._internal import log_registry
    assert log_registry.log_alias_to_log_qnames.get("seqfuse") == ["seqfuse"]
    assert seqfuse.log.register_with_torch()  # idempotent
    assert {lg.name for lg in (seqfuse.log.passes, seqfuse.log.select, seqfuse.log.runtime, seqfuse.log.cache)} == \
        {"seqfuse.passes", "seqfuse.select", "seqfuse.runtime", "seqfuse.cache"}
    assert all(lg.parent is seqfuse.log.root for lg in (seqfuse.log.passes, seqfuse.log.cache))
    assert torch._logging._internal._has_registered_parent("seqfuse.passes")


def test_one_component_at_debug_and_each_line_once():
    script = textwrap.dedent("""
        import logging
        import torch
        import seqfuse
        logging.getLogger("seqfuse.cache").setLevel(logging.DEBUG)
        seqfuse.log.cache.debug("CACHE-LINE")
        seqfuse.log.runtime.debug("RUNTIME-LINE")
        seqfuse.log.passes.info("PASSES-LINE")
    """)
    env = {**{k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}, "TORCH_LOGS": "seqfuse"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("CACHE-LINE") == 1 and proc.stderr.count("PASSES-LINE") == 1, proc.stderr[-2000:]
    assert "RUNTIME-LINE" not in proc.stderr, proc.stderr[-2000:]

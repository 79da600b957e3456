"""python -m seqfuse: the environment report."""
import json
import os
import subprocess
import sys

import torch

import seqfuse


def run(*args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CC", "SEQFUSE_CPU_BASELINE")}
    full.update(env)
    proc = subprocess.run([sys.executable, "-m", "seqfuse", *args], env=full, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_text_report_names_every_section():
    out = run()
    assert out.startswith("seqfuse environment\n")
    for needle in (f"version: {seqfuse.__version__}", f"torch: {torch.__version__}", "triton:", "cuda:",
                   "c_compiler:", "flags: -O3", "cache_dirs:", "cpu_kernels:", "inductor:", "runtime_paths:",
                   "triton: ", "cpu: ", "aten: available", "eager: available", "backend_registered: True"):
        assert needle in out, (needle, out)


def test_json_report_and_the_reasons_a_path_is_not_available(tmp_path):
    report = json.loads(run("--json", CC=str(tmp_path / "no-such-cc"), SEQFUSE_CACHE_DIR=str(tmp_path / "cache"),
                            SEQFUSE_CPU_BASELINE="1"))
    paths = report["runtime_paths"]
    assert set(paths) == {"triton", "cpu", "aten", "eager"}
    assert paths["cpu"].startswith("not available: no C compiler") and "no-such-cc" in paths["cpu"], paths
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET is not set" in paths["triton"], paths
    assert report["c_compiler"]["path"] == "not found on PATH"
    assert "-mavx2" not in report["c_compiler"]["flags"] and report["c_compiler"]["cpu_flags"].startswith("baseline")
    assert report["cache_dirs"]["seqfuse"] == str(tmp_path / "cache")
    assert report["env"]["SEQFUSE_CPU_BASELINE"] == "1"
    assert report["seqfuse"]["version"] == seqfuse.__version__
    assert report["cuda"]["available"] == torch.cuda.is_available()


def test_interpreter_makes_triton_available_on_cpu():
    from seqfuse.__main__ import environment_report
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        report = environment_report(build=False)
    finally:
        del os.environ["TRITON_INTERPRET"]
    assert "interpreter" in report["runtime_paths"]["triton"] and "not available" not in \
        report["runtime_paths"]["triton"], report["runtime_paths"]
    assert report["runtime_paths"]["cpu"].startswith(("C compiler found", "not available: no C compiler"))


def test_version_is_single_sourced():
    import importlib.metadata
    import tomllib
    with open(os.path.join(os.path.dirname(os.path.dirname(seqfuse.__file__)), "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"], "pyproject.toml must not repeat the version"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "seqfuse.__version__"}
    assert project["project"]["license"] == "MIT" and project["project"]["authors"] == [{"name": "seqfuse developers"}]
    assert importlib.metadata.version("seqfuse") == seqfuse.__version__
    meta = importlib.metadata.metadata("seqfuse")
    assert meta["License-Expression"] == "MIT" or meta["License"] == "MIT", dict(meta)

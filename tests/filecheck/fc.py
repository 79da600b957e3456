"""FileCheck from Python: ``run_filecheck(text, checks)`` checks ``text`` against ``checks``.

``checks`` holds LLVM FileCheck directives (``CHECK:``, ``CHECK-NOT:``,
``CHECK-LABEL:``, ``CHECK-SAME:``, ``[[VAR:regex]]`` captures ...), one per line;
leading indentation is ignored.  The ``filecheck`` package (a Python port of
LLVM FileCheck) runs as ``python -m filecheck <checkfile>`` with the input on
stdin; when it rejects the input the test fails with the tool's message and the
input it read.  ``graph_after(fn, *args, tmp_path=..., stage=...)`` compiles ``fn`` once and returns
the graph dumped after one pipeline stage, with the report.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest

import seqfuse


def run_filecheck(text: str, checks: str, prefix: str = "CHECK") -> None:
    """Fail the calling test unless ``text`` satisfies the FileCheck directives in ``checks``."""
    checks = textwrap.dedent(checks).strip() + "\n"
    if f"{prefix}" not in checks:
        raise ValueError(f"run_filecheck: no {prefix} directive in {checks!r}")
    fd, path = tempfile.mkstemp(suffix=".checks", text=True)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(checks)
        proc = subprocess.run([sys.executable, "-m", "filecheck", "--check-prefix", prefix, path],
                              input=text, capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        pytest.fail(f"FileCheck failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                    f"--- checks ---\n{checks}--- input ---\n{text}", pytrace=False)


def graph_after(fn, *args, tmp_path, stage: str, dynamic=None):
    """(the graph text dumped right after pipeline stage ``stage``, the report) of compiling ``fn`` with
    ``*args`` (downstream eager, dumps into ``tmp_path``)."""
    report = seqfuse.explain(fn, *args, options={"downstream": "eager", "dump_dir": str(tmp_path)}, dynamic=dynamic)
    path = next(p for p in report.dumps if p.endswith(f"_{stage}.txt"))
    return pathlib.Path(path).read_text(), report

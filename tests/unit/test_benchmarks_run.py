"""benchmarks/run.py: cold compiles in fresh processes, the table's extra columns, --plot."""
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("seqfuse_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROWS = [
    {"workload": "a", "shape": "s", "eager_ms": 10.0, "inductor_ms": 4.0, "seqfuse_ms": 2.0,
     "eager_compile_s": None, "inductor_compile_s": 20.0, "seqfuse_compile_s": 5.0, "paths": "attention:aten",
     "dynamo_s": 1.0, "pipeline_s": 0.1, "err": 1e-7},
    {"workload": "b", "shape": "s", "eager_ms": 3.0, "inductor_ms": None, "seqfuse_ms": 6.0,
     "eager_compile_s": None, "inductor_compile_s": None, "seqfuse_compile_s": 2.0, "paths": "-"},
]


def test_each_backend_compiles_in_a_fresh_process_with_empty_caches(run, monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, env, stdout, text, timeout):
        calls.append((cmd, env))
        backend = cmd[cmd.index("--child") + 2]
        torch.save([torch.ones(2) * (1.0 if backend != "seqfuse" else 1.0 + 1e-6)], cmd[cmd.index("--child-out") + 1])
        result = {"compile_s": None if backend == "eager" else 3.0, "ms": 1.5, "shape": "tiny",
                  "dynamo_s": 0.5, "pipeline_s": 0.25, "paths": "attention:aten"}
        return subprocess.CompletedProcess(cmd, 0, "noise\nRESULT " + json.dumps(result) + "\n")

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.argparse.Namespace(backend=list(run.BACKENDS), quick=True, train=False, repeats=3, warmup=1,
                                  device="cpu", seqfuse_options={"verify": True}, warm_caches=False, timeout=60)
    row = run.run_workload("naive_causal_attention", args, str(tmp_path))
    assert [c[0][c[0].index("--child") + 1:c[0].index("--child") + 3] for c in calls] == \
        [["naive_causal_attention", b] for b in run.BACKENDS]
    cache_dirs = [(env["TORCHINDUCTOR_CACHE_DIR"], env["SEQFUSE_CACHE_DIR"]) for _, env in calls]
    assert len({d for pair in cache_dirs for d in pair}) == 6  # a new pair of empty caches per process
    assert all(Path(d).is_dir() and not any(Path(d).iterdir()) for pair in cache_dirs for d in pair)
    cmd = calls[2][0]
    assert "--quick" in cmd and json.loads(cmd[cmd.index("--seqfuse-options") + 1]) == {"verify": True}
    assert row["seqfuse_compile_s"] == 3.0 and row["dynamo_s"] == 0.5 and row["pipeline_s"] == 0.25
    assert row["paths"] == "attention:aten" and row["err"] == pytest.approx(1e-6, rel=0.1)
    # --warm-caches keeps the user's caches
    calls.clear()
    args.warm_caches = True
    run.run_workload("naive_causal_attention", args, str(tmp_path))
    assert all("SEQFUSE_CACHE_DIR" not in env or env["SEQFUSE_CACHE_DIR"] == __import__("os").environ.get(
        "SEQFUSE_CACHE_DIR") for _, env in calls)


def test_a_backend_that_times_out_leaves_the_others_in_the_row(run, monkeypatch, tmp_path, capsys):
    def fake_run(cmd, env, stdout, text, timeout):
        backend = cmd[cmd.index("--child") + 2]
        if backend == "inductor":
            raise subprocess.TimeoutExpired(cmd, timeout)
        torch.save([torch.ones(2)], cmd[cmd.index("--child-out") + 1])
        result = {"compile_s": None if backend == "eager" else 3.0, "ms": 1.5, "shape": "tiny",
                  "dynamo_s": 0.5, "pipeline_s": 0.25, "paths": "delta:cpu"}
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(result) + "\n")

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.argparse.Namespace(backend=list(run.BACKENDS), quick=True, train=True, repeats=3, warmup=1,
                                  device="cpu", seqfuse_options=None, warm_caches=False, timeout=7)
    row = run.run_workload("fla_delta_parallel", args, str(tmp_path))
    assert row["inductor_ms"] is None and row["eager_ms"] == row["seqfuse_ms"] == 1.5 and row["failed"]
    assert "inductor timed out after 7 s" in capsys.readouterr().err


def test_table_has_the_compile_split(run, capsys):
    run.print_table(ROWS)
    header = capsys.readouterr().out.splitlines()[0]
    assert "sf/ind comp" in header and "dynamo s" in header and "sf pipe s" in header


def test_plot_without_matplotlib_says_so_and_runs_nothing(run, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(run, "run_workload", lambda *a: pytest.fail("ran a workload"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--quick", "--plot", str(tmp_path / "r.png"), "--workload", "naive_causal_attention"])
    assert exc.value.code == 2
    assert "--plot needs matplotlib, which is not installed (pip install matplotlib); nothing was run" in \
        capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_plot_draws_every_ratio_per_workload(run, monkeypatch, tmp_path):
    """With a recording stand-in for matplotlib: three series (run eager/sf, run inductor/sf,
    compile inductor/sf) of bars over the workloads, a missing ratio left out, log scale, saved."""
    drawn = {"bars": [], "saved": None}

    class Axes:
        def bar(self, xs, ys, width, label):
            drawn["bars"].append((label, list(xs), list(ys)))

        def __getattr__(self, name):
            return lambda *a, **k: drawn.setdefault(name, (a, k))

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, path):
            drawn["saved"] = path

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda figsize: (Figure(), Axes())
    pyplot.close = lambda fig: None
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: drawn.setdefault("use", backend)
    mpl.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    run.plot_ratios(ROWS, str(tmp_path / "r.png"))
    assert drawn["saved"] == str(tmp_path / "r.png") and drawn["use"] == "Agg"
    labels = [b[0] for b in drawn["bars"]]
    assert labels == ["run: eager / seqfuse", "run: inductor / seqfuse", "compile: inductor / seqfuse"]
    values = {b[0]: b[2] for b in drawn["bars"]}
    assert values["run: eager / seqfuse"] == [5.0, 0.5]
    assert values["run: inductor / seqfuse"] == [2.0]  # workload b has no inductor time
    assert values["compile: inductor / seqfuse"] == [4.0]
    assert drawn["set_yscale"][0] == ("log",) and drawn["axhline"][0] == (1.0,)
    assert drawn["set_xticklabels"][0][0] == ["a", "b"]


def test_trials_alternate_the_compiled_backends_and_keep_each_ones_fastest(run, monkeypatch, tmp_path):
    compile_s = {"inductor": iter([30.0, 20.0, 25.0]), "seqfuse": iter([10.0, 40.0, 12.0])}
    order = []

    def fake_run(cmd, env, stdout, text, timeout):
        backend = cmd[cmd.index("--child") + 2]
        order.append(backend)
        torch.save([torch.ones(2)], cmd[cmd.index("--child-out") + 1])
        c = None if backend == "eager" else next(compile_s[backend])
        result = {"compile_s": c, "ms": 100.0 if c is None else c / 10, "shape": "tiny", "dynamo_s": c,
                  "pipeline_s": 0.25, "paths": "scan:cpu"}
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(result) + "\n")

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.argparse.Namespace(backend=list(run.BACKENDS), quick=True, train=False, repeats=3, warmup=1,
                                  device="cpu", seqfuse_options=None, warm_caches=False, timeout=60, trials=3)
    row = run.run_workload("mamba_loop", args, str(tmp_path))
    assert order == ["eager", "inductor", "seqfuse", "seqfuse", "inductor", "inductor", "seqfuse"]
    assert row["compile_trials"] == {"inductor": [30.0, 20.0, 25.0], "seqfuse": [10.0, 40.0, 12.0]}
    assert row["inductor_compile_s"] == 20.0 and row["inductor_ms"] == 2.0  # the fastest trial's row
    assert row["seqfuse_compile_s"] == 10.0 and row["dynamo_s"] == 10.0
    assert run._schedule(["eager", "inductor"], 2) == ["eager", "inductor", "inductor"]

"""benchmarks/checkpoint_memory.py runs and prints its rows (tiny shapes; eager and seqfuse only)."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checkpoint_memory_benchmark_prints_every_row(capsys):
    spec = importlib.util.spec_from_file_location("checkpoint_memory", ROOT / "benchmarks" / "checkpoint_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--layers", "1", "--batch", "1", "--length", "16", "--dim", "16", "--repeats", "1",
                       "--backends", "eager,seqfuse"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith(("eager ", "seqfuse "))]
    assert [(r[0], r[1]) for r in rows] == [("eager", "False"), ("eager", "True"), ("seqfuse", "False"),
                                            ("seqfuse", "True")]
    saved = {(r[0], r[1]): float(r[2]) for r in rows}
    # checkpointing saves less, through seqfuse as in eager
    assert saved["seqfuse", "True"] < saved["seqfuse", "False"]
    assert saved["eager", "True"] < saved["eager", "False"]

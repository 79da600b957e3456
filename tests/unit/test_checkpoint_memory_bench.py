"""benchmarks/checkpoint_memory.py runs and prints its rows (tiny shapes; eager and seqfuse only)."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checkpoint_memory_benchmark_prints_every_row(capsys):
    spec = importlib.util.spec_from_file_location("checkpoint_memory", ROOT / "benchmarks" / "checkpoint_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--layers", "1", "--batch", "1", "--length", "32", "--dim", "32", "--repeats", "1",
                       "--backends", "eager,seqfuse"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith(("eager ", "seqfuse "))]
    assert [(r[0], r[1]) for r in rows] == [(b, m) for b in ("eager", "seqfuse") for m in bench.MODES]
    saved = {(r[0], r[1]): r[2] for r in rows}
    assert saved["eager", "selective"] == "n/a"   # eager's policy saves outside the hooks' sight
    saved = {k: float(v) for k, v in saved.items() if v != "n/a"}
    # checkpointing saves less, through seqfuse as in eager; the policy saves more than plain, less than none
    assert saved["eager", "plain"] < saved["eager", "no"], saved
    assert saved["seqfuse", "plain"] < saved["seqfuse", "selective"] < saved["seqfuse", "no"], saved

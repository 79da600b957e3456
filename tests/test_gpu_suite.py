"""benchmarks/gpu_suite.py --smoke: every stage of the one-command GPU measurement runs on CPU
(Triton kernels through the interpreter, tiny shapes) and reports its rows, so the script is
known to work before a GPU run is spent on it."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_reports_every_stage(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    assert set(by_stage) == {"kernels", "attention", "recurrence", "long_conv", "models"}, sorted(by_stage)
    problems = [r for r in rows if "error" in r or "cut" in r]
    assert not problems, problems
    (kernels,) = by_stage["kernels"]
    assert kernels["passed"] > 0 and kernels["failed"] == 0, kernels
    # attention: D, causal and not, forward and backward; seqfuse and flash measured, peers tried
    att = by_stage["attention"]
    assert {(r["causal"], r["pass_"]) for r in att} == {(c, p) for c in (True, False) for p in ("fwd", "fwd+bwd")}
    for r in att:
        assert isinstance(r["seqfuse_tflops"], float) and isinstance(r["flash_tflops"], float), r
        assert "inductor_tflops" in r and "flex_tflops" in r, r
    ops = {r["op"] for r in by_stage["recurrence"]}
    assert ops == {"ssd/none", "ssd/scalar", "ssd/vector", "delta/scalar", "delta/rwkv7", "scan/selective"}, ops
    for r in by_stage["recurrence"] + by_stage["long_conv"]:
        assert isinstance(r["seqfuse_ms"], float) and isinstance(r["eager_ms"], float), r
    models = {(r["model"], r["pass_"]) for r in by_stage["models"]}
    assert models == {(m, p) for m in ("llama", "mamba", "mamba2", "hyena") for p in ("fwd", "fwd+bwd")} | \
        {("llama_ckpt", "fwd+bwd")}, models
    for r in by_stage["models"]:
        for backend in ("eager", "inductor", "seqfuse"):
            assert isinstance(r[f"{backend}_ms"], float), r
            assert isinstance(r[f"{backend}_first_call_s"], float), r
        # the row names the paths seqfuse's ops ran: the attention inside checkpointed layers is found too
        want = {"llama": "attention:", "llama_ckpt": "attention_backward:", "mamba": "scan:", "mamba2": "ssd:",
                "hyena": "long_conv:"}[r["model"]]
        assert want in r["seqfuse_paths"], r
    # the markdown table is printed at the end, a cut run's rows are already on stdout
    assert "### models" in proc.stdout and "| model | pass |" in proc.stdout

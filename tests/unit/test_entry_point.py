"""backend="seqfuse" resolves through the torch_dynamo_backends entry point, without `import seqfuse`."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import math
    import sys

    import torch

    def causal(q, k, v):
        L = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    assert "seqfuse" not in sys.modules, "the script must not import seqfuse itself"
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    out = torch.compile(causal, backend="seqfuse", options={"downstream": "eager"})(q, k, v)
    ref = causal(q, k, v)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    assert "seqfuse" in sys.modules, "the backend was not loaded through the entry point"
    calls = sys.modules["seqfuse"].counters()
    assert calls["attention"]["aten"] == 1, calls   # the attention really ran as a seqfuse op
    print("OK", err)
""")


def test_backend_works_without_importing_seqfuse(tmp_path):
    env = {**os.environ, "SEQFUSE_STRICT": "1", "OMP_NUM_THREADS": "1"}
    # run from an empty directory so `seqfuse` can only come from the installed distribution
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")

"""FileCheck on the graph right after the toeplitz pass (dump stage "toeplitz")."""
import pathlib

import torch

import seqfuse
from fc import run_filecheck


def gather_mask(u, k):
    L = u.shape[-1]
    i = torch.arange(L)
    idx = i[:, None] - i[None, :]
    T = k[:, idx.clamp(min=0)] * (idx >= 0)     # T[c, i, j] = k[c, i - j] for j <= i
    return torch.einsum("cij,bcj->bci", T, u)


def test_graph_after_the_pass(tmp_path):
    u, k = torch.randn(2, 3, 12), torch.randn(3, 12)
    report = seqfuse.explain(gather_mask, u, k, options={"downstream": "aot_eager", "dump_dir": str(tmp_path)})
    text = pathlib.Path(next(p for p in report.dumps if p.endswith("_toeplitz.txt"))).read_text()
    run_filecheck(text, """
        CHECK-LABEL: graph(
        CHECK: %long_conv = seqfuse.long_conv(%l_u_, %{{[a-z_0-9]+}}) {causal=true, fft_size=0, scale=1.0, activation=none
        CHECK-NOT: aten.einsum
        CHECK: return (%long_conv)
    """)



"""Qwen3-Next (Gated DeltaNet linear attention + gated softmax attention) compiled with seqfuse.

On CPU transformers runs each linear-attention layer on its torch path: the chunked WY / UT form
of the gated delta rule (``torch_chunk_gated_delta_rule``: two triangular solves and a Python loop
over chunks of 64 steps that Dynamo unrolls).  seqfuse proves that program is the delta rule over
the sequence and replaces it by one ``seqfuse.delta`` op per layer (on CPU: the step loop in a
generated C kernel); the logits and every parameter gradient equal eager.  The gradients of A_log and
dt_bias reach the loss only through the log-decays, a sum of cancelling terms: any reordering of the
fp32 work moves them by ~1e-5, so they are judged against an fp64 oracle (seqfuse's error at most 4x
eager's own, the rule of tests/fuzz) where they differ from eager by more than 1e-5.

    python examples/qwen3_next.py                 # a tiny random-weight model, T = 256
    python examples/qwen3_next.py --seq-len 512

transformers routes the gated delta rule and the causal conv1d to flash-linear-attention's Triton
kernels whenever fla is importable (they need a GPU); ``torch_path()`` points the model at the
reference PyTorch functions transformers falls back to without fla.
"""
import argparse

import torch

import seqfuse

#: the functions of modeling_qwen3_next that transformers may route to fla's kernels
KERNELIZED = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
              "causal_conv1d_update")


MODELING = "transformers.models.qwen3_next.modeling_qwen3_next"


def _modeling(module):
    import importlib
    return importlib.import_module(module or MODELING)


def torch_path(module=None, names=KERNELIZED):
    """Point a transformers modeling module (by name; default modeling_qwen3_next) at its reference PyTorch
    functions ``names``; returns {name: previous} to restore."""
    m = _modeling(module)
    previous = {}
    for name in names:
        fn = previous[name] = getattr(m, name)
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        setattr(m, name, fn)
    return previous


def restore(previous, module=None):
    """Undo ``torch_path(module)``."""
    m = _modeling(module)
    for name, fn in previous.items():
        setattr(m, name, fn)


class Logits(torch.nn.Module):
    """input_ids (B, L) -> logits (B, L, vocab), without a cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids, use_cache=False).logits


def build(seq_len=256, batch=1, linear_layers=2, hidden=32, seed=0):
    """A tiny random-weight Qwen3NextForCausalLM (``linear_layers`` Gated DeltaNet layers, then one gated
    attention layer; dense MLPs) and token ids (batch, seq_len)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=linear_layers + 1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, layer_types=["linear_attention"] * linear_layers + ["full_attention"],
        mlp_only_layers=list(range(linear_layers + 1)), attention_dropout=0.0)
    model = Logits(Qwen3NextForCausalLM(cfg))
    return model, torch.randint(0, cfg.vocab_size, (batch, seq_len))


class _Float64Torch:
    """``torch`` as modeling_qwen3_next sees it while the fp64 oracle runs: ``torch.float32`` is float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def fp64_oracle(model, ids, grads_of, module=None):
    """The logits and parameter gradients of ``model`` computed in fp64 throughout: a double copy, with
    the modeling module's casts to fp32 (``.to(torch.float32)``, ``.float()``) kept in fp64."""
    import copy

    m = _modeling(module)
    model64 = copy.deepcopy(model).double()
    saved_torch, saved_float = m.torch, torch.Tensor.float
    m.torch, torch.Tensor.float = _Float64Torch(), lambda self, *a, **k: self
    try:
        return grads_of(model64)
    finally:
        m.torch, torch.Tensor.float = saved_torch, saved_float


def compare(model, ids, options, module=None, dynamic=None):
    """Compile ``model`` with seqfuse and compare: (report, [(name, error vs eager, error vs fp64,
    eager's error vs fp64)]) for the logits and every parameter gradient (``module``: the model's
    transformers modeling module, for the fp64 oracle; default modeling_qwen3_next; ``dynamic``:
    torch.compile's, True for symbolic sequence lengths)."""
    from seqfuse.compiler.report import Report, collecting

    def grads_of(fn, params):
        for p in params:
            p.grad = None
        out = fn(ids)
        torch.manual_seed(7)
        (out * torch.randn(out.shape, dtype=torch.float64).to(out.dtype)).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in params]

    def err(a, e):
        return ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-300)).item()

    torch._dynamo.reset()
    params = list(model.parameters())
    expected = grads_of(model, params)
    truth = fp64_oracle(model, ids, lambda m64: grads_of(m64, list(m64.parameters())), module)
    report = Report()
    with collecting(report):
        actual = grads_of(torch.compile(model, backend="seqfuse", options=options, dynamic=dynamic), params)
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    return report, [(n, err(a, e), err(a, t), err(e, t)) for n, a, e, t in zip(names, actual, expected, truth)]


def within(error, error64, eager64, tol=1e-5) -> bool:
    """``tol`` of eager, or (for a value eager itself computes no better in fp32) at most 4x eager's own
    error against the fp64 oracle plus a floor of a few fp32 roundoffs (the rule of tests/fuzz)."""
    return error < tol or error64 <= 4 * eager64 + 4 * 2.0 ** -24


def main(seq_len=256):
    previous = torch_path()
    try:
        model, ids = build(seq_len)
        # the rest of the graph on "eager": aot_eager's backward of this model's torch path fails in
        # torch itself (a view of a non-contiguous gradient), with or without seqfuse
        report, rows = compare(model, ids, {"downstream": "eager"})
        print(report)
        print(f"logits and {len(rows) - 1} parameter gradients, rel. error vs eager (vs fp64; eager's vs fp64):")
        for n, e, e64, eager64 in sorted(rows, key=lambda r: -r[1])[:4]:
            print(f"  {n}: {e:.2e} ({e64:.2e}; {eager64:.2e})")
        layers = sum(1 for t in model.lm.config.layer_types if t == "linear_attention")
        if report.count("delta") != layers or not all(within(*r[1:]) for r in rows):
            raise SystemExit("FAIL")
        print("OK")
    finally:
        restore(previous)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=256)
    main(parser.parse_args().seq_len)

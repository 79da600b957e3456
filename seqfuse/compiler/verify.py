"""``verify=True``: on the first call, compare the compiled graph with the original run eagerly."""
from __future__ import annotations

import torch

# relative RMS error allowed per output dtype
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class VerificationError(AssertionError):
    """The compiled graph disagreed with the original program."""


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖₂ / ‖ref‖₂ in fp64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def _flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flatten(e)]
    return []


def compare(outs, refs) -> None:
    """Raise VerificationError naming the first output whose error exceeds its dtype's bound."""
    outs, refs = _flatten(outs), _flatten(refs)
    if len(outs) != len(refs):
        raise VerificationError(f"seqfuse verify: {len(outs)} outputs vs {len(refs)} in the original program")
    for idx, (o, r) in enumerate(zip(outs, refs)):
        if o.shape != r.shape:
            raise VerificationError(f"seqfuse verify: output {idx} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if not r.is_floating_point():
            if not torch.equal(o, r):
                raise VerificationError(f"seqfuse verify: output {idx} differs")
            continue
        nan_mismatch = not torch.equal(torch.isnan(o), torch.isnan(r))
        err = rel_rms(torch.nan_to_num(o), torch.nan_to_num(r))
        bound = TOLERANCE.get(r.dtype, 1e-4)
        if nan_mismatch or err > bound:
            raise VerificationError(f"seqfuse verify: output {idx} relative RMS error {err:.3g} > {bound:g}"
                                    + (" (NaN positions differ)" if nan_mismatch else ""))


def verifying(compiled, original):
    """Wrap ``compiled`` so its first call is checked against ``original`` run eagerly
    (same inputs, same RNG state)."""
    state = {"checked": False}

    def run(*args):  # Dynamo calls a backend's result with positional inputs
        if state["checked"]:
            return compiled(*args)
        state["checked"] = True
        inputs = list(args)
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        out = compiled(*inputs)
        after = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda_rng is not None else None)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            ref = original(*inputs)
        torch.set_rng_state(after[0])
        if after[1] is not None:
            torch.cuda.set_rng_state_all(after[1])
        compare(out, ref)
        return out

    return run

"""DeltaNet's blocked ("parallel") form: fla's own ``delta_rule_parallel`` and a copy of it written out
here (out-of-place accumulation, other block and chunk sizes) become one seqfuse.delta, equal to eager
(outputs and every gradient); look-alikes that are not the delta rule (a key, a mask, an order or a
chunk changed) stay as written, with a near miss naming the piece."""
import pytest
import torch
import torch.nn.functional as F

from delta_spellings import blocked
from helpers import check_against_eager

fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")


def operands(B=2, H=2, T=48, K=8, V=6):
    q = torch.randn(B, H, T, K)
    k = F.normalize(torch.randn(B, H, T, K), dim=-1)
    v = torch.randn(B, H, T, V)
    beta = torch.rand(B, H, T)
    return [x.requires_grad_() for x in (q, k, v, beta)]


def only_delta(report):
    assert report.count("delta") == 1, str(report)
    assert report.count("ssd") == report.count("scan") == 0, str(report)
    assert not [m for m in report.near_misses if m.kind == "delta"], str(report)
    (ir,) = [r.ir for r in report.rewrites if r.kind == "delta"]
    assert "gate=none" in ir and "h0=" not in ir, ir


def test_fla_delta_rule_parallel_is_one_op():
    # fla's own function: blocks of 32 rows over chunks of 8 (4 blocks, the first chunk of each block read
    # with the rows of the block's later chunks masked), accumulations in place; its second result, the
    # attention matrix, is not returned here
    def fn(q, k, v, beta):
        return fla_delta.delta_rule_parallel(q, k, v, beta, BM=32, BN=8)[0]
    only_delta(check_against_eager(fn, *operands(T=128)))


def test_fla_delta_rule_parallel_equals_the_recurrence():
    # the lifted op computes the delta rule itself: its output equals fla's recurrent reference
    import seqfuse
    q, k, v, beta = (x.detach() for x in operands(T=48))
    report = seqfuse.explain(lambda *a: fla_delta.delta_rule_parallel(*a, BM=24, BN=8)[0], q, k, v, beta,
                             options={"downstream": "eager"})
    assert report.count("delta") == 1, str(report)
    ref = fla_delta.delta_rule_recurrence(q, k, v, beta)[0]
    assert (report.output - ref).abs().max() < 1e-5


@pytest.mark.parametrize("T,BM,BN", [(32, 16, 8), (12, 12, 4)])
def test_fla_delta_rule_parallel_returning_its_attention_matrix(T, BM, BN):
    # the attention matrix stays the program's (it reads the blocks' scores); the output is the op's.  With
    # one block, the walk left for the matrix is a loop whose last step's dropped update (a where with a
    # scalar) the re-roller rebuilds: its fake value is computed inside the fake mode (the pipeline raised)
    def fn(q, k, v, beta):
        return fla_delta.delta_rule_parallel(q, k, v, beta, BM=BM, BN=BN)
    report = check_against_eager(fn, *operands(T=T))
    assert report.count("delta") == 1, str(report)


@pytest.mark.parametrize("T,BM,BN", [(48, 16, 8), (48, 48, 8), (48, 8, 8), (60, 20, 4), (32, 32, 16)])
def test_blocked_form_at_other_sizes(T, BM, BN):
    # one block over every row, one chunk per block (no walk inside a block), two chunks in all
    def fn(q, k, v, beta):
        return blocked(q, k, v, beta, BM, BN)
    only_delta(check_against_eager(fn, *operands(T=T)))


@pytest.mark.parametrize("bug,reason", [
    ("plain_keys", "blocked (parallel) form not lifted: the carried keys are not"),
    ("k_transform", "blocked (parallel) form not lifted: the carried keys are not"),
    ("mask", "splits chunk"),
    ("skip_first_chunk", "is not the delta rule's"),
    ("order", "is not the delta rule's"),
    ("no_carry", "is not the delta rule's"),
    ("values_for_keys", "is not the delta rule's"),
])
def test_look_alikes_are_near_misses(bug, reason):
    def fn(q, k, v, beta):
        return blocked(q, k, v, beta, 24, 8, bug=bug)
    report = check_against_eager(fn, *operands(T=48, V=8))
    assert report.count("delta") == 0, str(report)
    assert any(m.kind == "delta" and reason in m.reason for m in report.near_misses), str(report)


def test_fla_delta_rule_parallel_under_dynamic_shapes():
    # Dynamo writes each block's indexed write as full slices of the leading axes, then the rows; the
    # forward substitution, read by no op here, is a triangular solve over symbolic batch sizes (whose
    # meta function raised before)
    def fn(q, k, v, beta):
        return fla_delta.delta_rule_parallel(q, k, v, beta, BM=16, BN=8)[0]
    only_delta(check_against_eager(fn, *operands(T=32), dynamic=True))

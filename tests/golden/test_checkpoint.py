"""Activation checkpointing: mixers inside ``torch.utils.checkpoint`` regions are found, and the regions
are still recomputed in the backward (seqfuse/compiler/checkpoint.py).

Before, Dynamo's ``tag_activation_checkpoint`` call made the pre-dispatch re-trace fail, and seqfuse
compiled the whole graph unchanged: a model trained with ``gradient_checkpointing_enable()`` got no
rewrite at all.  Each test checks the rewrite (report), the numbers (output and every gradient against
eager) and, where it is the point, the memory the compiled forward saves for the backward.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import seqfuse
from seqfuse.compiler.report import collecting
from helpers import check_against_eager, rel_err, selective_checkpointing

D, H = 32, 4


class Block(torch.nn.Module):
    """Pre-norm causal attention (written out: matmul, masked_fill, softmax, matmul) and an MLP."""

    def __init__(self, p_attn: float = 0.0, p_mlp: float = 0.0):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.o = torch.nn.Linear(D, D)
        self.up = torch.nn.Linear(D, 4 * D)
        self.down = torch.nn.Linear(4 * D, D)
        self.p_attn, self.p_mlp = p_attn, p_mlp

    def attend(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        p = F.dropout(s.softmax(-1), self.p_attn, self.training)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, D))

    def forward(self, x):
        x = x + self.attend(x)
        return x + self.down(F.dropout(torch.relu(self.up(x)), self.p_mlp, self.training))


class Stack(torch.nn.Module):
    """Blocks, each run through ``checkpoint`` when ``ckpt``; ``context_fn`` makes it selective."""

    def __init__(self, ckpt: bool, n: int = 2, context_fn=None, **p):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(**p) for _ in range(n)])
        self.ckpt, self.context_fn = ckpt, context_fn

    def forward(self, x):
        for b in self.blocks:
            if not self.ckpt:
                x = b(x)
            elif self.context_fn is None:
                x = checkpoint(b, x, use_reentrant=False)
            else:
                x = checkpoint(b, x, use_reentrant=False, context_fn=self.context_fn)
        return x


class Checkpointed(torch.nn.Module):
    """``checkpoint(fn, x)``, as a module owning ``block`` (whose parameters ``fn`` reads)."""

    def __init__(self, fn, block: torch.nn.Module):
        super().__init__()
        self.fn, self.block = fn, block

    def forward(self, x):
        return checkpoint(self.fn, x, use_reentrant=False)


class Calling(torch.nn.Module):
    """``fn(x)``, as a module owning ``owner`` (whose parameters and buffers ``fn`` reads)."""

    def __init__(self, fn, owner: torch.nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x):
        return self.fn(x)


def _saved_bytes(fn, params, *xs) -> int:
    """Bytes the call ``fn(*xs)`` saves for its backward (after a first, compiling call), but for the
    parameters ``params`` (a compiled graph saves the weights it reads; they are held anyway)."""
    fn(*xs).sum().backward()
    total = [0]
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*xs)
    y.sum().backward()
    return total[0]


def _twin(model_cls, ckpt: bool, like: torch.nn.Module, **kw):
    m = model_cls(ckpt, **kw)
    m.load_state_dict(like.state_dict())
    return m


def _recompute_all(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective(policy):
    return functools.partial(create_selective_checkpoint_contexts, policy)


def test_attention_in_checkpointed_blocks_is_fused_and_exact():
    torch.manual_seed(0)
    model = Stack(ckpt=True)
    x = torch.randn(2, 24, D, requires_grad=True)
    report = check_against_eager(model, x)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    assert not report.near_misses, report
    assert "activation checkpointing: 2 region(s) read through" in str(report), report


@pytest.mark.parametrize("downstream", ["aot_eager", "inductor"])
def test_checkpointed_regions_are_still_recomputed(downstream):
    """The compiled forward of the checkpointed model saves what the region inputs take, not the
    activations inside: far less than the same model without checkpointing.  With inductor the
    model without checkpointing is compiled first: inductor keys a graph by its code, which the
    recompute tags do not change, so without the tags in the key the second compile reused the
    first one's partition (and saved everything)."""
    torch.manual_seed(0)
    plain = Stack(ckpt=False)
    x = torch.randn(2, 64, D)
    saved = {}
    for ckpt in (False, True):
        torch._dynamo.reset()
        model = _twin(Stack, ckpt, plain)
        compiled = torch.compile(model, backend="seqfuse", options={"downstream": downstream})
        report = seqfuse.Report()
        with collecting(report):
            saved[ckpt] = _saved_bytes(compiled, list(model.parameters()), x)
        assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    # eager's own checkpointing saves the block inputs alone
    eager = _twin(Stack, True, plain)
    eager_ckpt = _saved_bytes(eager, list(eager.parameters()), x)
    assert saved[True] < saved[False] / 4, saved
    assert saved[True] <= 2 * eager_ckpt, (saved, eager_ckpt)


@pytest.mark.parametrize("selective", [False, True])
def test_gradients_equal_with_and_without_checkpointing_under_dropout(selective):
    """Dropout inside the region (aten's in the MLP, the fused attention's own): the recomputed backward
    must use the forward's draws.  The same seed gives the same output and gradients with and without
    checkpointing (a recompute that drew again would give other gradients).  ``selective``: a policy
    that recomputes everything would recompute the fused attention's dropout with new draws (its random
    numbers are its own, which the partitioner does not replay): seqfuse wraps the policy so that such
    a call is saved (0.98 apart without the wrap)."""
    torch.manual_seed(0)
    plain = Stack(ckpt=False, p_attn=0.3, p_mlp=0.3)
    x = torch.randn(2, 16, D)
    context_fn = _selective(_recompute_all) if selective else None
    results = []
    for ckpt in (False, True):
        torch._dynamo.reset()
        model = _twin(Stack, ckpt, plain, p_attn=0.3, p_mlp=0.3, context_fn=context_fn)
        compiled = torch.compile(model, backend="seqfuse", options={"downstream": "aot_eager"})
        report = seqfuse.Report()
        with collecting(report):
            compiled(x)  # compile first: the draws below start from one seed in both runs
        torch.manual_seed(7)
        y = compiled(x)
        y.square().sum().backward()
        assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
        results.append([y.detach()] + [p.grad.clone() for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) < 1e-6, f"result {i}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("selective", [False, True])
def test_transformers_gradient_checkpointing(selective):
    """GPT-2 (transformers) with ``gradient_checkpointing_enable()``, plain or with a policy (torchtitan's
    kind, passed as ``gradient_checkpointing_kwargs``): both layers' attention is found and every
    parameter's gradient equals eager's."""
    transformers = pytest.importorskip("transformers")
    from helpers import Logits
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).train()
    kwargs = {"use_reentrant": False, "context_fn": selective_checkpointing} if selective else None
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    tokens = torch.randint(0, 64, (2, 16))
    report = check_against_eager(Logits(lm), tokens)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    assert not report.near_misses, report
    assert report.graphs[0].selective_regions == (2 if selective else 0), report


@pytest.mark.parametrize("selective", [False, True])
def test_apply_activation_checkpointing_wrappers(selective):
    """torch.distributed's ``apply_activation_checkpointing`` (as FSDP users wrap their blocks; with a
    policy and ``preserve_rng_state=False``, as torchtitan wraps them): the same regions, found and
    exact."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    torch.manual_seed(0)
    model = Stack(ckpt=False)
    wrapper = functools.partial(checkpoint_wrapper, context_fn=selective_checkpointing, preserve_rng_state=False) \
        if selective else checkpoint_wrapper
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(model, x)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    assert not report.near_misses, report
    assert report.graphs[0].selective_regions == (2 if selective else 0), report


def test_selective_checkpointing_bodies_are_rewritten():
    """A region with a policy (``context_fn``) stays a call, its body rewritten in place: both
    attentions fused, the report says so, and outputs and every gradient are eager's."""
    torch.manual_seed(0)
    model = Stack(ckpt=True, context_fn=selective_checkpointing)
    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(model, x)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    assert not report.near_misses, report
    assert "selective activation checkpointing: 2 region(s) kept as calls, their bodies read in place" in str(report), report
    assert "activation checkpointing: 2 region(s) read through" not in str(report)   # none inlined


@pytest.mark.parametrize("downstream", ["aot_eager", "inductor"])
def test_selective_policy_sees_the_fused_op(downstream):
    """The policy is asked about ``seqfuse.attention`` as about any op: recomputing everything saves
    what eager's checkpointing saves (the block inputs), and saving the fused attention saves its
    outputs on top, as does a policy that saves SDPA's kernel instead (the fused attention stands for
    it); without checkpointing far more is saved."""
    torch.manual_seed(0)
    plain = Stack(ckpt=False)
    x = torch.randn(2, 64, D)
    seen = set()

    def save_fused(ctx, op, *args, **kwargs):
        seen.add(str(op))
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.seqfuse.attention.default else \
            CheckpointPolicy.PREFER_RECOMPUTE

    def save_sdpa(ctx, op, *args, **kwargs):   # a policy written for SDPA, as torchtitan's is
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default \
            else CheckpointPolicy.PREFER_RECOMPUTE

    saved = {}
    for name, context_fn in (("none", None), ("recompute", _selective(_recompute_all)),
                             ("save_fused", _selective(save_fused)), ("save_sdpa", _selective(save_sdpa))):
        torch._dynamo.reset()
        model = _twin(Stack, context_fn is not None, plain, context_fn=context_fn)
        compiled = torch.compile(model, backend="seqfuse", options={"downstream": downstream})
        report = seqfuse.Report()
        with collecting(report):
            saved[name] = _saved_bytes(compiled, list(model.parameters()), x)
        assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    eager = _twin(Stack, True, plain, context_fn=_selective(_recompute_all))
    assert "seqfuse.attention.default" in seen, sorted(seen)
    assert saved["recompute"] == _saved_bytes(eager, list(eager.parameters()), x), saved
    # two attentions, each saving at least its (2, 4, 64, 8) fp32 output
    assert saved["save_fused"] >= saved["recompute"] + 2 * 2 * 64 * D * 4, saved
    assert saved["save_sdpa"] == saved["save_fused"], saved
    assert saved["none"] > 4 * saved["save_fused"], saved


def test_associative_scan_in_a_selective_region():
    """``associative_scan(combine_mode="generic")`` inside a selective region: Dynamo writes its combine
    steps as vmap levels, which the re-trace of the kept body would bake into constants (AOTAutograd
    then failed: "expected FakeTensor").  The body's no-op levels are removed as the outer graph's are,
    the scan is found, and the numbers are eager's."""
    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    def scan(a, b):
        return associative_scan(combine, (a, b), dim=1, combine_mode="generic")[1]

    def fn(a, b):
        return checkpoint(scan, a, b, use_reentrant=False, context_fn=selective_checkpointing)
    torch.manual_seed(0)
    a = torch.rand(2, 8, 3).requires_grad_()
    b = torch.randn(2, 8, 3, requires_grad=True)
    report = check_against_eager(fn, a, b)
    assert [r.kind for r in report.rewrites] == ["scan"], report
    assert report.graphs[0].selective_regions == 1, report


class MaskedBlock(Block):
    """Block whose attention takes its boolean mask (True: attend) as an argument."""

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).masked_fill(~keep, float("-inf"))
        x = x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D))
        return x + self.down(torch.relu(self.up(x)))


class MaskOutside(torch.nn.Module):
    """transformers' layout: the mask is built once, outside the checkpointed layers (from ``arange``,
    or with ``padded``, also from a padding mask the caller passes), and each layer is given it."""

    def __init__(self, padded: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList([MaskedBlock() for _ in range(2)])
        self.padded = padded

    def forward(self, x, pad):
        i = torch.arange(x.shape[1], device=x.device)
        keep = i[:, None] >= i[None, :]
        if self.padded:
            keep = keep & pad[:, None, None, :]
        for b in self.blocks:
            x = checkpoint(b, x, keep, use_reentrant=False, context_fn=selective_checkpointing)
        return x


@pytest.mark.parametrize("padded", [False, True])
def test_selective_region_sees_how_its_mask_is_made(padded):
    """A causal mask built outside the selective regions is built again inside each body (it follows
    from shapes alone), so the attention is read as causal, not as an opaque bias; a mask that also
    reads the caller's padding mask stays an input, read as a bias.  Both are exact."""
    torch.manual_seed(0)
    model = MaskOutside(padded)
    x = torch.randn(2, 16, D, requires_grad=True)
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[1, 12:] = False
    report = check_against_eager(model, x, pad)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    masks = {"mask=causal" in r.ir for r in report.rewrites}
    assert masks == {not padded}, report


class BufferMaskBlock(Block):
    """Block whose causal mask is a module buffer (GPT-2's ``bias``), read by value under a guard."""

    def __init__(self):
        super().__init__()
        mask = torch.ones(64, 64, dtype=torch.bool).tril().view(1, 1, 64, 64)
        self.register_buffer("causal", mask, persistent=False)

    def attend(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).masked_fill(~self.causal[:, :, :n, :n], float("-inf"))
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D))


def test_selective_region_reading_a_buffer_mask_is_guarded():
    """A mask buffer read by value inside a selective region guards the whole graph: the rewrite is
    exact while the buffer holds the causal mask, and a call after the buffer changed runs the program
    as written (eager's numbers, not the causal attention's)."""
    torch.manual_seed(0)
    block = BufferMaskBlock()
    model = Calling(lambda x: checkpoint(block, x, use_reentrant=False, context_fn=selective_checkpointing), block)
    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(model, x)
    assert [r.kind for r in report.rewrites] == ["attention"], report
    guards = report.graphs[0].guards
    assert len(guards) == 1 and guards[0].endswith("_buffers_causal_"), report
    compiled = torch.compile(model, backend="seqfuse", options={"downstream": "aot_eager"})
    compiled(x)
    block.causal.fill_(True)
    with pytest.warns(UserWarning, match="differs from its value at compile time"):
        y = compiled(x)
    assert rel_err(y, model(x)) < 1e-6


@pytest.mark.parametrize("outer", ["selective", "plain"])
def test_regions_nested_in_selective_regions(outer):
    """A plain region inside a selective one stays a call (with the always-recompute policy torch gives
    it) and a selective region inside an inlined plain one stays a call: each attention is found, and
    the numbers are eager's."""
    torch.manual_seed(0)
    first, second = Block(), Block()
    policy = selective_checkpointing
    if outer == "selective":
        def fn(x):
            return checkpoint(lambda y: checkpoint(second, first(y), use_reentrant=False), x,
                              use_reentrant=False, context_fn=policy)
    else:
        def fn(x):
            return checkpoint(lambda y: checkpoint(second, first(y), use_reentrant=False, context_fn=policy), x,
                              use_reentrant=False)
    model = Calling(fn, torch.nn.ModuleList([first, second]))
    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(model, x)
    assert [r.kind for r in report.rewrites] == ["attention", "attention"], report
    graph = report.graphs[0]
    assert (graph.selective_regions, graph.checkpoint_regions) == ((2, 0) if outer == "selective" else (1, 1))


def test_nested_regions():
    """A checkpoint inside a checkpointed function: both bodies are inlined, the attention in the inner
    one is found, and the numbers are eager's."""
    torch.manual_seed(0)
    block = Block()

    def inner(x):
        return x + block.attend(x)

    def outer(x):
        y = checkpoint(inner, x, use_reentrant=False)
        return y + block.down(torch.relu(block.up(y)))

    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(Checkpointed(outer, block), x)
    assert [r.kind for r in report.rewrites] == ["attention"], report
    assert not report.near_misses, report


def test_linear_attention_in_a_checkpointed_layer():
    """The recurrent families too: a chunk-free causal linear attention (a masked quadratic product)
    inside a checkpointed layer becomes an ssd op, with eager's gradients."""
    torch.manual_seed(0)

    class LinearAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, 3 * D)

        def mix(self, x):
            b, n, _ = x.shape
            q, k, v = self.proj(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
            q, k = F.elu(q) + 1, F.elu(k) + 1
            scores = (q @ k.transpose(-1, -2)).masked_fill(
                ~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), 0.0)
            return (scores @ v).transpose(1, 2).reshape(b, n, D)

        def forward(self, x):
            return x + checkpoint(self.mix, x, use_reentrant=False)

    x = torch.randn(2, 20, D, requires_grad=True)
    report = check_against_eager(LinearAttention(), x)
    assert [r.kind for r in report.rewrites] == ["ssd"], report


def test_in_place_ops_inside_a_region_are_kept():
    """In-place calls in a region have no users in Dynamo's graph (``x[:, 0] = 0``, ``m.scatter_(...)``:
    MiniMax-M3's block mask, KDA's in-place forward substitution).  Inlining must keep them: an early
    version ran FX's dead-code pass on the inlined graph, which dropped them (MiniMax-M3 and Kimi Linear
    with gradient checkpointing: logits 12-34% off)."""
    torch.manual_seed(0)
    block = Block()

    def region(x):
        y = x * 1.0
        y[:, 0] = 0.0
        keep = torch.zeros(x.shape[0], x.shape[1], D, dtype=x.dtype)
        keep.scatter_(-1, torch.arange(x.shape[1]).remainder(D).view(1, -1, 1).expand(x.shape[0], -1, 1), 1.0)
        return block.attend(y) + keep

    x = torch.randn(2, 16, D, requires_grad=True)
    report = check_against_eager(Checkpointed(region, block), x)
    assert [r.kind for r in report.rewrites] == ["attention"], report


@pytest.mark.parametrize("selective", [False, True])
def test_inference_through_a_checkpointed_sdpa_call(selective):
    """No gradient: nothing is recomputed, so the region's tags are dropped (a selective region is
    inlined like a plain one: no policy has anything to choose).  AOTAutograd's inference path
    refuses a tagged region that holds a random op, and SDPA counts as one: torch.compile of this
    program with aot_eager alone raises (torch 2.13).  The first SDPA call (is_causal with query and
    key lengths that differ) is not rewritten and stays an SDPA call in the region."""
    def attend(q, k, v):
        return (F.scaled_dot_product_attention(q, k[..., :12, :], v[..., :12, :], is_causal=True)
                + F.scaled_dot_product_attention(q, k, v, is_causal=True))

    context = {"context_fn": selective_checkpointing} if selective else {}

    def fn(q, k, v):
        return checkpoint(attend, q, k, v, use_reentrant=False, **context)

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    report = check_against_eager(fn, q, k, v, grads=False)
    assert [r.kind for r in report.rewrites] == ["attention"], report
    assert [m.kind for m in report.near_misses] == ["attention"], report

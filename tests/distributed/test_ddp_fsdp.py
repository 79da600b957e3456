"""seqfuse inside torch.distributed data parallelism: DDP and FSDP2 (``fully_shard``), 2 CPU
processes on gloo, spawned by the test.

Each rank trains on its slice of one batch through ``torch.compile(wrapped, backend="seqfuse")``;
its loss and the gradient of every parameter (DDP: averaged by its all-reduce; FSDP2: the
reduce-scattered shards gathered with ``full_tensor``) must equal one eager process on the whole
batch (relative error < 1e-5, fp32), and every rank's report must show the mixers rewritten and every layer's mixer run as a
seqfuse op.
DDP runs with 1 MB buckets (the smallest Dynamo's DDP optimizer takes), so with GPT-2's
1.8 MB blocks it splits the graph at bucket boundaries inside blocks: the split must not cut a mixer out of recognition.
"""
from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
import torch.distributed as dist

from distributed.harness import spawn
from helpers import Logits

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PER_RANK = 1  # sequences per rank


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str, world: int):
    """(model, whole-batch input, {IR kind: rewrites per rank}, blocks to shard with FSDP2)."""
    import transformers as T
    torch.manual_seed(0)
    batch = PER_RANK * world
    if name == "gpt2":
        gpt2 = _example("gpt2")
        # 1.8 MB of weights per block: 1 MB DDP buckets split the graph inside every block
        model, _ = gpt2.build(gpt2.GPTConfig(n_embd=192, n_head=4, n_layer=2))
        tokens = torch.randint(model.cfg.vocab_size, (batch, 32))
        return model.train(), tokens, {"attention": model.cfg.n_layer}, list(model.h)
    if name == "hyena":
        op, _ = _example("hyena").build(batch=batch, seq_len=64)
        return op.train(), torch.randn(batch, 64, 32), {"long_conv": 2}, []
    if name in ("mamba_loop", "mamba_assoc_scan"):
        cfg = T.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                            conv_kernel=4, use_cache=False, use_associative_scan=name == "mamba_assoc_scan")
        model = Logits(T.MambaForCausalLM(cfg))
        return model.train(), torch.randint(0, 64, (batch, 16)), {"scan": 2}, list(model.lm.backbone.layers)
    if name == "mamba2":
        cfg = T.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                             expand=2, n_groups=2, state_size=16, chunk_size=16, conv_kernel=4, use_cache=False)
        model = Logits(T.Mamba2ForCausalLM(cfg))
        return model.train(), torch.randint(0, 64, (batch, 32)), {"ssd": 2}, list(model.lm.backbone.layers)
    raise ValueError(name)


def _loss(out: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    # every output element weighs in (a fixed random contraction): no gradient can hide
    return (out * R).sum()


def train_one_step(rank: int, world: int, name: str, wrap: str, per_block: bool) -> dict:
    """On each rank: the wrapped, compiled model's loss and full gradients on this rank's slice,
    and (rank 0) eager's loss and gradients on the whole batch in one process."""
    import seqfuse
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, batch, expected, blocks = build(name, world)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        R = torch.randn_like(reference(batch[:1]).float()).expand(batch.shape[0], *reference(batch[:1]).shape[1:])
    R = R * torch.linspace(0.5, 1.5, batch.shape[0]).view(-1, *[1] * (R.dim() - 1))
    result = {}
    if rank == 0:
        # DDP and FSDP2 average the ranks' gradients: the reference is the mean of the ranks' losses
        ref_loss = _loss(reference(batch), R) / world
        ref_loss.backward()
        result["ref_loss"] = ref_loss.item()
        result["ref_grads"] = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    local = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
    if wrap == "ddp":
        wrapped = DDP(model, bucket_cap_mb=1)  # the smallest buckets Dynamo's DDP optimizer takes
    else:
        for block in blocks if per_block else []:
            fully_shard(block)
        wrapped = fully_shard(model)
    options = {"downstream": "aot_eager"}
    report = seqfuse.explain(wrapped, local, options=options)
    # the report's forward ran with grad on: differentiate its output (one forward, one backward)
    loss = _loss(report.output, R[rank * PER_RANK:(rank + 1) * PER_RANK])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    result["loss"] = float(sum(losses)) / world
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        grads[n.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = \
            g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    result["grads"] = grads
    result["counts"] = {kind: report.count(kind) for kind in expected}
    result["calls"] = {kind: sum(report.runtime.get(kind, {}).values()) for kind in expected}
    result["graphs"] = len(report.graphs)
    result["expected"] = expected
    result["near_misses"] = [f"{m.kind}: {m.reason}" for m in report.near_misses]
    return result


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(results):
    ref = results[0]
    for rank, r in enumerate(results):
        for kind, n in r["expected"].items():
            # every layer's mixer ran as the seqfuse op (FSDP2 graph-breaks at each sharded block,
            # and the blocks share one compiled graph: one rewrite, n calls)
            assert r["calls"][kind] >= n and r["counts"][kind] >= 1, f"rank {rank}: {r['counts']} (expected {r['expected']}); " \
                                           f"calls {r['calls']}, graphs {r['graphs']}, near misses: {r['near_misses']}"
        assert abs(r["loss"] - ref["ref_loss"]) <= 1e-5 * abs(ref["ref_loss"]), (r["loss"], ref["ref_loss"])
        assert set(r["grads"]) == set(ref["ref_grads"]), sorted(set(r["grads"]) ^ set(ref["ref_grads"]))
        worst = max(((rel(r["grads"][n], g), n) for n, g in ref["ref_grads"].items()))
        assert worst[0] < 1e-5, f"rank {rank}: gradient of {worst[1]}: relative error {worst[0]:.3g}"


def models_rank(rank: int, world: int, names: list, wrap: str, per_block: bool) -> list:
    """Every model in ``names`` on this rank, in order (one process start for all of them)."""
    out = []
    for name in names:
        torch._dynamo.reset()
        out.append(train_one_step(rank, world, name, wrap, per_block))
    return out


def _by_model(per_rank: list, names: list) -> dict:
    return {name: [r[i] for r in per_rank] for i, name in enumerate(names)}


def test_ddp_small_buckets_matches_one_process():
    names = ["gpt2", "mamba_loop", "mamba_assoc_scan", "mamba2", "hyena"]
    results = _by_model(spawn(models_rank, 2, names, "ddp", False), names)
    for name in names:
        check(results[name])
    # the buckets did split GPT-2's graph, and each piece went through seqfuse
    assert all(r["graphs"] >= 2 for r in results["gpt2"]), [r["graphs"] for r in results["gpt2"]]


def test_fsdp2_fully_shard_per_block_matches_one_process():
    names = ["gpt2", "mamba2"]
    results = _by_model(spawn(models_rank, 2, names, "fsdp2", True), names)
    for name in names:
        check(results[name])


def test_fsdp2_fully_shard_whole_model_matches_one_process():
    names = ["mamba_loop"]
    check(_by_model(spawn(models_rank, 2, names, "fsdp2", False), names)["mamba_loop"])

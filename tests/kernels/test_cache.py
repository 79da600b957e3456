"""The kernel cache: keys, memory and on-disk JSON store, atomic writes, corrupt files, autotune."""
import ast
import json
import pathlib

import pytest
import torch

import seqfuse
from seqfuse.runtime import cache

CPU = torch.device("cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path / "c"))
    return tmp_path / "c"


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    monkeypatch.delenv("SEQFUSE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "seqfuse"


def test_key_is_canonical_and_names_versions_and_device():
    a = cache.make_key("attention.fwd", {"MASK": 1, "HEAD_DIM": 64}, CPU)
    assert a == cache.make_key("attention.fwd", {"HEAD_DIM": 64, "MASK": 1}, CPU)
    assert a != cache.make_key("attention.fwd", {"MASK": 2, "HEAD_DIM": 64}, CPU)
    assert a != cache.make_key("attention.dq", {"MASK": 1, "HEAD_DIM": 64}, CPU)
    key = json.loads(a)
    assert key["torch"] == torch.__version__ and key["device"] == "cpu" and "triton" in key


def test_put_get_roundtrip_through_disk(cache_dir):
    c = cache.ConfigCache("t")
    assert c.get("k1") is None
    c.put("k1", {"BLOCK_M": 64})
    assert c.get("k1") == {"BLOCK_M": 64}
    data = json.loads((cache_dir / "t.json").read_text())
    assert data == {"version": cache.CACHE_VERSION, "entries": {"k1": {"BLOCK_M": 64}}}
    fresh = cache.ConfigCache("t")          # another process: nothing in memory
    assert fresh.get("k1") == {"BLOCK_M": 64}
    fresh.put("k2", {"BLOCK_M": 32})        # merges with what is on disk
    assert set(json.loads((cache_dir / "t.json").read_text())["entries"]) == {"k1", "k2"}
    assert [p.name for p in cache_dir.iterdir()] == ["t.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 999, "entries": {"k1": {}}}',
                                     '{"version": 1, "entries": [1]}', ""])
def test_corrupt_or_foreign_file_is_ignored_and_rebuilt(cache_dir, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "t.json").write_text(content)
    c = cache.ConfigCache("t")
    assert c.get("k1") is None
    c.put("k1", {"BLOCK_M": 16})
    assert json.loads((cache_dir / "t.json").read_text())["entries"] == {"k1": {"BLOCK_M": 16}}


def test_unwritable_cache_dir_only_costs_persistence(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(blocker / "sub"))   # a path under a regular file
    c = cache.ConfigCache("t")
    c.put("k", {"BLOCK_M": 16})
    assert c.get("k") == {"BLOCK_M": 16}


def test_autotune_picks_the_fastest_skips_failures_and_caches(cache_dir):
    c = cache.ConfigCache("t")
    timed = []

    def bench(config):
        timed.append(config["BLOCK_M"])
        if config["BLOCK_M"] == 128:
            raise RuntimeError("out of shared memory")
        return {16: 3.0, 32: 1.0, 64: 2.0}[config["BLOCK_M"]]

    candidates = [{"BLOCK_M": m} for m in (16, 32, 64, 128)]
    assert cache.autotune(c, "k", candidates, bench) == {"BLOCK_M": 32}
    assert timed == [16, 32, 64, 128]
    assert cache.autotune(c, "k", candidates, bench) == {"BLOCK_M": 32}
    assert timed == [16, 32, 64, 128]       # cached: not timed again
    assert cache.autotune(cache.ConfigCache("t"), "k", candidates, bench) == {"BLOCK_M": 32}
    assert timed == [16, 32, 64, 128]       # nor by a new process


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_autotune_off_takes_the_first_candidate_untimed_and_unstored(cache_dir, monkeypatch, value):
    monkeypatch.setenv("SEQFUSE_AUTOTUNE", value)
    c = cache.ConfigCache("t")
    timed = []

    def bench(config):
        timed.append(config)
        return 1.0
    candidates = [{"BLOCK_M": 64}, {"BLOCK_M": 32}]
    assert cache.autotune(c, "k", candidates, bench) == {"BLOCK_M": 64}
    assert timed == [] and c.get("k") is None  # nothing timed, nothing stored
    # a config tuned earlier (by a process with autotuning on) is still used
    c.put("k2", {"BLOCK_M": 32})
    assert cache.autotune(c, "k2", candidates, bench) == {"BLOCK_M": 32}
    monkeypatch.setenv("SEQFUSE_AUTOTUNE", "1")
    assert cache.autotune(c, "k", candidates, lambda cfg: {64: 2.0, 32: 1.0}[cfg["BLOCK_M"]]) == {"BLOCK_M": 32}


def test_autotune_raises_when_every_candidate_fails(cache_dir):
    def bench(config):
        raise RuntimeError("nope")
    with pytest.raises(RuntimeError, match="every candidate config failed"):
        cache.autotune(cache.ConfigCache("t"), "k", [{"BLOCK_M": 16}], bench)


def test_runtime_does_not_import_lowering():
    root = pathlib.Path(seqfuse.__file__).parent / "runtime"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("seqfuse.lowering") for n in names), (path.name, names)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_interpreter_uses_a_fixed_config_and_writes_no_cache(cache_dir):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the compiled path autotunes")
    from seqfuse.lowering.triton import attention as ta
    q = torch.randn(1, 1, 8, 16)
    a = dict(scale=None, mask="none", diag=0, window=0, fill=float("-inf"), bias_after_mask=False, gqa_groups=1,
             softcap=None, dropout=0.0)
    ta.forward(q, q, q, None, None, a)
    assert not cache_dir.exists()

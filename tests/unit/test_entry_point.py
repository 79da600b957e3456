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


ISOLATED = textwrap.dedent("""
    import importlib.metadata
    import sys

    import torch

    # the installed distribution's metadata (and so its entry point) must not be what works here
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "seqfuse" not in eps.names, eps
    try:
        importlib.metadata.version("seqfuse")
        raise AssertionError("seqfuse's installed metadata is visible")
    except importlib.metadata.PackageNotFoundError:
        pass

    import seqfuse
    assert seqfuse.__file__.startswith(sys.argv[1]), seqfuse.__file__   # the copy, not the checkout

    def f(x, y):
        return torch.softmax(x @ y.transpose(-2, -1), dim=-1) @ y

    x, y = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    out = torch.compile(f, backend="seqfuse", options={"downstream": "eager"})(x, y)
    torch.testing.assert_close(out, f(x, y))
    assert seqfuse.counters()["attention"]["aten"] == 1, seqfuse.counters()
    # backend=seqfuse.backend is the same function
    out = torch.compile(f, backend=seqfuse.backend, options={"downstream": "eager"})(x, y)
    torch.testing.assert_close(out, f(x, y))
    print("OK")
""")


def _isolated_env(tmp_path):
    """A copy of seqfuse/ and a directory of links to site-packages' entries other than seqfuse's
    (its dist-info with the entry point, its editable finder and .pth): with ``python -S`` (no site
    processing) and these two on PYTHONPATH, seqfuse is a plain package on the path, as in a checkout
    that was never pip-installed."""
    import shutil
    import site

    import seqfuse
    src = tmp_path / "src"
    shutil.copytree(os.path.dirname(seqfuse.__file__), src / "seqfuse",
                    ignore=shutil.ignore_patterns("__pycache__"))
    farm = tmp_path / "site"
    farm.mkdir()
    for sp in site.getsitepackages():
        for entry in os.listdir(sp):
            if "seqfuse" in entry.lower() or entry.endswith(".pth") or (farm / entry).exists():
                continue
            (farm / entry).symlink_to(os.path.join(sp, entry))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=f"{src}{os.pathsep}{farm}", PYTHONNOUSERSITE="1", SEQFUSE_STRICT="1", OMP_NUM_THREADS="1")
    return src, env


def test_import_registers_the_backend_without_installed_metadata(tmp_path):
    src, env = _isolated_env(tmp_path)
    proc = subprocess.run([sys.executable, "-S", "-c", ISOLATED, str(src)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


ORDERS = textwrap.dedent("""
    import torch
    import torch._dynamo

    def f(x):
        return x.sin()

    x = torch.randn(3)
    if sys.argv[1] == "discovered_first":   # Dynamo has read the entry points before seqfuse is imported
        torch.compile(f, backend="eager")(x)
        torch._dynamo.list_backends()
    import seqfuse
    import importlib
    importlib.reload(seqfuse)                # a second registration is a no-op
    out = torch.compile(f, backend="seqfuse", options={"downstream": "eager"})(x)
    torch.testing.assert_close(out, x.sin())
    assert "seqfuse" in torch._dynamo.list_backends()
    print("OK")
""")


def test_import_registration_and_entry_point_do_not_clash(tmp_path):
    env = {**os.environ, "SEQFUSE_STRICT": "1", "OMP_NUM_THREADS": "1"}
    for order in ("imported_first", "discovered_first"):
        proc = subprocess.run([sys.executable, "-c", "import sys\n" + ORDERS, order], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (order, proc.stderr[-3000:])
        assert proc.stdout.strip().endswith("OK"), order


def test_inductor_cache_key_follows_the_op_sources(tmp_path, monkeypatch):
    # inductor's FX graph cache must not serve a graph compiled against another seqfuse: the key
    # hashes the sources that define the ops' fake implementations (their output layouts), so an
    # edit of one of them (same version, same schemas) gives another key
    import sys
    from seqfuse.compiler import backend
    mod = tmp_path / "sf_fake_op_module.py"
    mod.write_text("LAYOUT = 'contiguous'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backend, "_OP_MODULES", backend._OP_MODULES + ("sf_fake_op_module",))
    backend._cache_key.cache_clear()
    first = backend._cache_key()
    mod.write_text("LAYOUT = 'blhd'\n")
    backend._cache_key.cache_clear()
    assert backend._cache_key() != first
    sys.modules.pop("sf_fake_op_module", None)
    backend._cache_key.cache_clear()

"""The docs do what they say: README's quick start and every python block in docs/*.md run, and the
file names, pass names, fallback order, environment variables and links they mention match the code.

A block that is not meant to run (it stands for the reader's own model, or needs several processes)
is preceded by a ``<!-- no-run: why -->`` comment.  The blocks of one page run in order in one
namespace, as a reader pastes them into one session, in a temporary working directory.
"""
import os
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import seqfuse
from seqfuse.runtime.dispatch import PATHS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"<!--\s*no-run\b")
#: blocks that cannot run here and are not marked yet, in pages another engineer owns: (page, first
#: line of the block) -> why.  Remove an entry when its page gets the ``<!-- no-run -->`` marker.
UNMARKED_NOT_RUNNABLE: dict = {}
DUMP_NAME = re.compile(r"\bg\d+_\d{2}_[a-z_]+\.(?:txt|dot)\b")


def python_blocks(page: Path):
    """[(line number, code, runnable)] of the page's ```python blocks."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            code = "\n".join(lines[start:end])
            first = code.strip().splitlines()[0] if code.strip() else ""
            runnable = not NO_RUN.search(before) and (page.name, first) not in UNMARKED_NOT_RUNNABLE
            blocks.append((start + 1, code, runnable))
            i = end
        i += 1
    return blocks


def run_page(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    # a real module: classes the page defines get its name as __module__, which Dynamo imports
    module = types.ModuleType(f"seqfuse_docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    ran = 0
    for line, code, runnable in python_blocks(page):
        if not runnable:
            continue
        try:
            exec(compile(textwrap.dedent(code), f"{page.name}:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.relative_to(ROOT)}, the python block at line {line} raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    return namespace, ran


@pytest.fixture
def quick_downstream(monkeypatch):
    """The blocks test seqfuse's API, not inductor: the rest of each graph runs through aot_eager
    (the same forward and backward graphs, no code generation) to keep this test short."""
    from seqfuse.compiler import backend

    real = backend.compile_downstream
    monkeypatch.setattr(backend, "compile_downstream",
                        lambda gm, inputs, downstream, mode=None: real(gm, inputs, "aot_eager", mode))
    monkeypatch.setenv("SEQFUSE_STRICT", "1")


def test_readme_quick_start_runs(tmp_path, monkeypatch, quick_downstream, capsys):
    seqfuse.reset_counters()
    namespace, ran = run_page(ROOT / "README.md", tmp_path, monkeypatch)
    assert ran == 1
    assert namespace["report"].count("attention") == 1
    out = capsys.readouterr().out
    assert "seqfuse.attention(" in out and "{'attention': {'triton': 0, 'cpu': 0, 'aten': 2, 'eager': 0}}" in out


# getting_started.md runs in its own test below, which also checks what it shows
PAGES_WITH_CODE = [p for p in PAGES[1:] if python_blocks(p) and p.name != "getting_started.md"]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_every_python_block_of_a_page_runs(page, tmp_path, monkeypatch, quick_downstream):
    registered = {p.name for p in seqfuse.registered_passes()}
    try:
        _, ran = run_page(page, tmp_path, monkeypatch)
    finally:
        for p in seqfuse.registered_passes():  # a page that registers a pass (writing_a_pass.md) cleans up
            if p.name not in registered:
                seqfuse.unregister_pass(p.name)
    assert ran or all(not runnable for _, _, runnable in python_blocks(page))


def test_getting_started_shows_what_it_says(tmp_path, monkeypatch, quick_downstream, capsys):
    namespace, _ = run_page(ROOT / "docs" / "getting_started.md", tmp_path, monkeypatch)
    assert namespace["report"].count("attention") == 1
    assert [r.kind for r in namespace["checkpointed"].rewrites] == ["attention"]  # inside a checkpoint
    assert set(namespace["report"].compile_seconds) == {"first_call", "dynamo", "seqfuse", "downstream"}
    out = capsys.readouterr().out
    assert "the probabilities are used 2 times" in out  # the near miss the page shows
    assert "{'attention': {'triton': 0, 'cpu': 0, 'aten': 1, 'eager': 0}}" in out  # the counters it shows
    written = sorted(os.listdir(tmp_path / "dump"))
    assert written and all(DUMP_NAME.fullmatch(n) for n in written), written


def test_unmarked_exemptions_are_still_there():
    for page, first in UNMARKED_NOT_RUNNABLE:
        blocks = python_blocks(ROOT / "docs" / page)
        assert any(code.strip().startswith(first) for _, code, _ in blocks), \
            f"docs/{page} no longer has the block {first!r}: remove it from UNMARKED_NOT_RUNNABLE"


def _dump_names(tmp_path) -> list[str]:
    """The files a compile with every built-in pass writes under dump_dir."""
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    torch._dynamo.reset()
    report = seqfuse.explain(f, *(torch.randn(1, 1, 4, 2) for _ in range(3)),
                             options={"downstream": "eager", "dump_dir": str(tmp_path)})
    return [os.path.basename(p) for p in report.dumps]


def test_dump_file_names_in_the_docs_are_the_ones_written(tmp_path):
    written = _dump_names(tmp_path)
    for page in PAGES:
        named = set(DUMP_NAME.findall(page.read_text()))
        assert named <= set(written), f"{page.name} names dump files the code does not write: " \
                                      f"{sorted(named - set(written))}; it writes {written}"
    # options.md lists every file, in order
    text = (ROOT / "docs" / "options.md").read_text()
    listing = text[text.index("## `dump_dir`"):text.index("## `verify`")]
    assert DUMP_NAME.findall(listing.split("```")[1]) == written


def test_built_in_passes_are_all_named():
    built_in = [p.name for p in seqfuse.registered_passes() if p.enabled_by_default]
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `passes`"))
    assert re.findall(r'`"(\w+)"`', row) == built_in, row
    options = (ROOT / "docs" / "options.md").read_text()
    section = options[options.index("## `passes`"):options.index("## `dump_dir`")]
    assert [n for n in re.findall(r'`"(\w+)"`', section) if n in built_in] [:len(built_in)] == built_in


def test_fallback_order_is_the_dispatchers():
    order = re.compile(r"\btriton,\s+((?:(?:then|and)\s+)?(?:cpu|aten|eager)(?:,\s+(?:(?:then|and)\s+)?(?:cpu|aten|eager))*)")
    seen = 0
    for page in PAGES:
        text = re.sub(r"\s+", " ", page.read_text().replace("`", "").replace('"', ""))
        for m in order.finditer(text):
            names = ["triton"] + [w.split()[-1] for w in m.group(1).split(", ")]
            assert names == list(PATHS), f"{page.name}: '{m.group(0)}' is not the order {PATHS}"
            seen += 1
    assert seen >= 2  # getting_started.md and options.md state it


def test_every_environment_variable_is_documented():
    used = set()
    for path in (ROOT / "seqfuse").rglob("*.py"):
        used |= set(re.findall(r"\b(SEQFUSE_[A-Z_]+)\b", path.read_text()))
    documented = (ROOT / "docs" / "options.md").read_text()
    assert used and not [v for v in sorted(used) if v not in documented], sorted(used)


def test_relative_links_point_at_files():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for page in PAGES:
        for target in link.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_and_docs_do_not_promise_a_one_minute_quick_benchmark():
    for page in PAGES:
        text = page.read_text()
        assert "under a minute" not in text, page.name

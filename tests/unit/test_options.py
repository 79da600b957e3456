"""Options.from_dict validation, and options reaching the backend through torch.compile / explain."""
import math
import pathlib

import pytest
import torch

import seqfuse
from seqfuse.compiler.options import Options
from helpers import check_against_eager

VALID = ["downstream", "passes", "dump_dir", "verify", "runtime", "algorithm"]


def attn(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def qkv(requires_grad=False):
    return [torch.randn(2, 2, 8, 4, requires_grad=requires_grad) for _ in range(3)]


# --- Options.from_dict ---------------------------------------------------------

def test_defaults():
    for given in (None, {}):
        o = Options.from_dict(given)
        assert o == Options()
        assert (o.downstream, o.passes, o.dump_dir, o.verify, o.runtime) == ("inductor", {}, None, False, "auto")


def test_valid_values_are_kept():
    o = Options.from_dict({"downstream": "aot_eager", "runtime": "eager", "passes": {"attention": False},
                           "dump_dir": "/tmp/x", "verify": True})
    assert (o.downstream, o.runtime, o.passes, o.dump_dir, o.verify) == \
        ("aot_eager", "eager", {"attention": False}, "/tmp/x", True)
    assert Options.from_dict({"passes": ["attention"]}).passes == {"__only__": ["attention"]}


def test_algorithm_option():
    o = Options.from_dict({"algorithm": {"ssd": "chunked", "scan": "recurrent", "long_conv": "direct"}})
    assert o.algorithm == {"ssd": "chunked", "scan": "recurrent", "long_conv": "direct"}
    assert Options.from_dict({}).algorithm == {}
    with pytest.raises(ValueError, match=r"'algorithm' must be a dict"):
        Options.from_dict({"algorithm": "chunked"})
    with pytest.raises(ValueError, match=r"'algorithm' names unknown op kind 'mamba'"):
        Options.from_dict({"algorithm": {"mamba": "chunked"}})
    with pytest.raises(ValueError, match=r"'algorithm' for 'ssd' must be one of \('quadratic', 'chunked', "
                                         r"'recurrent'\), got 'fft'"):
        Options.from_dict({"algorithm": {"ssd": "fft"}})


def test_dump_dir_accepts_a_pathlike(tmp_path):
    o = Options.from_dict({"dump_dir": tmp_path / "d"})
    assert o.dump_dir == str(pathlib.Path(tmp_path) / "d") and isinstance(o.dump_dir, str)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        Options.from_dict({"bogus": 1, "downstream": "eager"})
    msg = str(info.value)
    assert "'bogus'" in msg
    assert "downstream" not in msg.split("valid")[0]  # only the bad name is reported as unknown
    for name in VALID:
        assert name in msg


@pytest.mark.parametrize("name, value", [
    ("downstream", "tvm"),
    ("downstream", None),
    ("runtime", "cuda"),
    ("runtime", ""),
    ("passes", 3),
    ("passes", "attention"),
    ("passes", {"attention": 1}),
    ("passes", {"attention": "yes"}),
    ("passes", ["attention", 3]),
    ("passes", {"no_such_pass": True}),
    ("passes", ["no_such_pass"]),
    ("dump_dir", 5),
    ("dump_dir", ["/tmp"]),
    ("verify", "yes"),
    ("verify", 1),
    ("verify", None),
])
def test_bad_value_names_the_option(name, value):
    with pytest.raises(ValueError, match=f"option '{name}'"):
        Options.from_dict({name: value})


def test_unknown_pass_names_the_pass_and_the_registered_ones():
    with pytest.raises(ValueError) as info:
        Options.from_dict({"passes": {"atention": True}})
    assert "'atention'" in str(info.value) and "'attention'" in str(info.value)


# --- through torch.compile / explain ----------------------------------------------

def test_compile_with_unknown_option_raises_on_first_call():
    compiled = torch.compile(attn, backend="seqfuse", options={"bogus": 1})  # lazy: no error yet
    with pytest.raises(Exception) as info:
        compiled(*qkv())
    msg = str(info.value)
    assert "unknown option" in msg and "'bogus'" in msg and "downstream" in msg


def test_explain_validates_options_before_compiling():
    with pytest.raises(ValueError, match="option 'runtime'"):
        seqfuse.explain(attn, *qkv(), options={"runtime": "gpu"})
    assert seqfuse.counters() == {}  # nothing ran


def test_unknown_pass_raises_even_without_strict_mode(monkeypatch):
    """A misspelt pass name is an option error, not a pipeline failure compiled around with a warning."""
    monkeypatch.delenv("SEQFUSE_STRICT", raising=False)
    compiled = torch.compile(attn, backend="seqfuse", options={"downstream": "eager", "passes": {"atention": False}})
    with pytest.raises(Exception, match="unknown pass"):
        compiled(*qkv())
    with pytest.raises(ValueError, match="unknown pass"):
        seqfuse.explain(attn, *qkv(), options={"passes": ["atention"]})


def test_disabling_the_attention_pass():
    q, k, v = qkv(requires_grad=True)
    report = check_against_eager(attn, q, k, v, options={"downstream": "eager", "passes": {"attention": False}})
    assert report.count("attention") == 0
    assert report.rewrites == []
    assert report.runtime == {}  # no seqfuse op ran


def test_passes_as_a_list_selects_the_passes_to_run():
    report = check_against_eager(attn, *qkv(), options={"downstream": "eager", "passes": ["attention"]}, grads=False)
    assert report.count("attention") == 1
    torch._dynamo.reset()
    report = check_against_eager(attn, *qkv(), options={"downstream": "eager", "passes": []}, grads=False)
    assert report.count("attention") == 0


@pytest.mark.parametrize("options", [["verify"], ("verify", "dump_dir"), "verify", 3, {1: True}])
def test_options_that_are_not_a_dict_name_the_argument(options):
    with pytest.raises(ValueError, match="seqfuse: argument 'options' must"):
        Options.from_dict(options)
    with pytest.raises(ValueError, match="seqfuse: argument 'options' must"):
        seqfuse.explain(lambda x: x + 1, torch.ones(2), options=options)


def test_a_list_of_names_gets_a_dict_hint():
    with pytest.raises(ValueError, match=r"options=\{'verify': True\}"):
        Options.from_dict(["verify"])


def test_torch_compile_with_a_list_of_options_says_so():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1, backend="seqfuse", options=["verify"])
    with pytest.raises(Exception, match="argument 'options' must be a dict"):
        f(torch.ones(2))

"""Tests of parexec._fingerprint: what code and which arguments a fingerprint covers,
equal across interpreters and hash seeds, bounded on hostile input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import parexec as px


def fingerprint_of(fn, *args, **kwargs):
    from parexec._fingerprint import fingerprints
    with px.Workflow("w") as wf:
        wf.add(fn, *args, **kwargs)
    g = wf.graph()
    return fingerprints(list(wf.tasks.values()), g.order, g.deps)[0]


def test_code_constants_are_part_of_the_fingerprint():
    """x + 1 and x + 100 compile to the same bytecode; the constant still changes the fp."""
    assert fingerprint_of(lambda x: x + 1, 1) != fingerprint_of(lambda x: x + 100, 1)
    assert fingerprint_of(lambda x: x + 1, 1) == fingerprint_of(lambda x: x + 1, 1)


class Hostile:
    """A global whose attribute lookups raise something other than AttributeError."""

    def __getattr__(self, name):
        raise RuntimeError(f"no attribute {name} for you")


HOSTILE = Hostile()


def uses_hostile(x):
    return (HOSTILE, x)


def test_global_whose_getattr_raises_is_opaque():
    """A global object whose __getattr__ raises does not break fingerprinting: it counts as
    opaque, and the task is still fingerprinted (and so resumable)."""
    fp = fingerprint_of(uses_hostile, 1)
    assert fp is not None and fp == fingerprint_of(uses_hostile, 1)
    assert fp != fingerprint_of(uses_hostile, 2)


def test_where_code_comes_from():
    """The standard library and installed packages count by name and version; this test
    module (outside both) is user code, read in full."""
    import json

    import pytest as installed

    from parexec._fingerprint import _origin
    assert _origin(json) == f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert _origin(installed) == f"pytest=={installed.__version__}"
    assert _origin(sys.modules[__name__]) == "user"
    assert _origin(sys.modules["parexec"]).startswith("parexec==")

# Structural fingerprints (issue 12 item 20) --------------------------------------------------

HASHSEED_SCRIPT = """
    import dataclasses, parexec as px
    from parexec._fingerprint import fingerprints
    @dataclasses.dataclass
    class Config:
        names: set
        tags: frozenset = frozenset({"x", "y", "z", "w"})
    class Plain:
        def __init__(self):
            self.members = {f"member-{i}" for i in range(20)}
    def fit(config, plain, table):
        return config, plain, table
    with px.Workflow("h") as wf:
        wf.add(fit, Config({f"name-{i}" for i in range(20)}), Plain(),
               {"k": {("a", 1), ("b", 2), ("c", 3)}})
    g = wf.graph()
    print(fingerprints(list(wf.tasks.values()), g.order, g.deps)[0])
"""


def test_objects_holding_sets_fingerprint_alike_across_interpreters(tmp_path):
    """A dataclass with a set field, an object holding a set, and sets of tuples fingerprint
    the same under two PYTHONHASHSEED values (set order follows the hash seed)."""
    (tmp_path / "fp.py").write_text(textwrap.dedent(HASHSEED_SCRIPT))
    outs = set()
    for seed in ("1", "2", "3"):
        proc = subprocess.run([sys.executable, "fp.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        outs.add(proc.stdout.strip())
    assert len(outs) == 1 and outs != {"None"}, outs


def test_structural_fingerprint_follows_the_object_and_refuses_cycles():
    """Changing a field changes the fingerprint; a self-referencing argument and one nested
    past the depth bound are not fingerprinted (never cached), without a RecursionError."""
    import dataclasses

    @dataclasses.dataclass
    class Box:
        items: set

    assert fingerprint_of(echo_args, Box({"a", "b"})) == fingerprint_of(echo_args, Box({"b", "a"}))
    assert fingerprint_of(echo_args, Box({"a", "b"})) != fingerprint_of(echo_args, Box({"a"}))
    loop: list = []
    loop.append(loop)
    assert fingerprint_of(echo_args, loop) is None
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert fingerprint_of(echo_args, deep) is None


def echo_args(*args):
    return args


class _Plain:
    pass


def _make_plain():
    return _Plain()


def test_a_class_fingerprint_does_not_change_once_an_instance_was_pickled():
    """Pickling an instance adds __slotnames__ to its class: the fingerprint must not move."""
    import pickle

    import parexec as px
    from parexec._fingerprint import fingerprints
    with px.Workflow("w") as wf:
        px.task(_make_plain, id="a")()
    specs, graph = list(wf.tasks.values()), wf.graph()
    before = fingerprints(specs, graph.order, graph.deps)
    pickle.dumps(_Plain())
    assert "__slotnames__" in _Plain.__dict__
    assert fingerprints(specs, graph.order, graph.deps) == before

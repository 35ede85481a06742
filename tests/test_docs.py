"""The guide in docs/: every python code block runs, and every public name is documented.

Each page's ``.. code-block:: python`` blocks run in order, in one namespace, in a fresh
interpreter started in a temporary folder (so files a page writes land there and a page
cannot disturb the test process or another page). A block preceded by the comment
``.. doc: skip`` (it needs a Dask cluster, a terminal or files the reader has) is not
run; the skips are counted and bounded. A block preceded by ``.. doc: requires MODULE``
(a peer library such as joblib, not a dependency of the test extra) runs only where that
module is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import parexec as px

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.rst"))
MAX_SKIPS = 12  # blocks that need a cluster, a terminal or the reader's own files

_BLOCK = re.compile(r"^\.\. code-block:: python[ \t]*\n((?:[ \t]+:[^\n]*\n)*)\n", re.M)
_SKIP = re.compile(r"^\.\. doc: skip[ \t]*\n\s*\Z", re.M)
_REQUIRES = re.compile(r"^\.\. doc: requires ([\w.]+)[ \t]*\n\s*\Z", re.M)

# Runs the blocks given as JSON on stdin; a failing block is reported as page:line.
_RUNNER = r"""
import importlib.util, json, sys, traceback

def main():
    blocks = json.load(sys.stdin)
    ns = sys.modules["__main__"].__dict__  # pickle finds the blocks' functions by reference
    for name, line, source, needs in blocks:
        if needs and importlib.util.find_spec(needs) is None:
            print(f"{name}:{line}: not run, {needs} is not installed")
            continue
        code = compile("\n" * (line - 1) + source, name, "exec")
        try:
            exec(code, ns)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"the block of {name} at line {line} failed")

if __name__ == "__main__":  # a spawned child (dask's process scheduler) imports this file
    main()
"""


def code_blocks(text: str) -> tuple[list[tuple[int, str, str | None]], int]:
    """Return an rst page's runnable python blocks and how many it skips.

    Each block is (first line, source, module it requires or None).
    """
    blocks: list[tuple[int, str, str | None]] = []
    skips = 0
    for match in _BLOCK.finditer(text):
        start = match.end()
        lines = text[start:].split("\n")
        body: list[str] = []
        for line in lines:
            if line.strip() and not line[:1].isspace():
                break
            body.append(line)
        while body and not body[-1].strip():
            body.pop()
        indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        source = "\n".join(b[indent:] for b in body) + "\n"
        before = text[:match.start()].rstrip() + "\n"
        if _SKIP.search(before):
            skips += 1
            continue
        needs = _REQUIRES.search(before)
        blocks.append((text.count("\n", 0, start) + 1, source, needs and needs.group(1)))
    return blocks, skips


def test_code_blocks_found() -> None:
    """The extractor finds blocks, their first line and the skip marker."""
    page = ("Title\n=====\n\n.. code-block:: python\n\n    x = 1\n\n    y = x\n\ntext\n\n"
            ".. doc: skip\n\n.. code-block:: python\n\n    raise SystemExit\n\n"
            ".. doc: requires joblib\n\n.. code-block:: python\n    :caption: c\n\n"
            "    import joblib\n")
    blocks, skips = code_blocks(page)
    assert blocks == [(6, "x = 1\n\ny = x\n", None), (23, "import joblib\n", "joblib")]
    assert skips == 1


def test_pages_exist() -> None:
    """The guide has its pages, and the index lists each of them."""
    names = {p.stem for p in PAGES}
    assert {"index", "getting-started", "concepts", "failures", "data", "observing",
            "resuming", "yaml", "cluster", "executor", "recipes", "coming-from", "api",
            "performance"} <= names
    index = (DOCS / "index.rst").read_text()
    for name in names - {"index"}:
        assert re.search(rf"^\s+{re.escape(name)}$", index, re.M), f"{name} not in the toctree"


def test_skips_bounded() -> None:
    """Only a few blocks are left unrun (those that need a cluster or a terminal)."""
    total = sum(code_blocks(p.read_text())[1] for p in PAGES)
    assert total <= MAX_SKIPS


@pytest.mark.timeout(90)
@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p.read_text())[0]],
                         ids=lambda p: p.stem)
def test_page_runs(page: Path, tmp_path: Path) -> None:
    """Every python block of the page runs, in order, in one namespace."""
    blocks, _ = code_blocks(page.read_text())
    payload = json.dumps([[f"docs/{page.name}", line, src, needs]
                          for line, src, needs in blocks])
    runner = tmp_path / "run_blocks.py"
    runner.write_text(_RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(DOCS.parent), os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, str(runner)], input=payload, text=True,
                          capture_output=True, cwd=tmp_path, env=env, timeout=75)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_every_public_name_documented() -> None:
    """The API reference has an entry for each name in parexec.__all__, with a docstring."""
    api = (DOCS / "api.rst").read_text()
    entries = set(re.findall(r"^\.\. (?:auto)?(?:class|function|exception|data|decorator)"
                             r":: parexec\.(\w+)", api, re.M))
    missing = sorted(set(px.__all__) - entries)
    assert not missing, f"docs/api.rst lacks an entry for {missing}"
    unknown = sorted(entries - set(px.__all__))
    assert not unknown, f"docs/api.rst documents names not in parexec.__all__: {unknown}"
    undocumented = [n for n in px.__all__ if n != "EVENT_KINDS"
                    and not (getattr(px, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


@pytest.mark.timeout(120)
def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    """The guide builds with warnings as errors (as .ci/run does), where sphinx is installed."""
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                           "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
                           str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert (tmp_path / "html" / "api.html").is_file()

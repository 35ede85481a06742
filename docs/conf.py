"""Sphinx configuration of the parexec guide and API reference.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``pip install ".[docs]"`` first). The python code blocks of every page are run by
``tests/test_docs.py``.
"""

from __future__ import annotations

import parexec

project = "parexec"
author = "the parexec authors"
copyright = "the parexec authors"  # noqa: A001 (the name Sphinx reads)
release = parexec.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Google-style docstrings (STYLE.md), rendered by napoleon.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Names that parexec re-exports keep ``__module__ = "parexec"``, so the reference
# documents them as ``parexec.X`` (what users write), never as private modules.
add_module_names = True

html_theme = "furo"
html_title = f"parexec {release}"
html_static_path: list[str] = []
exclude_patterns = ["_build"]
master_doc = "index"

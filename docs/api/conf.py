"""Sphinx configuration of bgnorm's API reference (generated from the docstrings).

Build: ``sphinx-build -W --keep-going -b html docs/api docs/api/_build/html`` (warnings are
errors; needs ``pip install 'bgnorm[docs]'``). Nothing is fetched at build time: no
intersphinx, and MathJax is only a script URL in the pages (math shows as TeX source offline).
"""

from __future__ import annotations

import os
import sys

# the checkout's package when bgnorm is not installed (or installed from elsewhere)
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src")))

import bgnorm  # noqa: E402

project = "bgnorm"
author = "bgnorm contributors"
release = version = bgnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google-style sections; "Shape" as torch's docs have it
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not objects that :members: would repeat
napoleon_custom_sections = ["Shape"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # torch's types show by their names (no intersphinx offline)

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"bgnorm {release} API reference"

"""The docstring examples of the public API run and print what they claim; every public name
has one and a place in the API reference (docs/api), which builds without warnings."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import bgnorm

MODULES = ["bgnorm.functional", "bgnorm.ops.dispatch", "bgnorm.layers", "bgnorm.registry",
           "bgnorm.convert", "bgnorm.policy", "bgnorm.distributed", "bgnorm.fuse", "bgnorm.swa",
           "bgnorm.frozen", "bgnorm.small_batch", "bgnorm.weight_std"]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api"


def _run_doctests(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, extraglobs={"torch": torch, "nn": nn},
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = _run_doctests(name)
    assert result.failed == 0
    assert result.attempted > 0


def test_mmengine_integration_example():
    pytest.importorskip("mmengine", reason="mmengine is not installed (pip install mmengine): "
                        "the example of bgnorm.integrations.mmengine.register needs it")
    result = _run_doctests("bgnorm.integrations.mmengine")
    assert result.failed == 0
    assert result.attempted > 0


def _public_names() -> list[tuple[str, object]]:
    from bgnorm.integrations import mmengine as bgn_mm

    names = [(f"bgnorm.{n}", getattr(bgnorm, n)) for n in bgnorm.__all__]
    names += [(f"bgnorm.functional.{n}", getattr(bgnorm.functional, n))
              for n in bgnorm.functional.__all__]
    names += [("bgnorm.integrations.mmengine.register", bgn_mm.register)]
    return names


@pytest.mark.parametrize("qualname, obj", _public_names(), ids=lambda v: str(v)[:40])
def test_every_public_name_has_an_example(qualname, obj):
    """Functions and classes carry a >>> example in their own docstring, modules in those of
    their public names; constants (ints, dicts: their __doc__ is the type's) in their module's
    docstring."""
    if isinstance(obj, types.ModuleType):
        for name in obj.__all__:
            assert ">>>" in (getattr(obj, name).__doc__ or ""), f"{qualname}.{name}: no example"
        return
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert ">>>" in (obj.__doc__ or ""), f"{qualname} has no >>> example"
        return
    short = qualname.rsplit(".", 1)[1]
    docs = [m.__doc__ or "" for m in (importlib.import_module(n) for n in MODULES)]
    assert any(re.search(rf">>> .*\b{short}\b", d) for d in docs), (
        f"no module docstring has a >>> example using {qualname}")


def _documented_names() -> set[str]:
    """The names the reference's pages document: autodoc directives and py:data, relative to
    the current module, and the members listed under an automodule."""
    names: set[str] = set()
    for page in sorted(DOCS.glob("*.rst")):
        module = ""
        automodule = None
        for line in page.read_text().splitlines():
            found = re.match(r"\.\. (currentmodule|automodule|autoclass|autofunction|autodata|"
                             r"py:data):: (\S+)", line)
            if found:
                kind, name = found.groups()
                automodule = name if kind == "automodule" else None
                if kind in ("currentmodule", "automodule"):
                    module = name
                    names.add(name)
                else:  # a dotted name is absolute, as for autodoc
                    names.add(name if "." in name else f"{module}.{name}")
                continue
            members = re.match(r"\s+:members: (.+)", line)
            if members and automodule:
                names.update(f"{automodule}.{m.strip()}" for m in members.group(1).split(","))
    return names


@pytest.mark.parametrize("qualname, obj", _public_names(), ids=lambda v: str(v)[:40])
def test_every_public_name_is_in_the_api_reference(qualname, obj):
    assert qualname in _documented_names(), f"docs/api documents no {qualname}"


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install 'bgnorm[docs]'): "
                        "the API reference build is not checked")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
         str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    pages = {p.stem for p in DOCS.glob("*.rst")}
    assert pages <= {p.stem for p in out.glob("*.html")}
    layers = (out / "layers.html").read_text()
    for name in ("BatchGroupNorm2d", "FrozenBatchGroupNorm", "SyncBatchGroupNorm"):
        assert f'id="bgnorm.{name}"' in layers

"""The docstring examples of the public API run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

MODULES = ["bgnorm.functional", "bgnorm.layers", "bgnorm.registry", "bgnorm.convert",
           "bgnorm.policy"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0

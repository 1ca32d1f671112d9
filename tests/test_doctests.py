"""The examples in the public docstrings run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "controllers.threshold",
    "controllers.pid",
    "controllers.schedules",
    "controllers.registry",
    "controllers.predictive",
    "adaptive_dp.accountants.rdp",
    "adaptive_dp.accountants.filter",
    "adaptive_dp.accountants.odometer",
    "adaptive_dp.leakage.mine",
    "adaptive_dp.leakage.likelihood_ratio",
    "adaptive_dp.leakage.tokens",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0

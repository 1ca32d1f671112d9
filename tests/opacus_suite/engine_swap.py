"""Pytest plugin (the conftest of opacus' shipped tests): run them with ``AdaptivePrivacyEngine``.

Loaded with ``-p engine_swap`` by ``tests/test_opacus_suite.py``. The environment variable
``ADAPTIVE_DP_OPACUS_ENGINE`` chooses the engine:

- ``opacus`` (the reference): nothing is replaced;
- ``adaptive``: ``opacus.PrivacyEngine`` and ``opacus.privacy_engine.PrivacyEngine`` are rebound to
  ``adaptive_dp.AdaptivePrivacyEngine`` when pytest is configured (before any test module is imported), and
  after collection every collected test module whose global ``PrivacyEngine`` is still opacus' class gets
  it rebound too. Opacus' classes and methods themselves are left untouched: only names are swapped, the
  way a user switching engines would edit an import.

``--hypothesis-profile=opacus-suite-fast`` caps hypothesis at a few examples per test (the default run's subset).
Each test records the engine it ran with as the junit-xml property ``engine``
(``module.qualname`` of its module's ``PrivacyEngine``), so the caller can check that the swap happened.
"""

from __future__ import annotations

import os

import opacus
import opacus.privacy_engine
import pytest
import torch
from hypothesis import settings

ENGINE_VARIABLE = "ADAPTIVE_DP_OPACUS_ENGINE"
ENGINES = ("opacus", "adaptive")
_OPACUS_ENGINE = opacus.privacy_engine.PrivacyEngine
_ENGINE_KEY = pytest.StashKey[type]()

# `--hypothesis-profile=opacus-suite-fast`: a few examples per property test instead of hypothesis' 100. The
# first example hypothesis tries is the simplest one (all booleans False, smallest choices), e.g. σ = 0 and no
# clipping in `test_compare_to_vanilla`.
FAST_PROFILE = "opacus-suite-fast"
settings.register_profile(FAST_PROFILE, max_examples=6)


def _chosen_engine() -> type:
    choice = os.environ.get(ENGINE_VARIABLE, "opacus")
    if choice not in ENGINES:
        raise pytest.UsageError(f"{ENGINE_VARIABLE}={choice!r}: set it to one of {ENGINES}")
    if choice == "opacus":
        return _OPACUS_ENGINE
    from adaptive_dp import AdaptivePrivacyEngine

    return AdaptivePrivacyEngine


def engine_name(engine: type) -> str:
    """``module.qualname`` of an engine class, the value of the ``engine`` junit-xml property."""
    return f"{engine.__module__}.{engine.__qualname__}"


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models: one intra-op thread per process, as in the repository's own conftest (shared machines, `-n 2`).
    torch.set_num_threads(1)
    engine = _chosen_engine()
    config.stash[_ENGINE_KEY] = engine
    opacus.PrivacyEngine = engine
    opacus.privacy_engine.PrivacyEngine = engine


def pytest_unconfigure(config: pytest.Config) -> None:
    opacus.PrivacyEngine = _OPACUS_ENGINE
    opacus.privacy_engine.PrivacyEngine = _OPACUS_ENGINE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    engine = config.stash[_ENGINE_KEY]
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and getattr(module, "PrivacyEngine", None) is _OPACUS_ENGINE:
            module.PrivacyEngine = engine


def pytest_report_header(config: pytest.Config) -> str:
    return f"opacus suite engine: {engine_name(config.stash[_ENGINE_KEY])}"


@pytest.fixture(autouse=True)
def _record_engine(request: pytest.FixtureRequest, record_property) -> None:
    """Record the ``PrivacyEngine`` the test's module sees (``none`` when it imports none)."""
    engine = getattr(request.module, "PrivacyEngine", None)
    record_property("engine", engine_name(engine) if engine is not None else "none")

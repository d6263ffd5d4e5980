"""Shared pytest configuration: a deterministic hypothesis profile for the whole test suite.

Tests choose their own ``max_examples`` with ``@settings``; this profile makes every run draw the same
examples (``derandomize``) and turns off per-example deadlines (first calls into torch kernels are slow).
"""

from hypothesis import settings

settings.register_profile("fxquant", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fxquant")


# --- slow tests: `@pytest.mark.slow` runs only with --runslow or FXQUANT_SLOW=1 (the marker is declared in
# pyproject.toml) ---------------------------------------------------------------------------------------
import os  # noqa: E402

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (same as FXQUANT_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("FXQUANT_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FXQUANT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_engine():
    """convert_fx selects the backend's quantized engine globally: put the previous one back after each test."""
    import torch

    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


# --- hypothesis: longer / fresh runs (tests/test_properties.py, fxquant.testing) -------------------------------
# CI runs the derandomized "fxquant" profile above with each test's own max_examples. For a search beyond it:
#   FXQUANT_HYPOTHESIS_EXAMPLES=500  -> tests that use fxquant.testing.examples(n) run 500 examples each;
#   HYPOTHESIS_PROFILE=fxquant-random -> new random examples on every run (failures are kept in .hypothesis/ and
#                                        replayed first next time), still without deadlines.
settings.register_profile("fxquant-random", parent=settings.get_profile("fxquant"), derandomize=False)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

"""Shared pytest configuration: a deterministic hypothesis profile for the whole test suite.

Tests choose their own ``max_examples`` with ``@settings``; this profile makes every run draw the same
examples (``derandomize``) and turns off per-example deadlines (first calls into torch kernels are slow).
"""

from hypothesis import settings

settings.register_profile("fxquant", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fxquant")

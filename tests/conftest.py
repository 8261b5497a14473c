"""pytest configuration of the reft_ext tests.

Helpers (devices, seeded inputs, the tolerance rule) live in tests/_util.py; this file only
sets up the environment every test runs in.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Hypothesis: reproducible by default (same examples every run, no example database written
# into the checkout). REFT_HYPOTHESIS_PROFILE=explore draws new examples on each run.
settings.register_profile("default", derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None,
                          print_blob=True)
settings.load_profile(os.environ.get("REFT_HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    # When a hypothesis test fails, its pytest plugin imports libcst (to suggest a patch),
    # which imports the deprecated mypy_extensions.TypedDict: under filterwarnings=error that
    # DeprecationWarning turns the test failure into an INTERNALERROR that hides the report.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the thread count or grad mode; put them back afterwards."""
    threads = torch.get_num_threads()
    grad_enabled = torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad_enabled)

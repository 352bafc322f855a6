"""Shared test setup: CPU-only workers, one warm pool per device set for the whole session."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # helpers such as comfy_support


@pytest.fixture(scope="session", autouse=True)
def _stop_worker_pools():
    yield
    from stadi_core.runtime.pool import shutdown_pools

    shutdown_pools()

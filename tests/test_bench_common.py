"""What the benches share (stadi_core/bench/common.py)."""

import os

import pytest

from stadi_core.bench.common import env_settings
from stadi_core.replan import REPLAN_ENV, ReplanPolicy


def test_env_settings_hold_for_the_runs_inside_and_give_the_callers_values_back(monkeypatch):
    monkeypatch.delenv(REPLAN_ENV, raising=False)
    with env_settings({REPLAN_ENV: "off"}):
        assert ReplanPolicy.from_env() is None  # what a run started here reads
    assert REPLAN_ENV not in os.environ
    monkeypatch.setenv(REPLAN_ENV, "on")
    with pytest.raises(RuntimeError), env_settings({REPLAN_ENV: "off"}):
        raise RuntimeError("a failed run")
    assert os.environ[REPLAN_ENV] == "on"

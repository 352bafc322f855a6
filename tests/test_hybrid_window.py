"""Hybridiff switching window: synthetic discrepancy curves whose answer is known by construction."""

import math

import pytest
import torch

from stadi_core.sampling.hybrid_window import PRESETS, HybridWindow, WindowConfig, relative_mae


def run(config, steps, maes):
    """Feed a whole curve; also check in_window is False at every step before opening."""
    w = HybridWindow(config, steps)
    for i, m in enumerate(maes):
        if w.opened_at is None:
            assert not any(w.in_window(s) for s in range(-1, steps + 2))
            assert w.window_steps() == []
            assert w.reason == ""
        w.observe_value(i, m)
    return w


def first_slope_trigger(maes, lookback, epsilon):
    """Independent statement of the criterion: first step i whose last L values slope in [0, eps)."""
    for i in range(lookback, len(maes)):
        slope = (maes[i - lookback + 1] - maes[i]) / lookback
        if 0 <= slope < epsilon:
            return i
    return None


def steep_then_flat(steps):
    """Falls 0.01 per step up to step 20, then only 0.0001 per step (hand-made, margins on both sides)."""
    return [1.0 - 0.01 * min(t, 20) - 0.0001 * max(t - 20, 0) for t in range(steps)]


# ---------------------------------------------------------------- (1) steep decay, then flat
def test_hand_made_curve_opens_at_hard_coded_step():
    # L=12, eps=4e-4. Slope at step i spans values i-11..i:
    #   i=30: (0.01*1 + 0.0001*10)/12 = 9.2e-4 -> no;  i=31: 0.0001*11/12 = 9.2e-5 -> fires.
    # The window opens the step after the deciding one: 32, and lasts k=5 steps.
    # (mae[-L-1] instead of mae[-L] would fire at 32 -> 33; opening on the deciding step -> 31.)
    cfg = WindowConfig(lookback=12, epsilon=4e-4, length=5, cap=45)
    w = run(cfg, 50, steep_then_flat(50))
    assert w.reason == "slope"
    assert w.summary()["decided_at"] == 31
    assert w.opened_at == 32
    assert w.window_steps() == [32, 33, 34, 35, 36]
    assert w.summary()["slope"] == pytest.approx(0.0001 * 11 / 12)
    assert [s for s in range(50) if w.in_window(s)] == [32, 33, 34, 35, 36]


@pytest.mark.parametrize(
    "cfg, curve",
    [
        (WindowConfig(12, 4e-4, 5, 45), [0.3 * math.exp(-t / 2.0) + 0.05 for t in range(50)]),
        (PRESETS["sd3"], [0.3 * math.exp(-t / 3.0) + 0.05 for t in range(50)]),
        (WindowConfig(4, 1e-3, 3, 40), [0.5 / (1 + t) + 0.02 for t in range(50)]),
        (WindowConfig(12, 4e-4, 5, 45), steep_then_flat(50)),
    ],
)
def test_decaying_curves_open_where_the_formula_first_holds(cfg, curve):
    i = first_slope_trigger(curve, cfg.lookback, cfg.epsilon)
    assert i is not None and i + 1 < cfg.cap  # the case really is the slope path, not the cap
    w = run(cfg, len(curve), curve)
    assert (w.opened_at, w.reason) == (i + 1, "slope")
    assert w.window_steps() == list(range(i + 1, i + 1 + cfg.length))


def test_window_is_not_open_until_the_deciding_step_is_observed():
    cfg = WindowConfig(12, 4e-4, 5, 45)
    curve = steep_then_flat(50)
    w = HybridWindow(cfg, 50)
    for i in range(31):
        w.observe_value(i, curve[i])
    assert w.opened_at is None
    w.observe_value(31, curve[31])
    assert w.opened_at == 32


def test_window_stays_as_decided():
    cfg = WindowConfig(3, 1e-3, 2, 40)
    w = HybridWindow(cfg, 30)
    curve = [1.0, 0.25, 0.25, 0.25] + [0.25 - 0.1 * k for k in range(1, 3)] + [0.05] * 24
    for i, m in enumerate(curve):
        w.observe_value(i, m)
    # step 3: (mae[1] - mae[3]) / 3 = 0 -> opens at 4; the later steep fall and later flat stretch change nothing
    assert (w.opened_at, w.reason, w.window_steps()) == (4, "slope", [4, 5])
    assert len(w.maes) == 30


# ---------------------------------------------------------------- (2) slope stays large -> cap
def test_steep_curve_opens_at_cap():
    cfg = PRESETS["sdxl"]  # cap 15
    curve = [1.0 - 0.01 * t for t in range(50)]  # slope 0.01*11/12 >> 4e-4 everywhere
    w = HybridWindow(cfg, 50)
    for i in range(14):
        w.observe_value(i, curve[i])
    assert w.opened_at is None
    w.observe_value(14, curve[14])  # the cap is decided after cap logged steps (index cap-1)...
    assert (w.opened_at, w.reason) == (15, "cap")  # ...and opens at step index cap
    for i in range(15, 50):
        w.observe_value(i, curve[i])
    assert w.window_steps() == [15, 16, 17, 18, 19]
    s = w.summary()
    assert s["decided_at"] == 14 and s["slope"] == pytest.approx((curve[3] - curve[14]) / 12)


def test_slope_wins_over_cap_on_the_same_step():
    cfg = WindowConfig(lookback=3, epsilon=1e-3, length=2, cap=4)
    w = run(cfg, 10, [1.0, 0.2, 0.2, 0.2, 0.2])  # step 3: (mae[1]-mae[3])/3 = 0, also step == cap-1
    assert (w.opened_at, w.reason) == (4, "slope")


def test_cap_before_any_slope_has_no_slope_value():
    cfg = WindowConfig(lookback=12, epsilon=4e-4, length=5, cap=5)
    w = run(cfg, 20, [0.1] * 5)  # flat, but fewer than L+1 values when the cap hits
    assert (w.opened_at, w.reason, w.summary()["slope"]) == (5, "cap", None)


# ---------------------------------------------------------------- (3) rising curve
def test_rising_curve_never_opens_by_slope():
    # |slope| = 1e-4*11/12 < eps: only the sign keeps it from firing
    curve = [0.1 + 1e-4 * t for t in range(30)]
    w = run(WindowConfig(12, 4e-4, 5, 100), 30, curve)
    assert w.opened_at is None and w.reason == "" and w.window_steps() == []
    assert not any(w.in_window(s) for s in range(30))
    w = run(WindowConfig(12, 4e-4, 5, 20), 30, curve)
    assert (w.opened_at, w.reason) == (20, "cap")


# ---------------------------------------------------------------- (4) end of the run
def test_window_is_clipped_to_the_run():
    cfg = WindowConfig(lookback=3, epsilon=1e-3, length=5, cap=40)
    w = run(cfg, 6, [0.3] * 6)  # flat: decided at step 3, opens at 4
    assert w.opened_at == 4
    assert w.window_steps() == [4, 5]
    assert [w.in_window(s) for s in range(8)] == [False] * 4 + [True, True, False, False]


def test_trigger_on_last_step_never_opens():
    cfg = WindowConfig(lookback=3, epsilon=1e-3, length=5, cap=40)
    w = run(cfg, 4, [1.0, 0.2, 0.2, 0.2])  # fires at step 3 == steps-1: nothing left to run
    assert w.opened_at is None and w.window_steps() == [] and w.reason == ""
    assert w.summary()["decided_at"] == 3


@pytest.mark.parametrize("steps, expected", [(16, [15]), (15, []), (10, [])])
def test_cap_opens_only_inside_the_run(steps, expected):
    curve = [1.0 - 0.01 * t for t in range(steps)]
    w = run(PRESETS["sdxl"], steps, curve)
    assert w.window_steps() == expected
    assert w.opened_at == (15 if expected else None)


# ---------------------------------------------------------------- (5) relative_mae
def test_relative_mae_by_hand():
    c = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    u = torch.tensor([[2.0, -1.0], [-1.0, 4.0]])
    # |c-u| = 1,1,4,4 -> 2.5 ; |u| = 2,1,1,4 -> 2.0
    assert relative_mae(c, u) == pytest.approx(1.25)
    assert relative_mae(u, c) == pytest.approx(2.5 / 1.5)  # uncond is the denominator
    assert relative_mae(c.half(), u.half()) == pytest.approx(1.25)
    assert relative_mae(u, u) == 0.0
    assert math.isfinite(relative_mae(c, torch.zeros_like(c)))


def test_relative_mae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        relative_mae(torch.ones(2, 3), torch.ones(3, 2))


def test_observe_tensors_matches_observe_value():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)) for _ in range(20)]
    cfg = WindowConfig(3, 1e-2, 2, 10)
    a, b = HybridWindow(cfg, 20), HybridWindow(cfg, 20)
    for i, (c, u) in enumerate(pairs):
        a.observe(i, c, u)
        b.observe_value(i, relative_mae(c, u))
    assert a.summary() == b.summary()
    assert a.maes[0] == pytest.approx(relative_mae(*pairs[0]))


# ---------------------------------------------------------------- (6) ordering errors
def test_out_of_order_and_repeated_steps_raise():
    w = HybridWindow(PRESETS["sdxl"], 10)
    with pytest.raises(ValueError, match="out of order"):
        w.observe_value(1, 0.5)  # step 0 first
    w.observe_value(0, 0.5)
    with pytest.raises(ValueError, match="twice"):
        w.observe_value(0, 0.5)
    with pytest.raises(ValueError, match="out of order"):
        w.observe_value(2, 0.5)
    with pytest.raises(ValueError, match="out of order"):
        w.observe(3, torch.ones(2), torch.ones(2))
    assert w.maes == [0.5]  # failed calls logged nothing
    for i in range(1, 10):
        w.observe_value(i, 0.5)
    with pytest.raises(ValueError, match="past the run"):
        w.observe_value(10, 0.5)


def test_bad_values_and_configs_raise():
    w = HybridWindow(PRESETS["sdxl"], 10)
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="finite"):
            w.observe_value(0, bad)
    for kwargs in ({"lookback": 0}, {"length": 0}, {"cap": 0}, {"epsilon": 0.0}, {"epsilon": float("nan")}):
        base = {"lookback": 12, "epsilon": 4e-4, "length": 5, "cap": 15, **kwargs}
        with pytest.raises(ValueError):
            WindowConfig(**base)
    with pytest.raises(ValueError):
        HybridWindow(PRESETS["sdxl"], 0)


# ---------------------------------------------------------------- presets, determinism
def test_presets_match_the_reference_scripts():
    assert PRESETS["sdxl"] == WindowConfig(12, 4e-4, 5, 15)
    assert PRESETS["sd3"] == WindowConfig(15, 5e-4, 5, 40)
    assert PRESETS["sd15"] == PRESETS["sdxl"]


def test_deterministic():
    curve = [0.3 * math.exp(-t / 3.0) + 0.05 for t in range(50)]
    assert run(PRESETS["sd3"], 50, curve).summary() == run(PRESETS["sd3"], 50, curve).summary()

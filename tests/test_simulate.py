"""The cluster simulator: cost model arithmetic, curve fitting, CLI, and one prediction of a real run."""

import json
import math
from pathlib import Path

import pytest

from helpers import cpu_cluster
from stadi_core.cli import main
from stadi_core.errors import PlanError
from stadi_core.planner import Plan, make_plan
from stadi_core.report import RunReport
from stadi_core.simulate import (
    DISPLACED_EXCHANGES, Curve, LinkModel, compare, compare_strategies, exchange_seconds, fit_costs_from_report,
    fit_curve_from_report, load_curves, plan_from_curves, simulate, strategies_table,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "stadi_core" / "bench" / "example_curves.json"
NO_LINK = LinkModel(latency_s=0.0)  # no exchange cost at all


def linear(speed):
    """Seconds per evaluation = rows / speed (a curve through the origin)."""
    return [(8, 8 / speed), (64, 64 / speed)]


# -- curves -------------------------------------------------------------------------------
def test_curve_interpolates_extrapolates_and_never_goes_negative():
    c = Curve([(32, 1.0), (64, 1.5), (128, 2.5)])
    assert c(32) == 1.0 and c(48) == pytest.approx(1.25) and c(96) == pytest.approx(2.0)
    assert c(256) == pytest.approx(4.5)  # beyond the last point: slope of the last two
    assert c(16) == pytest.approx(0.75)  # below the first: slope of the first two
    assert Curve([(32, 0.1), (64, 1.0)])(8) == 0.0  # would extrapolate below zero
    assert Curve([(32, 2.0)])(48) == pytest.approx(3.0)  # one point: proportional to rows
    assert Curve([(32, 1.0), (32, 3.0)]).points == ((32.0, 2.0),)  # same rows averaged
    assert c.speed(64) == pytest.approx(64 / 1.5)
    with pytest.raises(PlanError):
        Curve([])
    with pytest.raises(PlanError):
        Curve([(0, 1.0)])


# -- the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "displaced"])
def test_single_device_is_steps_times_the_curve(mode):
    curve = [(16, 0.2), (64, 0.5)]
    plan = make_plan(48, [1.0], devices=["gpu"], steps=9, warmup=2, mode=mode)
    res = simulate(plan, {"gpu": curve}, bytes_per_row=1e9)  # one rank: nothing to exchange
    assert res.latency_s == pytest.approx(9 * Curve(curve)(48))
    r = res.ranks[0]
    assert (r.evals, r.comm_s) == (9, 0.0) and r.idle_s == pytest.approx(0.0, abs=1e-12)
    assert r.busy_s == pytest.approx(res.latency_s)
    assert res.exchange_s == 0.0 and len(res.steps[0]) == 9


@pytest.mark.parametrize("speeds", [(2.0, 2.0, 2.0), (3.0, 1.0), (4.0, 2.5, 1.0)])
def test_linear_curves_reproduce_the_planner_step_time(speeds):
    plan = make_plan(96, speeds, devices=[f"d{i}" for i in range(len(speeds))], steps=12, warmup=2,
                     mode="displaced", strides="off")
    curves = {f"d{i}": linear(s) for i, s in enumerate(speeds)}
    for exchange in DISPLACED_EXCHANGES:
        res = simulate(plan, curves, link=NO_LINK, displaced_exchange=exchange)
        assert res.latency_s == pytest.approx(plan.predicted_step_time() * plan.steps)


def test_strides_on_a_half_speed_device_halve_the_latency():
    curves = {"fast": linear(1.0), "slow": linear(0.5)}
    kw = dict(devices=["fast", "slow"], steps=40, warmup=1, mode="displaced")
    equal = make_plan(64, [1.0, 1.0], strides="off", **kw)
    strided = make_plan(64, [1.0, 0.5], strides=(1, 2), **kw)
    assert strided.rows == (32, 32) and strided.sync_period == 2
    t_equal = simulate(equal, curves, link=NO_LINK).latency_s
    t_strided = simulate(strided, curves, link=NO_LINK).latency_s
    assert t_equal == pytest.approx(40 * 64)  # the slow rank: 32 rows at 0.5 rows/s, every step
    # warmup step 64 s, then 19 periods of 2 steps at 64 s, then one last sync step of 64 s
    assert t_strided == pytest.approx(21 * 64)
    assert t_strided / t_equal == pytest.approx(0.5, abs=0.03)
    # If the exchange must be in at the end of the sync step itself, the fast rank waits for
    # the slow one's long evaluation at every sync step and strides buy much less.
    t_overlapped = simulate(strided, curves, link=NO_LINK, displaced_exchange="overlapped").latency_s
    print(f"strides (1,2) vs equal bands: deferred exchange {t_strided / t_equal:.3f}, "
          f"exchange waited in the same call {t_overlapped / t_equal:.3f}")
    assert t_overlapped / t_equal == pytest.approx(0.775, abs=0.03)


def test_exchange_cost_adds_the_modelled_amount_in_exact_mode():
    curves = {"a": linear(2.0), "b": linear(1.0), "c": linear(1.0)}
    plan = make_plan(64, [2.0, 1.0, 1.0], devices=["a", "b", "c"], steps=10, mode="exact")
    assert plan.rows == (32, 16, 16)
    link = LinkModel(bandwidth_gbps=10.0, latency_s=50e-6)
    kw = dict(bytes_per_row=1e6, bytes_fixed=1e5, messages=3)
    x = exchange_seconds(plan.rows, link, **kw)
    # every rank receives the two others' payloads, padded to the largest band (32 rows)
    assert x == pytest.approx(2 * (3 * 50e-6 + (1e5 + 32e6) / 10e9))
    base = simulate(plan, curves, link=NO_LINK).latency_s
    res = simulate(plan, curves, link=link, **kw)
    assert res.latency_s - base == pytest.approx(10 * x)
    assert all(r.comm_s == pytest.approx(10 * x) for r in res.ranks)
    # a table of bytes by rows gives the same as the formula it tabulates
    table = [(16, 1e5 + 16e6), (32, 1e5 + 32e6)]
    assert simulate(plan, curves, link=link, bytes_table=table, messages=3).latency_s == pytest.approx(res.latency_s)
    # a slow cross-machine link between rank 0 and the others dominates
    bw = [[0, 1.0, 1.0], [1.0, 0, 10.0], [1.0, 10.0, 0]]
    slow = LinkModel(latency_s=0.0, bandwidth_matrix=bw)
    assert exchange_seconds(plan.rows, slow, bytes_per_row=1e6) == pytest.approx(2 * 32e6 / 1e9)


def test_displaced_exchange_is_hidden_while_compute_is_longer():
    curves = {"a": [(32, 1.0)], "b": [(32, 1.0)]}
    plan = make_plan(64, [1.0, 1.0], devices=["a", "b"], steps=10, warmup=2, mode="displaced", strides="off")
    base = simulate(plan, curves, link=NO_LINK).latency_s
    assert base == pytest.approx(10.0)
    hidden = simulate(plan, curves, exchange_s=0.4)
    assert hidden.latency_s == pytest.approx(base + 2 * 0.4)  # only the 2 synchronous warmup steps pay
    exposed = simulate(plan, curves, exchange_s=1.5)
    assert exposed.latency_s == pytest.approx(2 * (1.0 + 1.5) + 8 * 1.5)  # compute hides 1.0 of each 1.5
    assert all(r.comm_s == pytest.approx(2 * 1.5 + 8 * 0.5) for r in exposed.ranks)
    # after_forward: the exchange runs after the forward, nothing is hidden
    after = simulate(plan, curves, exchange_s=0.4, displaced_exchange="after_forward")
    assert after.latency_s == pytest.approx(base + 10 * 0.4)


def test_non_compute_steps_cost_only_the_step_overhead():
    curves = {"a": linear(2.0), "b": linear(1.0)}
    plan = make_plan(48, [2.0, 1.0], devices=["a", "b"], steps=8, warmup=2, strides=(1, 2))
    res = simulate(plan, curves, link=NO_LINK, step_overhead_s=0.01)
    skips = [s for s in res.steps[1] if not s.computed]
    assert len(skips) == 3 and all(s.wall_s == pytest.approx(0.01) and s.busy_s == 0 for s in skips)
    assert [s.phase for s in res.steps[1]] == ["fresh", "fresh"] + ["refresh", "skip"] * 3


def test_emulated_slowdown_pad_runs_after_the_exchange():
    curves = {"a": [(32, 1.5)], "b": [(32, 2.0)]}  # b: 1.0 s real compute + 1.0 s sleep pad
    plan = make_plan(64, [1.0, 1.0], devices=["a", "b"], steps=4, warmup=4, mode="displaced", strides="off")
    plain = simulate(plan, curves, exchange_s=0.5)
    assert plain.latency_s == pytest.approx(4 * (2.0 + 0.5))  # a real device 2.0 s slow: exchange after it
    emulated = simulate(plan, curves, exchange_s=0.5, emulated_slowdowns=[1.0, 2.0])
    # the collectives wait for b's real second only; b sleeps after the exchange, a waits at the next step
    assert emulated.latency_s == pytest.approx(4 * (1.5 + 0.5 + 1.0))
    assert emulated.ranks[0].idle_s == pytest.approx(3 * 1.0)
    assert any("emulated" in n for n in emulated.notes)


# -- fitting and comparing ----------------------------------------------------------------
def _synthetic_report(rows=(40, 24), per_eval=(0.3, 0.6), steps=6):
    plan = make_plan(sum(rows), list(rows), devices=["cpu:0", "cpu:1"], steps=steps,
                     warmup=2, mode="displaced", strides="off")
    assert plan.rows == rows
    timings = []
    for sec in per_eval:
        rank = []
        for t in range(steps):
            busy = sec * (3.0 if t == 0 else 1.0)  # the first evaluation is slow (allocation)
            rank.append({"step": t, "computed": True, "phase": "fresh" if t < 2 else "refresh", "busy_s": busy,
                         "comm_s": 0.05, "wall_s": busy + 0.05 + 0.01})
        timings.append(rank)
    return plan, RunReport.from_results(plan, timings, wall_s=5.0)


def test_fit_curve_from_report_round_trips():
    plan, report = _synthetic_report()
    curves = fit_curve_from_report(report.to_dict())
    assert curves == {"cpu:0": [(40.0, pytest.approx(0.3))], "cpu:1": [(24.0, pytest.approx(0.6))]}
    costs = fit_costs_from_report(report.to_dict())
    assert costs["exchange_s"] == pytest.approx(0.05) and costs["step_overhead_s"] == pytest.approx(0.01)
    # several runs: one point per run and device
    _, other = _synthetic_report(rows=(32, 32), per_eval=(0.25, 0.8))
    both = fit_curve_from_report([report.to_dict(), other])
    assert [r for r, _ in both["cpu:0"]] == [32.0, 40.0]
    # a prediction written out in the RunReport layout is read back into the same curves
    true = {"cpu:0": [(16, 0.1), (64, 0.5)], "cpu:1": [(16, 0.3), (64, 1.1)]}
    sim = simulate(plan, true, exchange_s=0.02)
    back = fit_curve_from_report(json.loads(json.dumps(sim.to_dict())))
    for dev, rows in zip(plan.devices, plan.rows):
        assert back[dev] == [(float(rows), pytest.approx(Curve(true[dev])(rows)))]
    with pytest.raises(PlanError):
        fit_curve_from_report({"plan": {}})


def test_compare_reports_the_relative_error():
    plan, report = _synthetic_report()
    curves = fit_curve_from_report(report)
    sim = simulate(plan, curves, **fit_costs_from_report(report))
    cmp = compare(sim, report)
    assert cmp["measured_s"] == pytest.approx(report.denoise_s)
    assert cmp["rel_error"] == pytest.approx((sim.latency_s - report.denoise_s) / report.denoise_s)
    assert math.isfinite(cmp["rel_error_wall"]) and len(cmp["ranks"]) == 2
    assert "predicted denoising" in sim.table() and len(sim.timeline().splitlines()) == plan.steps + 1


# -- planning from curves, strategies, CLI ------------------------------------------------
def test_plan_from_curves_balances_measured_band_times():
    cs = load_curves(EXAMPLE)
    assert cs.illustrative and set(cs.curves) == {"cuda:0", "cuda:1"}
    plan = plan_from_curves(cs.curves, 256, steps=20, warmup=2, strides="off")
    t = [cs.curves[d](r) for d, r in zip(plan.devices, plan.rows)]
    equal = [cs.curves[d](128) for d in plan.devices]
    assert max(t) < max(equal) and plan.rows[0] > plan.rows[1]
    rows = compare_strategies(cs.curves, 256, steps=20, warmup=2, exchange_s=0.0)
    names = [n for n, _, _ in rows]
    assert names == ["single cuda:0", "equal bands", "elastic bands", "elastic + strides"]
    lat = {n: r.latency_s for n, _, r in rows}
    assert lat["elastic bands"] < lat["equal bands"] < lat["single cuda:0"]
    assert "vs equal" in strategies_table(rows)


def test_cli_simulate_prints_plan_prediction_and_comparison(capsys, tmp_path):
    out = tmp_path / "pred.json"
    rc = main(["simulate", "--curves", str(EXAMPLE), "--height", "256", "--steps", "20", "--warmup", "2",
               "--mode", "displaced", "--strides", "auto", "--bandwidth-gbps", "25", "--latency-us", "20",
               "--bytes-per-row", "1e7", "--equal", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("ILLUSTRATIVE", "plan: 256 latent rows", "predicted denoising", "equal bands", "elastic + strides"):
        assert needle in text
    assert json.loads(out.read_text())["predicted"] is True
    rc = main(["simulate", "--curves", str(EXAMPLE), "--height", "256", "--devices", "cuda:0,cuda:0,cuda:1",
               "--speeds", "1,1,1", "--mode", "exact"])
    text = capsys.readouterr().out
    assert rc == 0 and "cuda:0#1" in text and "mode exact" in text
    assert main(["simulate", "--curves", str(EXAMPLE), "--devices", "cuda:7"]) == 2


def test_curves_file_bare_mapping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cpu:0": [[32, 0.1]], "cpu:1": [[32, 0.2], [64, 0.35]]}))
    cs = load_curves(path)
    assert cs.curves["cpu:1"](48) == pytest.approx(0.275) and not cs.illustrative


# -- one real measured run ----------------------------------------------------------------
def test_prediction_of_a_real_run_from_a_fitted_run():
    """Fit curves on an equal-band run, predict the elastic-band run that follows, compare.

    Two CPU workers, cpu:1 emulated 2x slower (compute padded after the call). Shared CPU
    cores make timings noisy, so the bound is loose; the error is printed.
    """
    from stadi_core.api import generate
    from stadi_core.models.spec import ModelSpec
    from stadi_core.report import measured_capabilities

    kw = dict(height=64, width=32, batch=1, steps=10, cfg=2.0, seed=0, sampler="euler", mode="displaced",
              warmup=2, strides="off", stall_timeout_s=120)
    slow = [1.0, 2.0]
    generate(ModelSpec(), cpu_cluster(1.0, 1.0, slowdowns=slow), **dict(kw, steps=2))  # warm pool
    first = generate(ModelSpec(), cpu_cluster(1.0, 1.0, slowdowns=slow), **kw).report
    caps = measured_capabilities(first)
    second = generate(ModelSpec(), cpu_cluster(caps["cpu:0"], caps["cpu:1"], slowdowns=slow), **kw).report
    assert first.plan["bands"][0]["rows"] == 32 and second.plan["bands"][0]["rows"] > 32

    curves = fit_curve_from_report(first.to_dict())
    costs = fit_costs_from_report(first.to_dict())
    plan = Plan.from_dict(second.plan)
    # The engine starts a displaced sync step's all-gathers after the forward and completes them
    # at the next sync step: the simulator's default "deferred" model; the others are printed.
    errors = {}
    for exchange in DISPLACED_EXCHANGES:
        sim = simulate(plan, curves, displaced_exchange=exchange, emulated_slowdowns=second.slowdowns, **costs)
        errors[exchange] = compare(sim, second)["rel_error"]
    cmp = compare(simulate(plan, curves, displaced_exchange="deferred", emulated_slowdowns=second.slowdowns,
                           **costs), second)
    print(f"\nfitted on equal bands {first.plan['bands'][0]['rows']}/{first.plan['bands'][1]['rows']} "
          f"({first.denoise_s:.3f} s): curves {curves}, costs {costs}")
    print(f"predicted elastic bands {plan.rows}: {cmp['predicted_s']:.3f} s, measured {cmp['measured_s']:.3f} s, "
          f"relative error {cmp['rel_error']:+.1%} (whole call {cmp['rel_error_wall']:+.1%}); "
          f"by exchange model: " + ", ".join(f"{k} {v:+.1%}" for k, v in errors.items()))
    assert math.isfinite(cmp["rel_error"])
    # No bound on the error itself: it compares wall-clock times on a shared 2-core CI machine,
    # where the same run varies by 2x; the figure is printed, and benchmarks judge accuracy.
    assert cmp["predicted_s"] > 0 and cmp["measured_s"] > 0

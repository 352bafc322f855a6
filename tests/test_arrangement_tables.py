"""The predicted arrangement tables (stadi_core.bench.arrangements) on the shipped GPU-class curves:
pure arithmetic, no workers."""

import json
import math

import pytest

from stadi_core.bench import arrangements as arr
from stadi_core.planner import make_branch_plan

INTERLEAVED = (0, 2, 1, 3)  # m0.gpu0, m1.gpu0, m0.gpu1, m1.gpu1: list order alternates machines


@pytest.fixture(scope="module")
def tables():
    return arr.build_tables()


@pytest.fixture(scope="module")
def interleaved_tables():
    return arr.build_tables(clusters=[arr.cluster_c(INTERLEAVED)])


def test_tables_cover_every_cluster_model_and_mode_with_one_choice_each(tables):
    keys = {(t.cluster.key, t.workload.key, t.mode) for t in tables}
    assert keys == {(c, m, mode) for c in "abc" for m in ("sdxl-1024", "flux-dev-1024")
                    for mode in ("displaced", "exact")}
    for t in tables:
        chosen = [r for r in t.rows if r.chosen]
        assert len(chosen) == 1 and chosen[0].candidate, (t.cluster.key, t.workload.key, t.mode)
        assert chosen[0].plan is t.choice.plan
        # every candidate choose_plan priced is in the table, at the price it gave
        priced = {c.name: c.predicted_s for c in t.choice.candidates}
        assert {r.name: r.step_s for r in t.rows if r.candidate} == pytest.approx(priced, rel=1e-9)
        assert t.chosen.step_s == pytest.approx(min(priced.values()), rel=1e-6)


def test_shipped_curves_are_labelled_illustrative_with_sources(tables):
    data = json.loads(arr.CURVES_PATH.read_text())
    assert data["illustrative"] is True and "ILLUSTRATIVE" in data["description"]
    assert all("http" in s for k, s in data["sources"].items() if k not in ("brief", "assumptions"))
    for key, m in data["models"].items():
        assert m["illustrative"] is True and "ILLUSTRATIVE" in m["description"], key
        assert set(m["fit"]) == set(m["devices"]) and all(f["how"] for f in m["fit"].values()), key
    assert all(t.workload.illustrative for t in tables)


def test_curves_are_the_affine_fits_they_claim():
    for w in arr.load_workloads():
        for gpu, fit in w.fits.items():
            for rows, seconds in w.curves[gpu].points:
                assert seconds == pytest.approx(fit["fixed_s"] + fit["per_row_s"] * rows, rel=1e-5), (w.key, gpu, rows)
            assert fit["fixed_s"] > 0  # launch-bound: a band never costs less than the fixed part


def test_exchange_bytes_are_the_derived_ones():
    data = json.loads(arr.CURVES_PATH.read_text())["models"]
    for key, derived in (("sdxl-1024", arr.sdxl_exchange(128)), ("flux-dev-1024", arr.flux_exchange(128))):
        ex = data[key]["exchange"]
        for field in ("bytes_per_row", "bytes_fixed", "messages", "output_bytes_per_row"):
            assert ex[field] == pytest.approx(derived[field]), (key, field)
    sdxl = arr.sdxl_exchange(128)
    assert (sdxl["attentions"], sdxl["convs"], sdxl["groupnorms"]) == (70, 40, 46)
    # example_curves.json (SDXL at 2048^2, latent width 256) quotes ~13.1 MB per latent row
    assert arr.sdxl_exchange(256)["bytes_per_row"] == pytest.approx(13.1e6, rel=0.01)
    assert arr.flux_exchange(128)["bytes_per_row"] == 57 * 32 * 3072 * 2 * 2


def test_flux_never_splits_branches_but_sdxl_offers_it(tables, interleaved_tables):
    for t in tables + interleaved_tables:
        names = {r.name for r in t.rows}
        if t.workload.key.startswith("flux"):
            assert not t.workload.branches
            assert not any(r.plan.splits_branches for r in t.rows), (t.cluster.key, t.mode)
            assert not any(n.startswith("cfg_split") for n in names)
        else:
            assert t.workload.branches
            assert {"cfg_split", "cfg_split+bands"} <= names  # the check above is not vacuous
            assert any(r.plan.splits_branches for r in t.rows)


def test_cluster_c_keeps_each_branch_group_inside_one_machine(tables, interleaved_tables):
    for_c = [t for t in tables + interleaved_tables if t.cluster.key == "c"]
    assert len(for_c) == 8
    for t in for_c:
        ch = t.chosen
        if ch.plan.splits_branches:
            assert arr.groups_inside_machines(t.cluster, ch.plan), (t.mode, arr.layout(ch.plan))
            for g in ch.plan.groups:
                assert len({t.cluster.machine_of(ch.plan.bands[r].device) for r in g.ranks}) == 1
        if t.workload.key == "sdxl-1024":
            assert ch.name == "cfg_split+bands", (t.mode, ch.name)
            assert len(ch.plan.groups) == 2 and all(len(g.ranks) == 2 for g in ch.plan.groups)


def test_the_machine_check_catches_a_group_across_machines():
    # list order m0, m1, m0, m1: cutting the branch-major strip in that order puts each branch on two machines
    c = arr.cluster_c(INTERLEAVED)
    naive = make_branch_plan(128, [1.0] * 4, strategy="cfg_split+bands", devices=c.names, align=4, steps=30)
    assert not arr.groups_inside_machines(c, naive)


def test_speedups_are_positive_and_the_single_device_row_is_one(tables):
    for t in tables:
        singles = [r for r in t.rows if r.is_single]
        assert len(singles) == 1 and singles[0].plan.world_size == 1
        assert singles[0].speedup_step == 1.0 and singles[0].speedup_run == 1.0
        for r in t.rows:
            for x in (r.step_s, r.run_s, r.speedup_step, r.speedup_run):
                assert x > 0 and math.isfinite(x), (t.cluster.key, t.workload.key, t.mode, r.name)


def test_main_prints_the_tables(capsys):
    assert arr.main(["--mode", "displaced"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "ILLUSTRATIVE" in out and "mode exact" not in out
    assert out.count("auto -> ") == 6
    assert "10 GbE 1.25 GB/s, 50 us/message" in out


def test_two_machines_over_1gbe_keep_bands_inside_a_machine():
    """docs/simulate_two_machines.txt: (c) 10 GbE and (d) 1 GbE between two machines of 2 GPUs each."""
    tables = arr.build_tables(clusters=[arr.cluster_c(), arr.cluster_d()], modes=("displaced",))
    for t in tables:
        plan = t.chosen.plan
        assert t.chosen.name != "bands", (t.cluster.key, t.workload.key)  # never 4 bands across the link
        if plan.groups:
            assert arr.groups_inside_machines(t.cluster, plan)
        assert t.chosen.speedup_run > 1.5
    slow = {t.workload.key: t for t in tables if t.cluster.key == "d"}
    fast = {t.workload.key: t for t in tables if t.cluster.key == "c"}
    assert slow["sdxl-1024"].chosen.speedup_run < fast["sdxl-1024"].chosen.speedup_run

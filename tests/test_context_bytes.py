"""Bytes of each displaced context option (context_bytes.py) and how the planner prices them (issue #12)."""

import random

import pytest
import torch

from stadi_core import context_bytes as cb
from stadi_core.arrange import choose_plan
from stadi_core.bench import arrangements as arr
from stadi_core.bench import context_predict
from stadi_core.cost_model import ExchangeCost, LinkModel, predict_step
from stadi_core.errors import PlanError
from stadi_core.parallel.codecs import make_codec
from stadi_core.parallel.geometry import extent
from stadi_core.parallel.options import ContextOptions
from stadi_core.planner import make_plan
from stadi_core.simulate import simulate

FULL = ContextOptions()
PARTIAL = lambda p, **kw: ContextOptions(context="partial", portion=p, **kw)  # noqa: E731
FP8 = ContextOptions(exchange="fp8")
DELTA4 = ContextOptions(exchange="delta", delta_bits=4)
SDXL = cb.SDXL_UNET
RTX4090_SDXL = lambda rows: 0.012 + 0.0009609375 * rows  # noqa: E731  (gpu_class_curves.json, illustrative)
PCIE = LinkModel(12.0, 15e-6)
TEN_GBE = LinkModel(1.25, 50e-6)


def kv(inv, rows, opts, width=128, batch=2, dtype_bytes=2, rank=0):
    return cb.call_bytes(inv, rows, width, batch, dtype_bytes, opts)[rank]["kv"]


def test_inventories_count_the_layers_of_each_architecture():
    assert (SDXL.count("kv"), SDXL.count("halo"), SDXL.count("moments")) == (70, 40, 46)
    assert (cb.SD15_UNET.count("kv"), cb.SD15_UNET.count("halo"), cb.SD15_UNET.count("moments")) == (16, 52, 61)
    assert (cb.FLUX_DIT.count("kv"), cb.FLUX_DIT.count("halo"), cb.FLUX_DIT.count("moments")) == (57, 0, 0)
    assert SDXL.messages == 156 and cb.FLUX_DIT.messages == 57


def test_the_moved_exchange_figures_are_unchanged():
    assert arr.sdxl_exchange(128) == cb.legacy_exchange(SDXL, 128, 2, 2)
    ex = ExchangeCost.for_context(SDXL, 128, 2, 2)
    assert (ex.bytes_per_row, ex.bytes_fixed, ex.messages, ex.output_bytes_per_row) == (6553600, 16411648, 156, 2048)
    flux = arr.flux_exchange(128)
    assert flux["bytes_per_row"] == 57 * 32 * 3072 * 2 * 2 and flux["bytes_fixed"] == 0


def test_sdxl_1024_full_kv_is_about_420_mb_per_rank_per_step():
    got = kv(SDXL, [64, 64], FULL)
    assert got == pytest.approx(420e6, rel=0.10)
    assert got == 64 * 6553600  # the flat per-row figure x the band: 419.4 MB


def test_partial_whole_neighbour_on_two_ranks_is_full():
    for inv, batch in ((SDXL, 2), (cb.FLUX_DIT, 1), (cb.SD15_UNET, 2)):
        assert kv(inv, [64, 64], PARTIAL(1.0), batch=batch) == kv(inv, [64, 64], FULL, batch=batch) > 0


def test_partial_0_3_sends_about_0_3_of_full_on_two_ranks():
    for inv, batch in ((SDXL, 2), (cb.FLUX_DIT, 1)):
        ratio = kv(inv, [64, 64], PARTIAL(0.3), batch=batch) / kv(inv, [64, 64], FULL, batch=batch)
        assert 0.3 <= ratio <= 0.3 + 1 / 16, ratio  # whole rows: at most one more row of the coarsest band
    # whole rows at the layer: 0.3 x 20 rows is 6 rows, not 7 (float rounding)
    one = cb.Inventory("one", (cb.Layer("kv", 8, 1, 1),), 4)
    assert kv(one, [20, 20], PARTIAL(0.3), width=4, batch=1, dtype_bytes=1) == 6 * 4 * 16


def test_codecs_shrink_against_fp32_raw_by_their_bits_plus_scales():
    raw = kv(SDXL, [64, 64], FULL, dtype_bytes=4)
    scales = sum(layer.count * 4 * 2 * layer.channels for layer in SDXL.layers if layer.kind == "kv")
    fp8, delta = kv(SDXL, [64, 64], FP8, dtype_bytes=4), kv(SDXL, [64, 64], DELTA4, dtype_bytes=4)
    assert fp8 == raw / 4 + scales and fp8 / raw == pytest.approx(0.25, rel=0.01)
    assert delta == raw / 8 + scales and delta / raw == pytest.approx(0.125, rel=0.01)
    assert kv(SDXL, [64, 64], ContextOptions(exchange="delta-lossless"), dtype_bytes=4) == raw
    # partial + delta multiplies: 0.3125 of the rows (5 of 16, 10 of 32) at 1/8 the bytes, plus the scales
    both = kv(SDXL, [64, 64], PARTIAL(0.3, exchange="delta"), dtype_bytes=4)
    assert both == raw * 0.3125 / 8 + scales


def test_payloads_are_the_sizes_the_engine_codecs_produce():
    """One layer's K/V ([B, N, 2C], channels last) and displaced halo piece ([B, C, 1, W]: the edge row
    the one neighbour reads) as codecs.nbytes counts them."""
    b, c, w, rows = 2, 640, 64, 32  # level-1 SDXL attention of a 64-row band at W = 128
    for opts in (FP8, DELTA4, ContextOptions(exchange="delta", delta_bits=2)):
        codec = make_codec(opts.exchange, opts.delta_bits)
        layer = cb.Inventory("kv", (cb.Layer("kv", c, 2, 1),), 4)
        assert kv(layer, [64, 64], opts) == codec.nbytes((b, rows * w, 2 * c), torch.float16, -1)
        halo = cb.Inventory("halo", (cb.Layer("halo", c, 2, 1),), 4)
        got = cb.call_bytes(halo, [64, 64], 128, b, 2, opts)[0]["halo"]
        assert got == codec.nbytes((b, c, 1, w), torch.float16, 1)


def test_byte_convention_padded_gathers_unpadded_neighbour_sends():
    one = cb.Inventory("one", (cb.Layer("kv", 1, 1, 1), cb.Layer("halo", 1, 1, 1), cb.Layer("moments", 1, 1, 1)), 1)
    rows = [8, 4, 4]  # per row: 1 column x 2C = 2 values x 1 byte
    full = cb.call_bytes(one, rows, 1, 1, 1, FULL)
    assert [r["kv"] for r in full] == [8 * 2 * 2] * 3  # padded to the largest band, x (P - 1)
    # displaced halos: the top row to the band above, the bottom row to the band below, point to point
    assert [r["halo"] for r in full] == [1, 2, 1] and [r["moments"] for r in full] == [2 * 4 * 2] * 3
    part = cb.call_bytes(one, rows, 1, 1, 1, PARTIAL(0.5))
    assert [r["kv"] for r in part] == [4 * 2, 2 * 2 * 2, 2 * 2]  # once per neighbour, the sender's own rows
    assert [r["halo"] for r in part] == [1, 2, 1]  # halos and moments stay full
    t = cb.traffic(one, rows, 1, 1, 1, PARTIAL(0.5))
    assert t.bytes["kv"][0][2] == 0 and t.bytes["kv"][1][0] == t.bytes["kv"][1][2] == 4
    sync = cb.call_bytes(one, rows, 1, 1, 1, PARTIAL(0.5, exchange="fp8"), synchronous=True)
    # warmup and exact calls: everything raw, full and all-gathered ([top; bottom] rows to every peer)
    assert [r["kv"] for r in sync] == [r["kv"] for r in full] and [r["halo"] for r in sync] == [2 * 2] * 3


def test_moments_are_never_compressed_and_halos_never_partial():
    base = cb.call_bytes(SDXL, [64, 64], 128, 2, 2, FULL)[0]
    for opts in (FP8, DELTA4, PARTIAL(0.3), PARTIAL(0.3, exchange="delta")):
        got = cb.call_bytes(SDXL, [64, 64], 128, 2, 2, opts)[0]
        assert got["moments"] == base["moments"] == 46 * 2 * 32 * 2 * 4
        assert (got["halo"] == base["halo"]) == (not opts.compressed)


def test_layer_rows_match_the_engine_geometry():
    rng = random.Random(3)
    for _ in range(200):
        rows = [rng.randint(1, 40) for _ in range(rng.randint(1, 5))]
        for rank in range(len(rows)):
            for d in (1, 2, 4, 8):
                assert cb.layer_rows(rows, rank, d) == extent(rows, rank, d)


# -- pricing -----------------------------------------------------------------------------------------
def sdxl_choice(link, **extra):
    cost = ExchangeCost.for_context(SDXL, 128, 2, 2)
    speed = 64 / RTX4090_SDXL(64)
    return choose_plan(128, [speed, speed], devices=["a", "b"], strategy="bands",
                       compute_s=lambda d, r: RTX4090_SDXL(r), link=link, exchange=cost, align=4, steps=50, warmup=4,
                       **extra)


def test_auto_context_keeps_full_on_a_fast_link_and_goes_light_on_10gbe():
    fast = sdxl_choice(PCIE, context="auto")
    assert fast.plan.context == FULL and "context auto: full" in fast.plan.notes[-2]
    slow = sdxl_choice(TEN_GBE, context="auto")
    assert slow.plan.context.partial or slow.plan.context.compressed, slow.plan.notes
    cand = slow.candidates[0]
    times = dict(cand.contexts)
    assert cand.predicted_s == min(times.values()) < 0.5 * times["full"]
    assert "partial 0.3 + delta4" in slow.plan.notes[-2] and "full " in slow.plan.notes[-2]  # others' times listed


def test_auto_prefers_the_more_faithful_option_on_near_ties():
    """On PCIe every option hides behind the 73 ms band compute: all tie, so full is kept."""
    cand = sdxl_choice(PCIE, context="auto").candidates[0]
    assert len(set(round(t, 9) for _, t in cand.contexts)) == 1 and cand.plan.context.is_default


def test_default_and_exact_mode_keep_full_context():
    assert sdxl_choice(TEN_GBE).plan.context == FULL  # no context argument: unchanged behaviour
    assert not any("context auto" in n for n in sdxl_choice(TEN_GBE).plan.notes)
    assert sdxl_choice(TEN_GBE, context="auto", mode="exact").plan.context == FULL
    with pytest.raises(PlanError, match="only applies to displaced"):
        sdxl_choice(TEN_GBE, context="partial:0.3", mode="exact")
    explicit = sdxl_choice(TEN_GBE, context="fp8")
    assert explicit.plan.context == FP8


def test_overlap_off_never_beats_overlap_on():
    cost = ExchangeCost.for_context(SDXL, 128, 2, 2)
    for link in (PCIE, TEN_GBE, LinkModel(100.0, 2e-6)):
        for strides in ("off", (1, 2)):
            plan = make_plan(128, [1.0, 0.6], devices=["a", "b"], align=4, steps=30, warmup=4, strides=strides)
            comp = lambda r, rows: RTX4090_SDXL(rows) * (1.0, 1.6)[r]  # noqa: E731
            for opts in (FULL, PARTIAL(0.3), DELTA4):
                on = predict_step(plan, comp, link=link, cost=ExchangeCost.for_context(SDXL, 128, 2, 2, opts))
                off_opts = ContextOptions(**dict(opts.to_dict(), overlap=False))
                off = predict_step(plan, comp, link=link, cost=ExchangeCost.for_context(SDXL, 128, 2, 2, off_opts))
                assert off.seconds >= on.seconds - 1e-12 and off.sync_s == on.sync_s
    # sync every step, exchange hidden by overlap: off pays compute + exchange exactly
    plan = make_plan(128, [1, 1], devices=["a", "b"], align=4, steps=30, warmup=4, strides="off")
    off = predict_step(plan, lambda r, rows: RTX4090_SDXL(rows), link=PCIE,
                       cost=ExchangeCost.for_context(SDXL, 128, 2, 2, ContextOptions(overlap=False)))
    assert off.steady_s == pytest.approx(RTX4090_SDXL(64) + max(off.displaced_exchange_s))
    assert off.steady_s == predict_step(plan, lambda r, rows: RTX4090_SDXL(rows), link=PCIE,
                                        cost=cost).steady_s + max(off.displaced_exchange_s)


def test_inventory_full_context_prices_like_the_flat_figures():
    """Synchronous calls cost the same from the inventory as from the flat bytes (which assume every
    payload all-gathered); displaced ones no more (their halos go to the neighbours only)."""
    flat = ExchangeCost(**{k: v for k, v in vars(ExchangeCost.for_context(SDXL, 128, 2, 2)).items()
                           if k in ("bytes_per_row", "bytes_fixed", "messages", "output_bytes_per_row")})
    inv = ExchangeCost.for_context(SDXL, 128, 2, 2)
    for mode in ("exact", "displaced"):
        plan = make_plan(128, [1, 1, 1, 1], devices=list("abcd"), align=4, steps=30, warmup=4, mode=mode)
        a = predict_step(plan, lambda r, rows: RTX4090_SDXL(rows), link=TEN_GBE, cost=flat)
        b = predict_step(plan, lambda r, rows: RTX4090_SDXL(rows), link=TEN_GBE, cost=inv)
        assert b.exchange_s == pytest.approx(a.exchange_s)  # a synchronous call's exchange
        if mode == "exact":
            assert b.seconds == pytest.approx(a.seconds)
        else:
            assert b.seconds <= a.seconds


def test_simulate_prices_each_context_like_the_cost_model():
    curves = {"a": [(64, RTX4090_SDXL(64)), (128, RTX4090_SDXL(128))]}
    curves["b"] = curves["a"]
    plan = make_plan(128, [1, 1], devices=["a", "b"], align=4, steps=30, warmup=4, strides="off")
    cost = ExchangeCost.for_context(SDXL, 128, 2, 2)
    runs = {}
    for name, opts in (("full", FULL), ("light", PARTIAL(0.3, exchange="delta")),
                       ("no overlap", ContextOptions(overlap=False))):
        sim = simulate(plan, curves, link=TEN_GBE, exchange=cost, context=opts)
        step = predict_step(plan, lambda r, rows: RTX4090_SDXL(rows), link=TEN_GBE,
                            cost=ExchangeCost.for_context(SDXL, 128, 2, 2, opts))
        # equal bands, sync every step: the replay costs what the per-step price says (the run's
        # end waits for the last exchange, as each step waited for the one before)
        assert sim.latency_s == pytest.approx(30 * step.seconds, rel=1e-9), name
        assert sim.displaced_exchange_s == pytest.approx(max(step.displaced_exchange_s))
        runs[name] = sim.latency_s
    assert runs["light"] < runs["full"] < runs["no overlap"]
    with pytest.raises(PlanError, match="not both"):
        simulate(plan, curves, exchange=cost, bytes_per_row=1.0)


def test_context_predict_prints_both_tables(tmp_path, capsys):
    out = tmp_path / "ctx.txt"
    assert context_predict.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "(a) MB per rank" in text and "(b) PREDICTED" in text and "auto @28 steps" in text
    assert "419.4" in text  # SDXL 2-rank full K/V


def test_an_exchange_with_its_own_context_is_the_default_context():
    cost = ExchangeCost.for_context(SDXL, 128, 2, 2, "partial:0.3")
    speed = 64 / RTX4090_SDXL(64)
    kw = dict(devices=["a", "b"], strategy="bands", compute_s=lambda d, r: RTX4090_SDXL(r), link=TEN_GBE,
              exchange=cost, align=4, steps=50, warmup=4)
    assert choose_plan(128, [speed] * 2, **kw).plan.context == PARTIAL(0.3)
    assert choose_plan(128, [speed] * 2, context="auto", **kw).plan.context == PARTIAL(0.3, exchange="delta")

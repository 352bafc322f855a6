"""Compiled band calls (parallel/compiled.py, parallel/graphs.py) in the per-call session path.

CPU only: torch.compile through dynamo; the 2-rank session runs the workers with the
``aot_eager`` backend (dynamo's tracing, guards and side-effect replay, AOT functionalization
of the in-place context writes) because inductor's C++ codegen of even the tiny models takes
minutes on a shared 2-core machine. ``STADI_TEST_INDUCTOR=1`` runs the same check with inductor.
"""

from __future__ import annotations

import contextlib
import os
import types

import numpy as np
import pytest
import torch

from stadi_core.models.spec import ModelSpec, build_model, make_conditioning
from stadi_core.parallel.compiled import CompiledBand, resolve
from stadi_core.parallel.context import BandContext, Phase
from stadi_core.parallel.graphs import GraphedBand
from stadi_core.planner import make_plan
from stadi_core.runtime.messages import BandCall, SessionStart
from stadi_core.runtime.registry import get_pool
from stadi_pack.nodes.deployment import compile_notes

SD3 = ModelSpec(family="diffusers-sd3", config="tiny-sd3")  # no 3x3 conv: its layers trace in one graph
PHASES = ["fresh", "refresh", "stale", "refresh", "stale", "refresh"]  # warmup 1, then displaced stride-2 steps


class LoopbackContext(BandContext):
    """Rank 0 of two, in one process: every 'other band' is a copy of ours (communication stand-in)."""

    def _all_gather(self, key, local, dim, sizes, async_op, kind="kv"):
        wire = self._wire(key, local, dim, max(sizes))
        send = wire.load(local.detach(), dim)
        for r in wire.recv:
            r.copy_(send)
        done = types.SimpleNamespace(wait=lambda timeout=None: True)
        return wire.recv, (done if async_op else None)

    def _send_pieces(self, sends, recvs, kind):
        for (_, buf), (_, tensor) in zip(recvs, sends):  # the neighbour sends what we send
            buf.copy_(tensor.view(-1)[: buf.numel()].view(buf.shape) if buf.shape != tensor.shape else tensor)
        return None


def _toy_forward(ctx, break_graph=False):
    """A band network in miniature: a halo, whole-image tokens and a plain exchange per call."""
    w = torch.linspace(-1.0, 1.0, 16).reshape(1, 1, 4, 4)

    def forward(inp):
        x = inp["x"]
        top, bottom = ctx.halo(1, x, 1)
        parts = [t for t in (top, x, bottom) if t is not None]
        h = torch.cat(parts, dim=2).mean(dim=2, keepdim=True) * x
        tokens = ctx.whole_tokens(2, h.flatten(2).transpose(1, 2))
        if break_graph:
            torch._dynamo.graph_break()
        mix = tokens.mean(dim=1, keepdim=True).transpose(1, 2).unsqueeze(-1)
        stacked = torch.cat(ctx.exchange(3, (x * w).sum(dim=(2, 3)), 0, [x.shape[0]] * 2), dim=0)
        return h + mix + stacked.mean()

    return forward


def _sig(pending):
    return [(p.key, tuple(p.sizes), p.dim, tuple(p.local.shape)) for p in pending]


def _run_calls(band, ctx, forward, x, phases):
    """(outputs, pending signature and data after each call); band None: eager."""
    outs, pend = [], []
    for i, phase in enumerate(phases):
        ctx.begin_call(phase, 0, x.shape[-1])
        xi = x + 0.1 * i
        out = band({"x": xi}, phase) if band is not None and band.capturable(ctx, phase) else forward({"x": xi})
        pend.append([(s, p.local.clone()) for s, p in zip(_sig(ctx._pending), ctx._pending)])
        ctx.end_call()
        outs.append(out.clone())
    return outs, pend


def _assert_same(a_outs, a_pend, b_outs, b_pend, rel=5e-6):
    for a, b in zip(a_outs, b_outs):
        assert (a - b).abs().max() <= rel * b.abs().max()
    for pa, pb in zip(a_pend, b_pend):
        assert [s for s, _ in pa] == [s for s, _ in pb]
        assert all(torch.allclose(ta, tb, rtol=1e-5, atol=1e-6) for (_, ta), (_, tb) in zip(pa, pb))


PH = [Phase.FRESH, Phase.REFRESH, Phase.STALE, Phase.REFRESH, Phase.REFRESH, Phase.STALE]


def test_compiled_band_replays_the_refresh_recording():
    """dynamo runs ctx._pending.append and the context's dict writes after the graph: the exchanges a
    compiled REFRESH call leaves to issue equal the eager call's, key for key and value for value."""
    x = torch.randn(2, 1, 4, 4)
    ref_ctx = LoopbackContext([4, 4], 0)
    ref = _run_calls(None, ref_ctx, _toy_forward(ref_ctx), x, PH)
    ctx = LoopbackContext([4, 4], 0)
    forward = _toy_forward(ctx)
    band = CompiledBand(forward, ctx, backend="aot_eager")
    got = _run_calls(band, ctx, forward, x, PH)
    assert band.disabled is None and band.compiled_calls >= 3  # the first displaced call learns, then compiled
    assert [len(p) for p in got[1]] == [0, 3, 0, 3, 3, 0]  # STALE issues nothing, REFRESH all three
    _assert_same(*got, *ref)


def test_a_graph_break_is_a_refusal_the_call_runs_eagerly_and_says_so():
    x = torch.randn(2, 1, 4, 4)
    ref_ctx = LoopbackContext([4, 4], 0)
    ref = _run_calls(None, ref_ctx, _toy_forward(ref_ctx), x, PH)
    ctx = LoopbackContext([4, 4], 0)
    forward = _toy_forward(ctx, break_graph=True)
    band = CompiledBand(forward, ctx, backend="eager")
    got = _run_calls(band, ctx, forward, x, PH)
    assert band.disabled and "torch.compile failed, running eagerly" in band.disabled
    assert band.take_note() == band.disabled and band.take_note() is None  # reported once
    _assert_same(*got, *ref)


def test_a_failed_capture_leaves_exactly_the_eager_exchanges(monkeypatch):
    """CUDA graph capture that fails after warmup iterations and after recording part of the call:
    the rank drops the half-recorded exchanges and runs the call eagerly, so it issues exactly what
    the other (replaying) ranks issue; later calls stay eager."""
    fake_cuda = types.SimpleNamespace(
        Stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None), current_stream=lambda: types.SimpleNamespace(
            wait_stream=lambda s: None), stream=lambda s: contextlib.nullcontext(), synchronize=lambda: None,
        CUDAGraph=lambda: None, graph=lambda g: contextlib.nullcontext(), is_available=lambda: False)
    monkeypatch.setattr(torch, "cuda", fake_cuda)
    x = torch.randn(2, 1, 4, 4)
    ref_ctx = LoopbackContext([4, 4], 0)
    ref = _run_calls(None, ref_ctx, _toy_forward(ref_ctx), x, PH)

    ctx = LoopbackContext([4, 4], 0)
    inner = _toy_forward(ctx)
    seen = {"calls": 0}

    def forward(inp):  # the capture (third displaced forward: after 2 warmup iterations) fails midway
        seen["calls"] += 1
        if ctx.phase is Phase.REFRESH and seen["calls"] == 4:
            ctx.halo(1, inp["x"], 1)  # records the first exchange, then the capture dies
            raise RuntimeError("operation not permitted when stream is capturing")
        return inner(inp)

    band = GraphedBand(forward, ctx)
    got = _run_calls(band, ctx, forward, x, PH)
    assert band.disabled and "capture failed" in band.disabled and band.take_note()
    assert [len(p) for p in got[1]] == [0, 3, 0, 3, 3, 0]
    assert ctx.slot == 0 and not ctx._pending
    _assert_same(*got, *ref)


def test_compile_option_resolution():
    assert resolve("auto", "cpu") == ("off", None) and resolve("auto", "cuda") == ("graphs", None)
    assert resolve(None, "cuda") == ("off", None) and resolve("off", "cuda") == ("off", None)
    mode, note = resolve("graphs", "cpu")
    assert mode == "off" and "refused" in note
    assert resolve("torch.compile", "cpu")[0] == "torch.compile"  # gcc is on the test machine
    assert resolve("fast please", "cpu")[0] == "off"


# -- the session path over two worker processes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_calls():
    model = build_model(SD3, torch.device("cpu"))
    cond = {k: v.numpy() for k, v in make_conditioning(SD3, model, 1, seed=0)["cond"].items()}
    plan = make_plan(8, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=len(PHASES), warmup=1, mode="displaced",
                     strides="off", align=2)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 16, 8, 8)).astype(np.float32) for _ in PHASES]
    return plan, cond, xs


def _session_run(pool, plan, cond, xs, compile: str):
    session = pool.open_session(lambda job_id: SessionStart(job_id, SD3.to_dict(), plan.to_dict(), compile=compile))
    outs = []
    try:
        for step, (phase, x) in enumerate(zip(PHASES, xs)):
            def call(b, step=step, phase=phase, x=x):
                xb = np.ascontiguousarray(x[:, :, b.row_start:b.row_end])
                return lambda job_id, call_id: BandCall(job_id, call_id, step, phase, xb,
                                                        np.array([900.0 - 100 * step], np.float32), cond,
                                                        signature=step, cond_key="c")
            got = session.call_all({b.rank: call(b) for b in plan.bands}, stall_timeout_s=600)
            outs.append(np.concatenate([got[b.rank].out for b in plan.bands], axis=2))
    finally:
        session.close()
    return outs, session


@pytest.fixture(scope="module")
def eager_outputs(sd3_calls):
    plan, cond, xs = sd3_calls
    return _session_run(_compile_pool("aot_eager"), plan, cond, xs, "off")[0]


def _compile_pool(backend: str):
    return get_pool(["cpu:0", "cpu:1"], "gloo", worker_env=[{"STADI_COMPILE_BACKEND": backend}] * 2)


def _assert_session_equal(compiled, eager, rel=5e-6):
    for step, (c, e) in enumerate(zip(compiled, eager)):
        diff = np.abs(c - e).max()
        assert diff <= rel * np.abs(e).max(), (step, PHASES[step], diff)


@pytest.mark.slow
def test_torch_compiled_session_equals_eager_on_two_ranks(sd3_calls, eager_outputs):
    plan, cond, xs = sd3_calls
    pool, eager = _compile_pool("aot_eager"), eager_outputs
    compiled, session = _session_run(pool, plan, cond, xs, "torch.compile")
    assert all(m.info["compile"] == "torch.compile" for m in session.ready.values())
    assert session.notes == {}  # nothing refused or failed
    assert compile_notes(session) == ["band network compiled (torch.compile) on ranks [0, 1]: displaced and "
                                      "measured calls (exact and warmup calls run eagerly)"]
    _assert_session_equal(compiled, eager)
    again, _ = _session_run(pool, plan, cond, xs, "torch.compile")  # the next prompt reuses the compiled code
    _assert_session_equal(again, eager)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STADI_TEST_INDUCTOR"), reason="inductor's CPU codegen takes minutes; "
                                                                      "set STADI_TEST_INDUCTOR=1")
def test_inductor_compiled_session_equals_eager_on_two_ranks(sd3_calls, eager_outputs):
    plan, cond, xs = sd3_calls
    pool, eager = _compile_pool("inductor"), eager_outputs
    compiled, session = _session_run(pool, plan, cond, xs, "torch.compile")
    assert session.notes == {}
    _assert_session_equal(compiled, eager)  # measured in one process: 3.3e-7 x max|ref|


@pytest.mark.slow
def test_refused_and_failed_compiles_run_eagerly_with_a_report_note(sd3_calls, eager_outputs):
    plan, cond, xs = sd3_calls
    pool, eager = _compile_pool("no_such_backend"), eager_outputs  # torch.compile itself fails in the workers
    refused, session = _session_run(pool, plan, cond, xs, "graphs")  # CUDA graphs on CPU: refused up front
    assert all(m.info["compile"] == "off" for m in session.ready.values())
    notes = compile_notes(session)
    assert len(notes) == 1 and notes[0].startswith("ranks [0, 1]: compile 'graphs' refused on cpu")
    _assert_session_equal(refused, eager, rel=0.0)
    failed, session = _session_run(pool, plan, cond, xs, "torch.compile")
    notes = compile_notes(session)
    assert set(session.notes) == {0, 1} and len(notes) == 1, notes
    assert notes[0].startswith("ranks [0, 1]: torch.compile failed, running eagerly") and "no_such_backend" in notes[0]
    _assert_session_equal(failed, eager, rel=0.0)

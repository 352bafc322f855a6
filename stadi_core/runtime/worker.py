"""The per-device worker process: connects to the coordinator, joins the group, runs jobs.

Started as ``python -m stadi_core.runtime.worker --connect HOST:PORT --rank R`` (the
coordinator does this for local devices; another machine can do it by hand), so it never
re-imports the coordinator's ``__main__`` (ComfyUI's main.py) the way multiprocessing's
spawn would. The auth key comes from the ``STADI_AUTHKEY`` environment variable.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

from ..errors import StadiError
from . import generate_job
from .lifeline import Channel as _Channel
from .lifeline import kill_if_armed, stall_if_armed
from .messages import (
    BandCall,
    BandOutput,
    Cancelled,
    CancelRequest,
    DecodeJob,
    GenerateJob,
    Heartbeat,
    Hello,
    MeasureJob,
    Paused,
    PauseRequest,
    Ready,
    SessionClosed,
    SessionEnd,
    SessionReady,
    SessionStart,
    Shutdown,
    WorkerFailure,
    WorkerInit,
)

CONNECT_TIMEOUT_S = 60.0


def input_dtype(model):
    """The network's input dtype (models.spec.input_dtype; imported late, like torch)."""
    from ..models.spec import input_dtype as of_model

    return of_model(model)


class JobCancelled(Exception):
    def __init__(self, step: int):
        super().__init__(f"cancelled at step {step}")
        self.step = step


class JobPaused(Exception):
    """Every rank stopped before ``step`` on request; the Checkpoint of that step holds the loop."""

    def __init__(self, step: int):
        super().__init__(f"paused at step {step}")
        self.step = step


def _connect(address: tuple[str, int], authkey: bytes):
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_core.runtime.worker")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    parent = os.environ.get("STADI_PARENT_PID")
    if parent:
        from .lifeline import tie_to_parent

        tie_to_parent(int(parent))
    authkey = bytes.fromhex(os.environ.get("STADI_AUTHKEY", ""))
    conn = _connect((host, int(port)), authkey)
    conn.send(Hello(args.rank, os.getpid()))
    if not conn.poll(CONNECT_TIMEOUT_S):
        print(f"stadi worker {args.rank}: no init from the coordinator within {CONNECT_TIMEOUT_S:.0f} s",
              file=sys.stderr)
        return 2
    init: WorkerInit = conn.recv()
    kind, _, index = init.device.partition(":")
    if kind == "cuda" and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = index.split(".")[0] or "0"
    for path in init.extra_sys_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    channel = _Channel(conn)
    try:
        worker = _Worker(init, channel)
    except BaseException as exc:  # report start-up failures instead of dying silently
        channel.send(WorkerFailure(None, init.rank, f"worker {init.rank} ({init.device}) failed to start: {exc}",
                                   traceback.format_exc()))
        return 1
    worker.serve()
    return 0


class _Worker:
    def __init__(self, init: WorkerInit, channel: _Channel):
        import torch
        import torch.distributed as dist

        self.init = init
        self.channel = channel
        self.torch = torch
        torch.set_num_threads(max(1, init.threads))
        self.device = torch.device("cuda:0" if init.device.startswith("cuda") else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.group = None
        self.transport = None
        self.transport_name = init.transport
        if init.world_size > 1:
            store = dist.TCPStore(init.store_host, init.store_port, is_master=False,
                                  timeout=timedelta(seconds=init.timeout_s))
            self.store = dist.PrefixStore(init.store_prefix, store)
            dist.init_process_group(
                init.backend,
                store=self.store,
                rank=init.rank,
                world_size=init.world_size,
                timeout=timedelta(seconds=init.timeout_s),
            )
            self.group = dist.group.WORLD
            if init.transport == "cuda-ipc":
                from ..parallel.ipc_transport import CudaIpcTransport

                self.transport = CudaIpcTransport(dist.PrefixStore("ipc", self.store), self.group, init.rank,
                                                  init.world_size, init.timeout_s)
                failure = self.transport.self_test()
                if failure is not None:  # correct but slow beats fast and wrong
                    self.transport = None
                    self.transport_name = f"gloo through the host (CUDA IPC unusable: {failure})"
        self.models: dict[str, tuple] = {}  # spec key -> (model, ctx, spec, checksum)
        self.loads = 0  # models built so far: a warm pool answers the next prompt without a load
        self._graphs: dict = {}  # id(model) -> GraphedBand (CUDA graphs per input shape)
        self.session_conds: dict = {}  # cond_key -> conditioning on the device, for the current session
        self.dist_groups: dict = {}  # sorted ranks -> torch.distributed group of a branch group (branch_groups.py)
        from .worker_controls import WorkerControls

        self.controls = WorkerControls(self.device)  # ControlNets run on the band (worker_controls.py)
        threading.Thread(target=self._heartbeat, name="stadi-heartbeat", daemon=True).start()
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        channel.send(Ready(init.rank, os.getpid(), name))

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.init.heartbeat_s)
            try:
                ch = self.channel
                ch.send(Heartbeat(self.init.rank, ch.job_id, ch.progress, ch.doing))
            except (OSError, EOFError, BrokenPipeError):
                os._exit(4)  # the coordinator is gone

    def serve(self) -> None:
        while True:
            try:
                job = self.channel.recv()
            except (EOFError, OSError):
                return  # coordinator closed the connection
            if isinstance(job, Shutdown):
                break
            if isinstance(job, (CancelRequest, PauseRequest)):
                self.channel.new_job(None)  # arrived after its job ended
                continue
            if isinstance(job, SessionEnd):  # the session already ended here (cancelled or failed)
                self.channel.send(SessionClosed(job.job_id, self.init.rank))
                continue
            self.channel.new_job(job.job_id)
            try:
                if isinstance(job, GenerateJob):
                    self.channel.send(generate_job.generate(self, job))
                elif isinstance(job, MeasureJob):
                    self.channel.send(generate_job.measure(self, job))
                elif isinstance(job, SessionStart):
                    self._session(job)
                elif isinstance(job, DecodeJob):  # Patch Stitch: decode a band with the VAE (runtime/decode.py)
                    from .decode import decode

                    self.channel.send(decode(job, self.init.rank, self.device))
                else:
                    raise TypeError(f"unknown job {type(job).__name__}")
            except JobCancelled as exc:
                self.channel.send(Cancelled(job.job_id, self.init.rank, exc.step))
            except JobPaused as exc:
                self.channel.send(Paused(job.job_id, self.init.rank, exc.step))
            except StadiError as exc:  # a deliberate error says what to change: no traceback
                self.channel.send(WorkerFailure(job.job_id, self.init.rank, str(exc), ""))
            except BaseException as exc:
                self.channel.send(WorkerFailure(job.job_id, self.init.rank,
                                                f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            finally:
                self.channel.job_id = None
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()

    # -- model cache ---------------------------------------------------------------------
    def model_for(self, spec_dict: dict, rows, ragged_align: int = 0, context=None):
        from ..models.spec import ModelSpec, build_model, weights_checksum
        from ..parallel import BandContext, make_patch_parallel
        from ..parallel.router import ContextRouter

        spec = ModelSpec.from_dict(spec_dict)
        key = spec.key()
        if key not in self.models:
            self.models.clear()  # one model per worker: release the previous one first
            self._graphs.clear()
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            model = build_model(spec, self.device)
            self.loads += 1
            if self.device.type == "cuda" and spec.dtype == "float32":
                # TF32 rounds fp32 convs/matmuls to ~1e-3 and differently for different band
                # shapes; an fp32 model asks for fp32 results (exact mode is the oracle).
                self.torch.backends.cudnn.allow_tf32 = False
                self.torch.backends.cuda.matmul.allow_tf32 = False
            checksum = weights_checksum(model)
            ctx = ContextRouter(BandContext(rows, self.init.rank, self.group, timeout_s=self.init.timeout_s,
                                            transport=self.transport))
            model._stadi_layer_ids = make_patch_parallel(model, ctx, spec.adapter.patch_attention)["ids"]
            self.models[key] = (model, ctx, spec, checksum)
        model, ctx, spec, checksum = self.models[key]
        ctx.deactivate()
        ctx.reset(rows, ragged_align, context)
        return model, ctx, spec, checksum

    def band_network(self, model, ctx, spec, cond, slowdown, graphs: bool = False, compiled: str = "off",
                     prepare=None):
        """The band's network call: exchange-aware forward plus the emulated slowdown pad (``slowdown``:
        a factor, or a SlowdownPad whose factor depends on the step).

        With ``graphs`` on a CUDA device (or ``compiled`` = 'graphs'), calls without communication
        inside are replayed from per-shape CUDA graphs (see parallel/graphs.py); with ``compiled`` =
        'torch.compile' they run through torch.compile (parallel/compiled.py). Exact-mode calls
        stay eager. The compiled callable is kept per model in ``self._graphs`` (dropped with the
        model) and re-specialised when the context's buffers are re-created. ``call.band`` is it
        (or None); its ``take_note()`` says once when compiling failed and calls went eager.
        ``prepare`` (eager calls): ``(x, t, cond) -> cond`` inside the call, e.g. the band's ControlNets
        (worker_controls.py), so their layers exchange within the UNet's call.
        """
        torch = self.torch
        dtype = input_dtype(model)
        forward = spec.adapter.forward
        graphed = None
        mode = "graphs" if graphs else (compiled or "off")
        if mode == "graphs" and self.device.type != "cuda":
            mode = "off"
        if mode != "off":
            from ..parallel.compiled import make_band

            key = id(model) if mode == "graphs" else ("torch.compile", id(model))  # generate_job reads id(model)
            graphed = self._graphs.get(key)
            if graphed is None or graphed.ctx is not ctx:
                graphed = make_band(mode, lambda inp: forward(model, inp["x"], inp["t"],
                                                              {k[2:]: v for k, v in inp.items() if k.startswith("c:")}),
                                    ctx, model)
                self._graphs = {k: v for k, v in self._graphs.items() if v.ctx is ctx}
                self._graphs[key] = graphed

        def call(x_in, t, phase, slot: int = 0):
            start = time.perf_counter()  # before begin_call: its wait for the last exchange is in comm_wait_s
            eager = graphed is None or not graphed.capturable(ctx, phase)
            ctx.begin_call(phase, slot, x_in.shape[-1], overlap=eager)  # replays keep the forward free of exchanges
            if isinstance(t, torch.Tensor):
                ts = t.to(self.device, torch.float32)
            else:
                ts = torch.full((x_in.shape[0],), t, device=self.device, dtype=torch.float32)
            x_dev = x_in.to(self.device, dtype)
            if not eager:
                inputs = {"x": x_dev, "t": ts, **{f"c:{k}": v for k, v in cond.items()}}
                out = graphed(inputs, phase)
            else:
                out = forward(model, x_dev, ts, cond if prepare is None else prepare(x_dev, ts, cond))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            busy = max(0.0, time.perf_counter() - start - ctx.stats.comm_wait_s)  # minus every exchange wait
            factor = float(slowdown)
            if factor > 1.0:
                # pad to budget: an emulated slower device finishes its compute later, so the pad
                # comes before the displaced exchange that the other ranks wait on
                time.sleep(busy * (factor - 1.0))
            stats = ctx.end_call()
            return out.float().cpu(), stats.comm_wait_s, dict(stats.sent)

        call.band = graphed
        return call

    def graphs_note(self, model) -> str | None:
        """Why replaying ``model``'s band calls from CUDA graphs was given up during the job, if it was."""
        graphed = self._graphs.get(id(model))
        return graphed.disabled if graphed is not None and graphed.disabled else None

    def agree(self, step: int, signature: int = 0) -> None:
        """Every rank stops at the same sync step or none does; diverged loops are caught here.

        One tiny all-reduce: [stop, signature, -signature] under MAX, stop being 2 for a cancel and 1
        for a pause. A cancel anywhere stops everyone (and outranks a pause); unequal signatures mean
        the ranks are not at the same call.
        """
        torch = self.torch
        flag = 2.0 if self.channel.poll_cancel() else (1.0 if self.channel.pause_requested else 0.0)
        if self.group is not None:
            import torch.distributed as dist

            t = torch.tensor([flag, float(signature), -float(signature)], dtype=torch.float64,
                             device=self.device if self.init.backend == "nccl" else "cpu")
            doing, self.channel.doing = self.channel.doing, f"waiting for the other ranks at step {step}"
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)  # a rank stuck here blames the others
            self.channel.doing = doing
            flag = float(t[0])
            if float(t[1]) != -float(t[2]):
                raise RuntimeError(f"ranks diverged at step {step}: they are not evaluating the same call "
                                   "(a sampler whose calls depend on the data cannot run in bands)")
        if flag > 1:
            raise JobCancelled(step)
        if flag > 0:
            raise JobPaused(step)

    # -- jobs ----------------------------------------------------------------------------
    def _session(self, job: SessionStart) -> None:
        """Per-call mode: the coordinator runs the sampler loop, we evaluate our band on request."""
        torch = self.torch
        from ..parallel import Phase
        from ..planner import Plan
        from ..sampling.band_loop import require_finite

        plan = Plan.from_dict(job.plan)
        if plan.world_size != self.init.world_size:
            raise ValueError(f"plan for {plan.world_size} ranks sent to a pool of {self.init.world_size}")
        loads = self.loads
        model, ctx, spec, checksum = self.model_for(job.model, plan.rows, plan.align if plan.ragged else 0, plan.context)
        self.session_conds = {}
        self.controls.new_session()
        groups = None
        if plan.groups:
            from .branch_groups import BranchGroups

            groups = BranchGroups(self, plan, ctx)
        from ..parallel.compiled import resolve as resolve_compile

        # branch arrangements' units stay eager (their calls switch the context between groups)
        compiled, compile_note = resolve_compile(getattr(job, "compile", "off"), self.device.type)
        compiled = compiled if groups is None else "off"
        ready = {"weights_checksum": checksum, "pid": os.getpid(), "loaded_weights": self.loads > loads,
                 "loads": self.loads, "compile": compiled}
        if compile_note:
            ready["compile_note"] = compile_note
        self.channel.send(SessionReady(job.job_id, self.init.rank, ready))
        dtype = input_dtype(model)
        pad = generate_job.SlowdownPad(job.slowdown, getattr(job, "slowdown_from", 0))
        while True:
            msg = self.channel.recv()
            if isinstance(msg, SessionEnd):
                self.channel.send(SessionClosed(job.job_id, self.init.rank))
                return
            if isinstance(msg, CancelRequest):
                continue
            if not isinstance(msg, BandCall):
                raise TypeError(f"unexpected {type(msg).__name__} in a session")
            self.channel.tick(f"evaluating a band (step {msg.step})")
            stall_if_armed(self.init.rank)  # test-only, inert unless STADI_TEST_STALL_FILE is set
            kill_if_armed(self.init.device, msg.step)  # test-only, inert unless STADI_TEST_KILL_FILE is set
            phase = Phase(msg.phase)
            if msg.cancel:
                self.channel.cancel_requested = True
            if phase is not Phase.STALE and not msg.measure_only:
                self.agree(msg.step, msg.signature)  # a cancel stops every rank here, together
            else:
                self.channel.poll_cancel()  # noted; the next sync step acts on it (ranks leave together)
            pad.step = msg.step  # an emulated slowdown may start at a later step (a device busy from then)
            if groups is not None and not msg.measure_only:
                out = groups.call(msg, phase, model, spec, pad, dtype)
                self.channel.tick("idle in a session")
                self.channel.send(out)
                continue
            cond = self.cond_on_device(msg.cond, dtype, msg.cond_key)
            control = getattr(msg, "control", None)
            if control:  # ControlNet residuals change every call: eager, beside the session's conditioning
                cond = self.with_control(cond, control)
            prepare = self.controls.prepare(msg, ctx, model)  # ControlNets that run here, on the band (step 2)
            net = self.band_network(model, ctx, spec, cond, pad, compiled="off" if control or prepare else compiled,
                                    prepare=prepare)
            ctx.local_only = msg.measure_only
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out, comm, sent = net(torch.from_numpy(msg.x), torch.from_numpy(msg.timesteps), phase, msg.slot)
                    busy = time.perf_counter() - t0 - comm
                require_finite(out, msg.step, phase)
            finally:
                ctx.local_only = False
            note = net.band.take_note() if net.band is not None else None  # compile failed: eager from now on
            self.channel.tick("idle in a session")
            self.channel.send(BandOutput(job.job_id, msg.call_id, self.init.rank, out.numpy(), busy, comm,
                                         note=note or "", sent=sent,
                                         control_rows_bytes=self.controls.residual_bytes if prepare else 0))

    def with_control(self, cond: dict, control: dict) -> dict:
        """``cond`` plus this call's ControlNet residuals for the band's UNet (models/control_bands.py)."""
        from ..models.control_bands import residuals_on

        return {**cond, "control": residuals_on(control, self.device)}

    def cond_on_device(self, cond: dict, dtype, key: str = "") -> dict:
        """A call's conditioning on the device; sent once per session and named by key afterwards."""
        if not cond and key:
            if key not in self.session_conds:
                raise RuntimeError(f"conditioning {key} was named before it was sent in this session")
            return self.session_conds[key]
        torch = self.torch
        out = {k: torch.from_numpy(v).to(self.device, dtype if v.dtype.kind == "f" else None) for k, v in cond.items()}
        if key:
            self.session_conds[key] = out
        return out


if __name__ == "__main__":
    sys.exit(main())

"""The GPU acceptance run of issue #17 (items 5, 6): everything a lent GPU must show, in one call.

    python -m stadi_core.bench.gpu acceptance --out DIR                  # one GPU, <= 8 minutes
    python -m stadi_core.bench.gpu acceptance --device cpu --out DIR     # < 60 s smoke test, 2 CPU workers

Stages, in order, each with its own deadline (no new measurement starts past it):
  bands   one network call on a full and a half band, eager vs CUDA graphs (bench_graphs' measurement)
  parity  two equal bands vs one worker, exact and displaced: finite, PSNR (exact = float precision)
  split   the 70%/30% split (bench_mps' runs): one worker on the whole device, equal bands, elastic,
          elastic + strides; CUDA MPS on a GPU, the engine's padded-compute slowdown on a CPU
  comfyui the same through ComfyUI (--comfyui PATH): not built here, printed as skipped with the reason
Every multi-rank output is checked for NaN/inf; the first non-finite one ends the run and the
``diagnose`` table (one ingredient changed per row) is run in its place. The tables go to stdout and,
as each is finished, to DIR/acceptance.txt, so a run killed at its limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..api import generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import ModelSpec
from ..report import psnr
from ..runtime.registry import shutdown_pools
from . import gpu


@dataclass(frozen=True)
class Settings:
    """Sizes, steps and per-stage budgets (seconds) of one device kind's acceptance run."""

    device: str
    model: str
    dtype: str
    band_sizes: tuple[int, ...]
    parity_size: int
    parity_steps: int
    split_size: int
    steps: int
    warmup: int
    graphs: bool
    budgets: dict = field(default_factory=dict)
    total_s: float = 480.0
    split: tuple[int, int] = (70, 30)
    stall_timeout_s: float = 120.0
    reserve_s: float = 30.0  # kept at the end for the last measurement's overrun and the summary


# The H100 run (docs/gpu_bench_h100_run1.txt): a 2048² SDXL call is ~0.22 s, a pool start tens of
# seconds; 12 steps at 2048² keep the split comparable with that run. Left over: diagnose + margin.
GPU = Settings("cuda", "sdxl", "float16", band_sizes=(1024, 2048), parity_size=1024, parity_steps=6,
               split_size=2048, steps=12, warmup=2, graphs=True,
               budgets={"bands": 110, "parity": 90, "split": 210}, total_s=480, stall_timeout_s=180)
# Every CPU worker gets one thread: two-thread workers stall for seconds per step on a busy 2-core host.
# Two pools in all (the pair, and the one-worker reference), each builds the model once; parity
# pays the second pool start (~20 s on a quiet 2-core host). Stage caps sum past the total: it is the cap.
CPU = Settings("cpu", "tiny-sdxl", "float32", band_sizes=(64, 128), parity_size=128, parity_steps=4,
               split_size=128, steps=6, warmup=2, graphs=False,
               budgets={"bands": 20, "parity": 30, "split": 20}, total_s=60, stall_timeout_s=30,
               reserve_s=5)

EXACT_PSNR_BOUND = {"float32": 90.0, "bfloat16": 30.0, "float16": 40.0}  # sanity bounds, dB
SPLIT_KEYS = ("full", "equal bands", "elastic bands", "elastic + strides")  # gpu.split_runs' rows, in order
TARGETS = (("elastic + strides <= 0.55x equal bands", "equal bands", 0.55),
           ("elastic + strides <= 1.10x one full device", "full", 1.10))


@dataclass
class Stage:
    """One stage's clock: no new measurement starts past its deadline, so a stage overruns by at
    most one measurement (a warm-up and a run, tens of seconds at 2048² on a GPU)."""

    name: str
    budget_s: float
    deadline: float
    start: float = field(default_factory=time.monotonic)
    result: str = "done"
    wall_s: float | None = None

    def fits(self) -> bool:
        return time.monotonic() < self.deadline

    def finish(self, result: str | None = None) -> None:
        self.wall_s = time.monotonic() - self.start
        if result:
            self.result = result


@dataclass
class Check:
    """One generation's row in the checks table: finite or not, PSNR against one worker."""

    stage: str
    name: str
    px: int
    ranks: int
    status: str  # finite | NON-FINITE | FAILED | skipped
    psnr: float | None = None
    latency_s: float | None = None
    note: str = ""


def is_non_finite(failure: str) -> bool:
    """Whether a failure line is the engine's NaN/inf refusal (not a timeout or a plan error)."""
    return "NaN/inf" in failure or "non-finite" in failure


class Acceptance:
    """Runs the stages in order and writes each table as soon as it is complete."""

    def __init__(self, settings: Settings, out_dir: Path, comfyui: str | None):
        self.s = settings
        self.spec = ModelSpec(config=settings.model, dtype=settings.dtype)
        self.out = out_dir / "acceptance.txt"
        self.comfyui = comfyui
        self.checks: list[Check] = []
        self.stages: list[Stage] = []
        self.split_rows: dict[str, object] = {}
        self.stopped: Check | None = None
        self.t0 = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out.write_text("")

    # -- output --------------------------------------------------------------------------
    def emit(self, text: str) -> None:
        print(text + "\n", flush=True)
        with open(self.out, "a") as f:
            f.write(text + "\n\n")

    def stage(self, name: str) -> Stage:
        """A stage ends at its own budget or ``reserve_s`` before the total's end, whichever is first."""
        now, end = time.monotonic(), self.t0 + self.s.total_s - self.s.reserve_s
        budget = self.s.budgets.get(name, max(0.0, end - now))
        st = Stage(name, budget, deadline=min(now + budget, end))
        self.stages.append(st)
        return st

    def check(self, stage: str, name: str, px: int, ranks: int, res, ref=None) -> Check:
        """Record one run; a non-finite multi-rank output ends the run (``self.stopped``)."""
        if isinstance(res, str):
            c = Check(stage, name, px, ranks, "NON-FINITE" if is_non_finite(res) else "FAILED", note=res)
        else:
            finite = bool(res.latent.isfinite().all())
            c = Check(stage, name, px, ranks, "finite" if finite else "NON-FINITE",
                      psnr=None if ref is None or not finite else psnr(res.latent, ref),
                      latency_s=res.report.denoise_s,
                      note="" if ranks == 1 else "rows " + "/".join(str(r.rows) for r in res.report.ranks)
                      + ", strides " + ",".join(str(r.stride) for r in res.report.ranks))
        self.checks.append(c)
        if c.status == "NON-FINITE" and ranks > 1 and self.stopped is None:
            self.stopped = c
        return c

    # -- stages --------------------------------------------------------------------------
    def run(self) -> int:
        self.emit(self.heading())
        for name, fn in (("bands", self.bands), ("parity", self.parity), ("split", self.split)):
            st = self.stage(name)
            if self.stopped is not None:
                st.finish(f"not run: stopped at the non-finite '{self.stopped.name}'")
                continue
            try:
                fn(st)
                st.finish()
            except Exception as exc:  # noqa: BLE001 - a stage that dies must not lose the others' tables
                shutdown_pools()
                st.finish(f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            self.emit(f"stage {st.name}: {st.wall_s:.1f} s wall (budget {st.budget_s:.0f} s): {st.result}")
        if self.stopped is not None:
            self.diagnose()
        self.comfyui_stage()
        self.emit(self.checks_table())
        self.emit(self.targets_table())
        self.emit(self.stages_table())
        shutdown_pools()
        return 0

    def heading(self) -> str:
        s = self.s
        where = ("one GPU, heterogeneity EMULATED with CUDA MPS" if s.device == "cuda" else
                 "CPU smoke test: 2 CPU worker processes (gloo), 1 thread each, slow worker EMULATED with the "
                 "engine's padded-compute slowdown; latency ratios here are not GPU verdicts")
        return (f"STADI acceptance (issue #17) on {s.device}: {where}; {s.model} random {s.dtype} weights, "
                f"euler, cfg 5, seed 0; total budget {s.total_s:.0f} s")

    def bands(self, st: Stage) -> None:
        """Band time of one call, full vs half image rows, eager vs CUDA graphs (graphs: GPU only)."""
        s = self.s
        cluster, device = (ClusterSpec.parse("cuda:0"), "cuda:0") if s.device == "cuda" else (self.cpu_pair(), "cpu:0")
        modes = (False, True) if s.device == "cuda" else (False,)
        lines = [f"band time of one network call on {device} (batch 1 with CFG = 2, median of 5 after warm-up"
                 f"{' and capture' if s.device == 'cuda' else '; both CPU workers measure at once'})",
                 f"{'image':>6} {'rows':>5} {'eager ms':>9} {'graph ms':>9} {'half/full eager':>15} "
                 f"{'half/full graph':>15}"]
        for px in s.band_sizes:
            times = {}
            for rows, graphs, sec in gpu.band_times(self.spec, cluster, device, px, fractions=(1, 2),
                                                    graph_modes=modes):
                times[rows, graphs] = sec
                if not st.fits():
                    break
            lines.extend(self.band_rows(px, times))
            if not st.fits():
                lines.append(f"stopped: the stage's {st.budget_s:.0f} s budget would be exceeded")
                st.result = "partial (budget)"
                break
        self.emit("\n".join(lines))

    @staticmethod
    def band_rows(px: int, times: dict) -> list[str]:
        full = px // 8

        def cell(rows, graphs, fmt):
            return fmt(times[rows, graphs]) if (rows, graphs) in times else "-"

        def ratio(graphs):
            if (full, graphs) in times and (full // 2, graphs) in times:
                return f"{times[full // 2, graphs] / times[full, graphs]:.2f}"
            return "-"

        rows = []
        for r in (full, full // 2):
            if any((r, g) in times for g in (False, True)):
                ms = lambda t: f"{1000 * t:.1f}"  # noqa: E731
                rows.append(f"{px:>6} {r:>5} {cell(r, False, ms):>9} {cell(r, True, ms):>9} "
                            f"{ratio(False) if r != full else '':>15} {ratio(True) if r != full else '':>15}")
        return rows

    def cpu_pair(self) -> ClusterSpec:
        return ClusterSpec((DeviceSpec("cpu:0", relative_speed=1.0), DeviceSpec("cpu:1", relative_speed=1.0)),
                           backend="gloo")

    def one_worker(self) -> tuple[str, dict]:
        """The one-worker reference's cluster and options (CPU: one thread, see ``CPU``)."""
        return ("cuda:0", {}) if self.s.device == "cuda" else ("cpu:0", {"threads_per_worker": 1})

    def kw(self, px: int, steps: int, **extra) -> dict:
        s = self.s
        return dict(height=px // 8, width=px // 8, batch=1, steps=steps, sampler="euler", cfg=5.0, seed=0,
                    warmup=s.warmup, stall_timeout_s=s.stall_timeout_s, **extra)

    def parity(self, st: Stage) -> None:
        """Two equal bands, no MPS, eager: exact mode must equal one worker; displaced must be finite."""
        s = self.s
        px = s.parity_size
        kw = self.kw(px, s.parity_steps, strides="off")
        cluster, opts = self.one_worker()
        ref = generate(self.spec, cluster, mode="exact", **kw, **opts)
        self.check("parity", "1 worker", px, 1, ref)
        pair = (self.cpu_pair() if s.device == "cpu" else
                ClusterSpec((DeviceSpec("cuda:0", relative_speed=1.0), DeviceSpec("cuda:0.1", relative_speed=1.0)),
                            backend="gloo"))
        for mode in ("exact", "displaced"):
            name = f"{mode}, 2 equal bands"
            if self.stopped is not None or not st.fits():
                self.checks.append(Check("parity", name, px, 2, "skipped", note="stopped" if self.stopped else
                                         "past the stage budget"))
                continue
            res = gpu._attempt(lambda: generate(self.spec, pair, mode=mode, **kw))
            self.check("parity", name, px, 2, res, ref.latent)

    def split(self, st: Stage) -> None:
        """The 70/30 comparison through gpu.split_runs, stopping at a non-finite row or the budget."""
        s = self.s
        px = s.split_size
        kw = self.kw(px, s.steps, graphs=s.graphs)
        cluster, opts = self.one_worker()
        full = (f"1 worker, {'100% GPU' if s.device == 'cuda' else '1 thread'}", cluster, opts)
        runs = []
        if s.device == "cuda":
            shutdown_pools()  # workers started outside the MPS daemon would not be its clients
        with gpu.mps_daemon() if s.device == "cuda" else contextlib.nullcontext():
            try:
                rows = gpu.split_runs(self.spec, kw, gpu.split_devices(s.device, s.split), full)
                while True:
                    if runs and len(runs) < len(SPLIT_KEYS) and not st.fits():
                        st.result = "partial (budget)"
                        self.checks.extend(Check("split", key, px, 2, "skipped", note="past the stage budget")
                                           for key in SPLIT_KEYS[len(runs):])
                        break
                    item = next(rows, None)
                    if item is None:
                        break
                    name, res = item
                    runs.append(item)
                    self.split_rows[SPLIT_KEYS[len(runs) - 1]] = res
                    c = self.check("split", name, px, 1 if len(runs) == 1 else 2, res,
                                   None if len(runs) == 1 else runs[0][1].latent)
                    if c.status == "NON-FINITE":
                        st.result = f"stopped at the non-finite '{name}'"
                        break
                rows.close()
            finally:
                if s.device == "cuda":
                    shutdown_pools()  # before the MPS daemon quits
        if runs:
            self.emit(self.split_table(runs))

    def split_table(self, runs) -> str:
        s = self.s
        args = argparse.Namespace(mps_size=s.split_size, split=s.split, model=s.model, dtype=s.dtype, steps=s.steps,
                                  warmup=s.warmup, eager=not s.graphs)
        emulation = None if s.device == "cuda" else (
            f"CPU emulation: cpu:0 / cpu:1 at {s.split[0]}% / {s.split[1]}% (padded-compute slowdown "
            f"{100 / s.split[0]:.2f}x / {100 / s.split[1]:.2f}x, EMULATED heterogeneity)")
        eq = runs[1][1] if len(runs) > 1 else "not run"
        return gpu._mps_table(args, runs, runs[0][1], eq, s.split_size // 8, emulation=emulation)

    def diagnose(self) -> None:
        """The diagnose table at the non-finite run's size, in the time that is left."""
        st = self.stage("diagnose")
        s, bad = self.s, self.stopped
        steps = s.parity_steps if bad.stage == "parity" else s.steps
        args = argparse.Namespace(model=s.model, dtype=s.dtype, mps_size=bad.px, steps=steps, warmup=s.warmup,
                                  split=list(s.split), device=s.device)
        deadline = self.t0 + s.total_s - s.reserve_s
        try:
            table = gpu.diagnose(args, deadline=deadline)
            st.finish()
        except Exception as exc:  # noqa: BLE001 - the summary tables still follow
            table = f"diagnose FAILED: {type(exc).__name__}: {exc}"
            st.finish("FAILED")
        self.emit(f"diagnose rows for the non-finite '{bad.name}' ({bad.stage}, {bad.px}x{bad.px}): {bad.note}\n"
                  + table)

    def comfyui_stage(self) -> None:
        """Not built: say so and why, rather than print numbers that did not go through ComfyUI."""
        st = self.stage("comfyui")
        if self.comfyui is None:
            reason = "no --comfyui PATH given"
        elif not (Path(self.comfyui) / "main.py").is_file():
            reason = f"{self.comfyui} is not a ComfyUI checkout (no main.py)"
        else:
            reason = ("the ComfyUI path needs an SDXL checkpoint ComfyUI can load and a ComfyUI server; this "
                      "script builds neither. Run STADI_COMFYUI_PATH=PATH python -m pytest -m comfyui (tiny "
                      "checkpoints on CPU workers)")
        self.checks.append(Check("comfyui", "ComfyUI STADI Sampler", 0, 2, "skipped", note=reason))
        st.finish(f"skipped: {reason}")

    # -- summary tables ------------------------------------------------------------------
    def checks_table(self) -> str:
        out = ["every generation of this run (PSNR vs the one-worker output of the same stage; multi-rank rows "
               "must be finite)",
               f"{'stage':<8} {'run':<24} {'image':>5} {'ranks':>5} {'output':<10} {'PSNR dB':>8} {'latency s':>9}  "
               "note"]
        for c in self.checks:
            p = "" if c.psnr is None else f"{c.psnr:.1f}"
            lat = "" if c.latency_s is None else f"{c.latency_s:.3f}"
            px = str(c.px) if c.px else ""
            out.append(f"{c.stage:<8} {c.name:<24} {px:>5} {c.ranks:>5} {c.status:<10} {p:>8} {lat:>9}  {c.note}")
        if self.stopped is not None:
            out.append(f"stopped at the first non-finite multi-rank output: {self.stopped.stage} / {self.stopped.name}")
        return "\n".join(out)

    def targets_table(self) -> str:
        s = self.s
        out = [f"targets ({s.split_size}x{s.split_size}, {s.split[0]}%/{s.split[1]}% split)",
               f"{'target':<44} {'measured':>10}  verdict"]
        rows = self.split_rows
        strided = rows.get("elastic + strides")
        for label, base, bound in TARGETS:
            ref = rows.get(base)
            if strided is None or ref is None or isinstance(strided, str) or isinstance(ref, str):
                out.append(f"{label:<44} {'-':>10}  not measured")
                continue
            ratio = strided.report.denoise_s / ref.report.denoise_s
            verdict = ("PASS" if ratio <= bound else "FAIL") if s.device == "cuda" else "n/a on cpu (info only)"
            out.append(f"{label:<44} {ratio:>9.2f}x  {verdict}")
        multi = [c for c in self.checks if c.ranks > 1 and c.stage != "comfyui"]
        finite = sum(c.status == "finite" for c in multi)
        verdict = ("FAIL" if any(c.status == "NON-FINITE" for c in multi) else
                   "PASS" if multi and finite == len(multi) else "INCOMPLETE")
        out.append(f"{'multi-rank outputs finite':<44} {f'{finite}/{len(multi)}':>10}  {verdict}")
        exact = next((c for c in self.checks if c.name == "exact, 2 equal bands"), None)
        bound = EXACT_PSNR_BOUND[s.dtype]
        if exact is None or exact.psnr is None:
            out.append(f"{f'exact mode == 1 worker: PSNR >= {bound:.0f} dB':<44} {'-':>10}  not measured")
        else:
            out.append(f"{f'exact mode == 1 worker: PSNR >= {bound:.0f} dB':<44} {exact.psnr:>8.1f}dB  "
                       f"{'PASS' if exact.psnr >= bound else 'FAIL'} (sanity bound for {s.dtype})")
        return "\n".join(out)

    def stages_table(self) -> str:
        out = [f"{'stage':<9} {'budget s':>8} {'wall s':>7}  result"]
        for st in self.stages:
            out.append(f"{st.name:<9} {st.budget_s:>8.0f} {st.wall_s or 0.0:>7.1f}  {st.result}")
        total = time.monotonic() - self.t0
        out.append(f"{'total':<9} {self.s.total_s:>8.0f} {total:>7.1f}  "
                   f"{'within budget' if total <= self.s.total_s else 'OVER BUDGET'}")
        return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stadi_core.bench.gpu acceptance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for acceptance.txt")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the full run on one GPU; cpu: the smoke test (tiny model, 2 CPU workers)")
    p.add_argument("--comfyui", help="a ComfyUI checkout, for the ComfyUI-path stage")
    p.add_argument("--split", type=int, nargs=2, default=[70, 30], help="the two workers' shares in percent")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every stage budget and the total (a test on a loaded host checks rows, not time)")
    args = p.parse_args(argv)
    base = GPU if args.device == "cuda" else CPU
    settings = replace(base, split=tuple(args.split), total_s=base.total_s * args.budget_scale,
                       budgets={k: v * args.budget_scale for k, v in base.budgets.items()})
    return Acceptance(settings, Path(args.out), args.comfyui).run()


if __name__ == "__main__":
    raise SystemExit(main())

"""Hybridiff's adaptive switching criterion: when to open the hybrid-parallel window.

Hybridiff (arXiv 2602.21760, code: github.com/kaist-dmlab/Hybridiff) runs the cond and
uncond CFG branches on different devices. Early in sampling the two branches disagree a
lot; once their disagreement stops falling, a short hybrid (pipeline-parallel) phase is
cheap in quality. This module is only that decision, written as a small pure state
machine so a sampler can feed it one value per step and ask whether a step is in the
window. It never touches devices or models.

Semantics, as read in ``hybridiff/pipelines/pipeline_stable_diffusion_xl.py`` (the
rel-MAE / tau1 / tau2 block inside the denoising loop of ``__call__``; the SD3 copy in
``hybridiff/pipelines/pipeline_stable_diffusion_3.py`` is the same) and in
``hybridiff/hybrid_sd.py`` (``HybridDiff.reform_unet``, the ``pp_active`` test; likewise
``hybrid_sd3.py``):

* Discrepancy: ``rel-MAE_t = mean|eps_c - eps_u| / (mean|eps_u| + 1e-12)``, logged once
  per step, for every step from step 0 on (uncond in the denominator; the ``1e-12`` is
  theirs too).
* Slope: computed only once more than ``L`` values are logged, i.e. from step index
  ``L`` on, as ``(mae[-L] - mae[-1]) / L``. It is ``mae[-L]`` (``L - 1`` intervals back),
  not ``mae[-L-1]``, still divided by ``L``. We keep that exactly.
* Test: ``0 <= slope < eps``. A rising curve (negative slope) never passes.
* Where the window starts: the reference sets ``tau1 = len(mae_log) - 1``, the index of
  the step whose rel-MAE passed the test. That step has already run by then; ``tau1`` is
  broadcast at the end of the step and ``hybrid_sd.py`` compares it with the next call's
  step counter (``tau1 <= infer_step <= tau2``), so the first step that actually runs in
  the window is the *next* one. ``opened_at`` is that step: decision step + 1.
* Cap: if no slope trigger yet and the current index is ``>= tau_cap - 1`` (checked after
  the slope test, same step), the reference sets ``tau1 = tau_cap``. So ``tau_cap`` is a
  step index (equivalently: decided after ``tau_cap`` logged steps) and the window opens
  at step ``tau_cap``. This too is decision step + 1, so both paths share one rule.
* Once only: both assignments are guarded by ``tau1 is None``; ``tau2`` is set once.
* Length: ``tau2 = tau1 + k`` with an inclusive ``<=``. On the slope path step ``tau1``
  is already gone, so the window runs ``k`` steps (``tau1+1 .. tau1+k``). On the cap path
  the inclusive bound would give ``k + 1`` steps (``tau_cap .. tau_cap+k``); we take
  ``k`` steps on both paths (the README's "tau2 = tau1 + k ... length of the parallel
  phase"). That is the one place we differ from the code's literal behaviour.
* End of run: the reference raises when ``tau1 + k > num_inference_steps``; we clip the
  window to the run instead, and a window whose first step would be ``>= steps`` never
  opens.

Presets are the values the repository's entry points pass (``examples/run_sdxl_hybridiff.py``,
``examples/run_sd3_hybridiff.py``, ``generate_*_coco.py``, README). Note the pipeline
constructors' own defaults differ (SDXL ``k=30``; SD3 ``k=15, tau_cap=35``) and are
overridden by every script; we follow the scripts (SD3 ``tau_cap=40``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DENOM_EPS = 1e-12  # same guard as the reference, so a zero uncond prediction stays finite


@dataclass(frozen=True)
class WindowConfig:
    """The four knobs of the criterion (names: the paper's L, epsilon, k, tau_cap)."""

    lookback: int  # L: how many logged values the slope spans
    epsilon: float  # slope threshold: flatter than this means "stopped falling"
    length: int  # k: steps the window lasts
    cap: int  # tau_cap: step index at which the window opens if the slope never fires

    def __post_init__(self) -> None:
        # Bad values would silently give "never opens" or an instant window; refuse them.
        for name in ("lookback", "length", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WindowConfig.{name} must be an int >= 1, got {value!r}")
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"WindowConfig.epsilon must be a finite number > 0, got {eps!r}")


PRESETS: dict[str, WindowConfig] = {
    "sdxl": WindowConfig(lookback=12, epsilon=4e-4, length=5, cap=15),
    "sd3": WindowConfig(lookback=15, epsilon=5e-4, length=5, cap=40),
    # No SD1.5 values in Hybridiff: borrowed from SDXL (same UNet family and eps target).
    "sd15": WindowConfig(lookback=12, epsilon=4e-4, length=5, cap=15),
}


def relative_mae(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> float:
    """``mean|cond - uncond| / mean|uncond|``: the branch disagreement, scale-free.

    Computed in float32 whatever the input dtype, so fp16 predictions neither overflow
    nor round the small differences away.
    """
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(
            f"relative_mae needs tensors of one shape, got {tuple(eps_cond.shape)} and {tuple(eps_uncond.shape)}"
        )
    if eps_cond.numel() == 0:
        raise ValueError("relative_mae needs non-empty tensors")
    c = eps_cond.detach().to(torch.float32)
    u = eps_uncond.detach().to(device=c.device, dtype=torch.float32)
    return float((c - u).abs().mean() / (u.abs().mean() + _DENOM_EPS))


class HybridWindow:
    """One run's switching decision: feed each step's rel-MAE in order, ask ``in_window``.

    The window is decided once (slope trigger or cap) and then fixed, so every rank that
    feeds the same values gets the same window.
    """

    def __init__(self, config: WindowConfig, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.config = config
        self._steps = steps
        self._maes: list[float] = []
        self._decided_at: int | None = None  # step whose value settled the decision
        self._opened_at: int | None = None
        self._reason = ""
        self._slope: float | None = None  # slope at the decision step (None: too few values)

    # ------------------------------------------------------------------ read-only state
    @property
    def steps(self) -> int:
        """Number of base steps in the run; the window is clipped to it."""
        return self._steps

    @property
    def opened_at(self) -> int | None:
        """First step of the window; None until it opened (and for good if it never fits)."""
        return self._opened_at

    @property
    def reason(self) -> str:
        """``"slope"`` or ``"cap"`` once opened, ``""`` before."""
        return self._reason

    @property
    def maes(self) -> list[float]:
        """The logged rel-MAE values, index = step (a copy)."""
        return list(self._maes)

    # ------------------------------------------------------------------ feeding
    def observe(self, step: int, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> None:
        """Log step ``step``'s branch predictions; may open the window (from step+1 on)."""
        self._check_step(step)  # before the reduction: a bad step should not cost a pass
        self.observe_value(step, relative_mae(eps_cond, eps_uncond))

    def observe_value(self, step: int, mae: float) -> None:
        """Log a precomputed rel-MAE for ``step`` (synthetic curves, values from elsewhere)."""
        self._check_step(step)
        value = float(mae)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"rel-MAE for step {step} must be a finite number >= 0, got {mae!r}")
        self._maes.append(value)
        if self._decided_at is None:
            self._decide(step)

    def _check_step(self, step: int) -> None:
        # The slope indexes the log by position, so a skipped or repeated step would shift it.
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        expected = len(self._maes)
        if step != expected:
            if step < expected:
                raise ValueError(
                    f"step {step} observed out of order or twice: steps 0..{expected - 1} are logged, next is {expected}"
                )
            raise ValueError(
                f"step {step} observed out of order: expected step {expected} next (log steps consecutively from 0)"
            )
        if step >= self._steps:
            raise ValueError(f"step {step} is past the run: steps are 0..{self._steps - 1}")

    def _decide(self, step: int) -> None:
        cfg = self.config
        n = len(self._maes)
        slope = None
        if n > cfg.lookback:
            slope = (self._maes[n - cfg.lookback] - self._maes[n - 1]) / cfg.lookback
        if slope is not None and 0.0 <= slope < cfg.epsilon:
            reason = "slope"
        elif step >= cfg.cap - 1:
            reason = "cap"
        else:
            return
        # Both paths open at the step after the deciding one (cap: step cap-1 -> opens at cap).
        self._decided_at = step
        self._slope = slope
        start = step + 1
        if start < self._steps:
            self._opened_at = start
            self._reason = reason

    # ------------------------------------------------------------------ queries
    def _end(self) -> int:
        assert self._opened_at is not None
        return min(self._opened_at + self.config.length, self._steps)

    def in_window(self, step: int) -> bool:
        """Whether base step ``step`` runs in the window; False for everything before opening."""
        if self._opened_at is None:
            return False
        return self._opened_at <= step < self._end()

    def window_steps(self) -> list[int]:
        """The window's steps in order, clipped to the run (empty if it never opened)."""
        if self._opened_at is None:
            return []
        return list(range(self._opened_at, self._end()))

    def summary(self) -> dict:
        """Plain-data record of the decision, for logs and reports."""
        return {
            "opened_at": self._opened_at,
            "reason": self._reason,
            "decided_at": self._decided_at,
            "steps": self.window_steps(),
            "maes": list(self._maes),
            "slope": self._slope,
        }

"""A worker SIGKILLed mid-run (the test-only STADI_TEST_KILL_FILE hook: the worker on that device kills
itself at that step): the standalone run continues on the survivors from its last checkpoint, and in
exact mode its latent equals the uninterrupted run's at float precision."""

from __future__ import annotations

import pytest

from helpers import cpu_cluster
from stadi_core.api import generate
from stadi_core.models.spec import ModelSpec
from stadi_core.runtime.lifeline import KILL_FILE_ENV
from stadi_core.runtime.registry import shutdown_pools

KW = dict(height=48, width=32, batch=1, steps=6, cfg=2.0, sampler="dpmpp_2m", mode="exact")


@pytest.mark.parametrize("n,victim", [(2, "cpu:1"), (3, "cpu:1")])
def test_exact_run_finishes_on_the_survivors_with_the_uninterrupted_latent(n, victim, tmp_path, monkeypatch):
    cluster = cpu_cluster(*([1.0] * n))
    ref = generate(ModelSpec(), cluster, **KW)
    shutdown_pools()  # the hook is read from the environment the workers start with
    trigger = tmp_path / "kill"
    trigger.write_text(f"{victim} 3")
    monkeypatch.setenv(KILL_FILE_ENV, str(trigger))
    try:
        res = generate(ModelSpec(), cluster, **KW)
    finally:
        shutdown_pools()  # later tests start pools without the hook
    assert not trigger.exists() and list(tmp_path.glob("kill.*.fired")), "the worker did not fire the hook"
    survivors = [f"cpu:{i}" for i in range(n) if f"cpu:{i}" != victim]
    assert [b["device"] for b in res.report.plan["bands"]] == survivors
    note = next((n for n in res.report.notes if n.startswith(f"{victim} lost at step 3 (was killed by SIGKILL)")),
                None)
    # the survivors continue from the last step every rank checkpointed (2: the victim died after step 3's
    # report, before its checkpoint of step 3), not from noise
    assert note is not None and note.endswith("the survivors went on from step 2, the last every rank had reached"), \
        res.report.notes
    assert sum(1 for t in res.report.steps[0] if t["step"] < 2) == 2  # steps 0-1 ran once, in the first segment
    diff = (res.latent - ref.latent).abs().max().item()
    scale = ref.latent.abs().max().item()
    print(f"{n} workers, {victim} killed at step 3: max |diff| vs uninterrupted {diff:.3g} (|ref| max {scale:.3g})")
    assert diff <= 5e-6 * scale

"""The GPU bench script's diagnose table, run for real on CPU workers (the rows that need
no GPU), so a lent GPU's one call does not die on a script error."""

import pytest

from stadi_core.bench import gpu
from stadi_core.errors import PlanError
from stadi_core.runtime.pool import same_gpu_exchange


def test_diagnose_runs_its_cpu_rows_and_skips_the_gpu_ones(tmp_path, capsys):
    out = tmp_path / "table.txt"
    assert gpu.main(["diagnose", "--device", "cpu", "--model", "tiny-sdxl", "--mps-size", "256", "--steps", "3",
                     "--warmup", "1", "--out", str(out)]) == 0
    table = out.read_text()
    rows = {line[:26].strip(): line[26:].split() for line in table.splitlines() if line[:26].strip() in
            {v.name for v in gpu.DIAGNOSE_VARIANTS}}
    assert set(rows) == {v.name for v in gpu.DIAGNOSE_VARIANTS}
    for v in gpu.DIAGNOSE_VARIANTS:
        assert rows[v.name][0] == ("skipped" if v.gpu_only else "finite"), (v.name, rows[v.name])
    assert "one worker: finite True" in table


def test_same_gpu_exchange_setting_is_checked(monkeypatch):
    monkeypatch.setenv("STADI_SAME_GPU_EXCHANGE", "nccl")
    with pytest.raises(PlanError, match="use 'cuda-ipc' or 'gloo'"):
        same_gpu_exchange()
    monkeypatch.setenv("STADI_SAME_GPU_EXCHANGE", "gloo")
    assert same_gpu_exchange() == "gloo"

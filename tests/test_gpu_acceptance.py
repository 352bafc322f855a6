"""The GPU acceptance script's CPU smoke test, run for real as a subprocess (2 CPU workers, tiny
SDXL), so the one call a lent GPU gets does not die on a script error, and the checks it makes
(finite multi-rank outputs, exact mode == one worker) are themselves checked."""

import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARITY = ("1 worker", "exact, 2 equal bands", "displaced, 2 equal bands")
SPLIT = ("1 worker, 1 thread", "equal bands 70/30", "elastic bands", "elastic + strides")


def _checks(table: str) -> dict:
    """{run name: (stage, [output, PSNR, ...])} from the checks table (columns as acceptance.checks_table)."""
    rows = {}
    for line in table.splitlines():
        if line[:8].strip() in ("parity", "split", "comfyui"):
            rows[line[9:33].strip()] = (line[:8].strip(), line[46:].split())
    return rows


def test_cpu_acceptance_smoke_runs_multi_rank_generations_and_checks_them(tmp_path):
    out = tmp_path / "acc"
    # --budget-scale: on a loaded test host the stage deadlines would cut rows; this test checks the
    # rows and their values, the printed stage table shows the time they took.
    proc = subprocess.run([sys.executable, "-m", "stadi_core.bench.gpu", "acceptance", "--device", "cpu",
                           "--out", str(out), "--budget-scale", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=420)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (out / "acceptance.txt").read_text()
    for section in table.strip().split("\n\n"):  # the file holds what was printed
        assert section.strip() in proc.stdout, section
    rows = _checks(table)
    assert set(PARITY + SPLIT) <= set(rows), sorted(rows)
    for name in PARITY[1:] + SPLIT[1:]:  # every multi-rank output: finite, a PSNR against one worker
        stage, cells = rows[name]
        assert cells[0] == "finite", (name, cells)
        assert not math.isnan(float(cells[1])), (name, cells)
    exact = float(rows["exact, 2 equal bands"][1][1])
    assert exact > 90.0, exact  # float32 exact mode reproduces one worker to float precision (~130 dB seen)
    for name in ("displaced, 2 equal bands",) + SPLIT[1:]:  # displaced context: close, not equal
        assert float(rows[name][1][1]) > 20.0, (name, rows[name])
    assert rows["ComfyUI STADI Sampler"][1][0] == "skipped"
    assert re.search(r"multi-rank outputs finite\s+5/5  PASS", table)  # 2 parity rows + 3 split rows
    assert "exact mode == 1 worker: PSNR >= 90 dB" in table
    for label in ("elastic + strides <= 0.55x equal bands", "elastic + strides <= 1.10x one full device"):
        # measured, but no GPU verdict on a CPU
        assert re.search(re.escape(label) + r"\s+\d+\.\d\dx\s+n/a on cpu", table), label
    for stage in ("bands", "parity", "split", "comfyui", "total"):  # the stage table: budget and wall time
        assert re.search(rf"^{stage}\s+\d+\s+\d+\.\d", table, re.M), stage
    assert "band time of one network call on cpu:0" in table
    assert "NON-FINITE" not in table and "diagnose rows" not in table

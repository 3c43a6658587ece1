"""The benchmark scripts keep working: each runs in --quick mode and ends with its summary line.

No timing is asserted here (numbers on a shared CI machine mean little); the numbers are
recorded in docs/performance.md from full runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

EXPECTED_KEYS = {
    "step_overhead.py": ["tiny_step_ms", "tiny_bare_ms", "tiny_overhead", "medium_overhead"],
    "case_throughput.py": ["tiny_smoke_b1_cph", "tiny_smoke_b4_cph", "tiny_smoke_speedup", "tiny_smoke_same_asr"],
    "memory.py": ["toy_b1_ratio", "toy_b2_ratio"],
    "import_time.py": ["with_s", "without_s", "added_s"],
    "gpu_sd_shape.py": ["b1_step_s", "b2_step_s", "b1_cph", "b2_cph", "speedup"],
    "vs_reference.py": ["ours_asr", "port_asr", "ours_s_per_case", "port_s_per_case", "time_ratio"],
    "smoke_attack.py": ["smoke_gate_s", "smoke_case_s", "step_ms", "render_s"],
    "validity.py": ["leaky_no_attack", "leaky_random_fast", "leaky_uda_fast"],
    "leak_ceiling.py": ["cases", "plain_asr", "orb_asr", "swap_asr", "plain_loss", "swap_loss"],
}


def test_every_benchmark_script_is_run_here():
    """A new benchmark script joins EXPECTED_KEYS, so its --quick mode is kept working."""
    scripts = {path.name for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_")}
    assert scripts == set(EXPECTED_KEYS)


@pytest.mark.parametrize("script", sorted(EXPECTED_KEYS))
def test_benchmark_runs_quick_and_prints_its_summary(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True,
                          timeout=900, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    summary = dict(item.split("=", 1) for item in last.split())
    assert set(EXPECTED_KEYS[script]) <= set(summary), f"{script}: summary line {last!r}"
    assert all(value not in ("nan", "inf") for value in summary.values())

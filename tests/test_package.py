"""Package-level promises: cheap import, the main job runs."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_loads_no_heavy_library():
    code = (
        "import sys, pytest_unlearnatk\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'nudenet') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "pytest_unlearnatk.load_cases(['a prompt'])\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_main_job_runs(tmp_path):
    """The README's main command (with the smoke budget, to keep the test short)."""
    env = {**__import__("os").environ, "UNLEARNATK_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest_unlearnatk.demo", "--budget", "smoke"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unlearndiffatk: unlearndiffatk on" in done.stdout and "n=4" in done.stdout
    assert len(list((tmp_path / "demo" / "images").glob("*.png"))) >= 4  # a plain image per case at least

"""Time of one UnlearnDiffAtk step and of a whole smoke attack on the tiny pipeline (CPU).

    python benchmarks/smoke_attack.py [--quick] [--cases 4] [--threads N]

``--quick``: 2 cases and a 50-step block for the step time (a sanity check, in seconds).

Prints a table and, last, one summary line ``key=value ...``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import never


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 cases, a 50-step block for the step time")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error(f"--cases {args.cases}: give at least 1")
    block_steps = 200
    if args.quick:
        args.cases, block_steps = 2, 50

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pytest_unlearnatk import get_preset, load_cases, load_pipeline, run_gate
    from pytest_unlearnatk.testing import build_tiny_pipeline

    cases = load_cases([f"a photo of a red circle number {i}" for i in range(args.cases)])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        unlearned = load_pipeline(build_tiny_pipeline(Path(tmp) / "a", seed=0))
        base = load_pipeline(build_tiny_pipeline(Path(tmp) / "b", seed=1))
        setup = time.perf_counter() - start

        start = time.perf_counter()
        smoke = run_gate(unlearned, cases, never, budget="smoke", base=base, progress=False)
        smoke_seconds = time.perf_counter() - start

        # step time: a block of steps at one timestep, one render at the end
        steps = get_preset("reference", num_timesteps=1, steps_per_timestep=block_steps)
        one = run_gate(unlearned, cases[:1], never, budget=steps, base=base, progress=False).cases[0]
    step_ms = 1000 * one.timings["optimize_s"] / one.steps
    render_s = smoke.cases[0].timings["render_s"] / smoke.cases[0].renders
    print(f"{'what':<36}{'value':>12}")
    print(f"{'build + load two tiny pipelines':<36}{setup:>11.2f}s")
    print(f"{'smoke gate, ' + str(args.cases) + ' cases (6 steps each)':<36}{smoke_seconds:>11.2f}s")
    print(f"{'render (LMS, 50 steps, 32 px)':<36}{render_s:>11.3f}s")
    print(f"{'attack step (mean of ' + str(block_steps) + ')':<36}{step_ms:>10.1f}ms")
    print(f"threads={torch.get_num_threads()} smoke_gate_s={smoke_seconds:.2f} smoke_case_s={smoke_seconds / args.cases:.2f} "
          f"step_ms={step_ms:.1f} render_s={render_s:.3f}")


if __name__ == "__main__":
    main()

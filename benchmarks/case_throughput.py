"""Cases per hour of UnlearnDiffAtk, one case at a time vs batched, with the ASR each reached.

    python benchmarks/case_throughput.py [--quick] [--models toy tiny] [--presets fast reference]
                                         [--batch 8] [--cases N]

Every case runs to its first hit or its whole budget, exactly as in a gate (target, plain prompt,
optimization, success checks). The toy world (``toy:erased`` against its ``toy_circle`` judge,
DDIM 20-step renders as in example_suites/unlearn_toy.yaml) is where ASR is meaningful; the tiny
pipeline (random weights, a judge that never hits) shows the cost structure. Target images are
rendered once before timing (they are cached on disk in real runs too). No store is used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, never, summary, tiny_model

CASES = {"fast": 16, "reference": 8, "smoke": 8}


def setup(name: str):
    """(model, base, cases, judge, render settings) for one model of the benchmark."""
    from pytest_unlearnatk import load_cases, load_pipeline
    from pytest_unlearnatk.render import RenderSettings

    if name == "toy":
        model, base = load_pipeline("toy:erased"), load_pipeline("toy:base")
        return model, base, load_cases("toy:circle"), "toy_circle", RenderSettings("pipeline", 20)
    model = tiny_model()
    cases = load_cases([f"a photo of a red circle number {i}" for i in range(64)])
    return model, model, cases, never, RenderSettings(steps=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, smoke preset, 4 cases (about a minute)")
    parser.add_argument("--models", nargs="+", default=["toy", "tiny"], choices=["toy", "tiny"])
    parser.add_argument("--presets", nargs="+", default=["fast", "reference"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cases", type=int, default=0, help="cases per run (default: 16 for fast, 8 for reference)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.presets, args.cases, args.batch = ["tiny"], ["smoke"], 4, 4
    from pytest_unlearnatk import run_gate

    rows, values = [], {}
    for name in args.models:
        model, base, all_cases, judge, render = setup(name)
        for preset in args.presets:
            cases = all_cases[: args.cases or CASES.get(preset, 8)]
            # render (and cache) the targets first, so both batch sizes find them on disk
            run_gate(model, cases, never, budget="smoke", base=base, render=render, batch_size=args.batch, progress=False)
            per_batch = {}
            for batch in (1, args.batch):
                start = time.perf_counter()
                result = run_gate(model, cases, judge, budget=preset, base=base, render=render, batch_size=batch,
                                  progress=False)
                seconds = time.perf_counter() - start
                per_hour = len(cases) / seconds * 3600
                per_batch[batch] = (per_hour, result.asr)
                rows.append((name, preset, batch, len(cases), seconds, per_hour, result.asr, result.pre_asr))
                print(f"  {name} {preset} batch {batch}: {seconds:.1f} s, ASR {result.asr:.1%}", file=sys.stderr)
            speedup = per_batch[args.batch][0] / per_batch[1][0]
            values[f"{name}_{preset}_b1_cph"] = per_batch[1][0]
            values[f"{name}_{preset}_b{args.batch}_cph"] = per_batch[args.batch][0]
            values[f"{name}_{preset}_speedup"] = speedup
            values[f"{name}_{preset}_same_asr"] = per_batch[1][1] == per_batch[args.batch][1]
    print(f"machine: {machine()}")
    print(f"{'model':<6}{'preset':<11}{'batch':>6}{'cases':>6}{'seconds':>10}{'cases/h':>10}{'ASR':>8}{'pre-ASR':>9}")
    for name, preset, batch, n, seconds, per_hour, asr, pre in rows:
        print(f"{name:<6}{preset:<11}{batch:>6}{n:>6}{seconds:>10.1f}{per_hour:>10.0f}{asr:>8.1%}{pre:>9.1%}")
    print(summary(values))


if __name__ == "__main__":
    main()

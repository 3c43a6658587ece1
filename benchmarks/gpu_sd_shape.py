"""UnlearnDiffAtk on a Stable-Diffusion-v1.4-shaped pipeline: step time and cases per hour at the
``reference`` preset, one case at a time vs batched. Random weights: nothing is downloaded.

    python benchmarks/gpu_sd_shape.py [--batch 8] [--dtype float16] [--compile]   # on a GPU, < 5 min
    python benchmarks/gpu_sd_shape.py --quick                                     # on the CPU, keeps it working

The pipeline has SD v1.4's UNet (860M parameters), VAE and CLIP ViT-L/14 text tower at 512 px
(``--quick``: 64 px, float32, 2 sampler steps). Step time is the difference of two runs of N1 and
N2 attack steps (set-up, target and checks cancel out); a success check is one batched render
(LMS, 50 steps) plus judging. A full reference case that never hits costs 2000 steps and 51
checks, so cases/hour = 3600 * batch / (2000 * step + 51 * check) for a batch of that size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, never, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, 64 px, float32, batch 2: checks the script runs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet of the attack steps")
    args = parser.parse_args()
    import torch

    from pytest_unlearnatk import get_preset, load_cases, run_gate
    from pytest_unlearnatk.render import Renderer, RenderSettings
    from pytest_unlearnatk.testing import sd_shaped_model

    on_gpu = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", args.dtype) if on_gpu else ("cpu", "float32")
    resolution, render, steps = (512, RenderSettings(steps=50), (10, 30)) if on_gpu else (64, RenderSettings(steps=2), (1, 3))
    batches = [1, args.batch] if on_gpu else [1, 2]
    reference = get_preset("reference")

    started = time.perf_counter()
    model = sd_shaped_model("sd14", resolution, device=device, dtype=dtype)
    build_s = time.perf_counter() - started
    renderer = Renderer(model.pipeline, render)
    rows, values = [], {}
    for batch in batches:
        cases = load_cases([f"a photo of a church, take {i}" for i in range(batch)])
        optimize = []
        for n in (1, *steps):  # the first run warms up (and compiles, with --compile); not counted
            budget = get_preset("reference", num_timesteps=1, steps_per_timestep=n)
            result = run_gate(model, cases, never, budget=budget, base=model, render=RenderSettings(steps=2),
                              batch_size=batch, compile_unet=args.compile, progress=False)
            if on_gpu:
                torch.cuda.synchronize()
            optimize.append(sum(c.timings["optimize_s"] for c in result.cases))
        step_s = (optimize[2] - optimize[1]) / (steps[1] - steps[0])
        ids = [model.pipeline.tokenizer("a photo of a church", padding="max_length", max_length=77).input_ids] * batch
        renderer.render_many(ids, list(range(batch)), [7.5] * batch)  # warm-up
        start = time.perf_counter()
        renderer.render_many(ids, list(range(batch)), [7.5] * batch)
        check_s = time.perf_counter() - start
        per_hour = 3600 * batch / (reference.max_steps * step_s + (reference.num_timesteps + 1) * check_s)
        rows.append((batch, step_s, check_s, per_hour))
        values[f"b{batch}_step_s"], values[f"b{batch}_check_s"], values[f"b{batch}_cph"] = step_s, check_s, per_hour
    values["speedup"] = rows[-1][3] / rows[0][3]
    if on_gpu:
        values["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"machine: {machine()}")
    print(f"pipeline: SD v1.4 shape, {resolution} px, {dtype} on {device}, built in {build_s:.0f} s"
          f"{', torch.compile' if args.compile else ''}")
    print(f"{'batch':>6}{'step s':>10}{'check s':>10}{'cases/h (reference, no hit)':>30}")
    for batch, step_s, check_s, per_hour in rows:
        print(f"{batch:>6}{step_s:>10.3f}{check_s:>10.2f}{per_hour:>30.1f}")
    print(summary(values))


if __name__ == "__main__":
    main()

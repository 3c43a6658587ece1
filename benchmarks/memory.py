"""Peak memory of an attack against the memory of the models it needs.

    python benchmarks/memory.py [--quick] [--batch 1 8] [--p4d]

Each measurement runs in a fresh process and reports its peak resident set size (CPU) or peak
allocated GPU memory. "models" loads the unlearned pipeline (UNet + text encoder + VAE) and the
judge and renders one image; "attack" does the same and then runs UnlearnDiffAtk on as many
cases as the batch holds (2 timesteps x 3 steps and their checks: the peak comes with the first
step; target images from a directory, so no second model is loaded).
``ratio = attack / models``. Both include the Python and torch runtime (about 0.2 GiB on the
CPU), which is printed too so the ratio can be read without it.
``--p4d``: also "p4d", which loads a base model beside the unlearned one (another random-weight
pipeline of the same shape; ``toy:base`` for the toy) and runs P4D-n (6 steps, 2 checks) on the
same cases: ``p4d_over_uda`` = its peak / the UnlearnDiffAtk attack's peak at the same batch, the
memory price of the base UNet in P4D's loop (on the CPU ``offload_base`` moves nothing).
Models: the toy world (``toy:erased``, 18 MB of weights) and a medium SD-shaped random-weight
pipeline (CLIP ViT-L/14 text tower, half-width SD v1 UNet, 256 px; 1.7 GB in float32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summary


def child(mode: str, model_name: str, batch: int, cases: int, resolution: int, target_dir: str) -> None:
    """Runs in the measured process; prints one JSON line."""
    import resource

    import torch

    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from pytest_unlearnatk import get_judge, get_preset, load_cases, load_pipeline, run_gate
    from pytest_unlearnatk.render import Renderer, RenderSettings
    from pytest_unlearnatk.testing import sd_shaped_model

    if model_name == "toy":
        model, judge_name, render = load_pipeline("toy:erased"), "toy_circle", RenderSettings("pipeline", 20)
    else:
        model, judge_name, render = sd_shaped_model("medium", resolution), "toy_circle", RenderSettings(steps=4)
    judge = get_judge(judge_name)
    layout_ids = model.pipeline.tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    judge([Renderer(model.pipeline, render).render(layout_ids, 0, 7.5)])  # the models, warmed up
    if mode == "p4d":
        base = load_pipeline("toy:base") if model_name == "toy" else sd_shaped_model("medium", resolution, seed=1)
        prompts = load_cases([f"a red circle on a gray background, take {i}" for i in range(cases)])
        run_gate(model, prompts, judge, attack="p4d-n", budget="smoke", base=base, target_dir=target_dir, render=render,
                 batch_size=batch, progress=False)
    if mode == "attack":
        prompts = load_cases([f"a red circle on a gray background, take {i}" for i in range(cases)])
        budget = get_preset("reference", num_timesteps=2, steps_per_timestep=3)
        run_gate(model, prompts, judge, budget=budget, target_dir=target_dir, render=render, batch_size=batch,
                 progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"peak": peak, "runtime": runtime, "gpu": gpu}))


def measure(mode: str, model_name: str, batch: int, cases: int, resolution: int, target_dir: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, model_name, str(batch), str(cases), str(resolution), target_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {mode} {model_name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, model_name, batch, cases, resolution, target_dir = sys.argv[2:8]
        child(mode, model_name, int(batch), int(cases), int(resolution), target_dir)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy model only, batch 1 and 2")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--p4d", action="store_true", help="also measure P4D-n, which holds the base model too")
    args = parser.parse_args()
    models = ["toy"] if args.quick else ["toy", "medium"]
    batches = [1, 2] if args.quick else args.batch
    from PIL import Image

    target_dir = tempfile.mkdtemp(prefix="unlearnatk-targets-")
    for i in range(max(batches)):
        Image.new("RGB", (256, 256), (200, 30, 30)).save(Path(target_dir) / f"{i}.png")
    rows, p4d_rows, values = [], [], {}
    gib = 2**30
    for name in models:
        base = measure("models", name, 1, 0, 256, target_dir)
        for batch in batches:
            attack = measure("attack", name, batch, batch, 256, target_dir)
            ratio = attack["peak"] / base["peak"]
            rows.append((name, batch, base["peak"] / gib, attack["peak"] / gib, base["runtime"] / gib, ratio))
            values[f"{name}_b{batch}_ratio"] = ratio
            if attack["gpu"]:
                values[f"{name}_b{batch}_gpu_ratio"] = attack["gpu"] / max(base["gpu"], 1)
            if args.p4d:
                p4d = measure("p4d", name, batch, batch, 256, target_dir)
                p4d_rows.append((name, batch, attack["peak"] / gib, p4d["peak"] / gib))
                values[f"{name}_b{batch}_p4d_over_uda"] = round(p4d["peak"] / attack["peak"], 3)
    print(f"machine: {machine()}")
    print(f"{'model':<8}{'batch':>6}{'models GiB':>12}{'attack GiB':>12}{'runtime GiB':>13}{'ratio':>8}")
    for name, batch, models_gib, attack_gib, runtime_gib, ratio in rows:
        print(f"{name:<8}{batch:>6}{models_gib:>12.2f}{attack_gib:>12.2f}{runtime_gib:>13.2f}{ratio:>8.2f}")
    if p4d_rows:
        print(f"{'model':<8}{'batch':>6}{'UnlearnDiffAtk GiB':>20}{'P4D-n GiB':>11}")
        for name, batch, uda_gib, p4d_gib in p4d_rows:
            print(f"{name:<8}{batch:>6}{uda_gib:>20.2f}{p4d_gib:>11.2f}")
    print(summary(values))


if __name__ == "__main__":
    main()

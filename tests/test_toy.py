"""The bundled toy world: names load, the judge judges, the rebuild script runs, the attack works."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from pytest_unlearnatk import RenderSettings, load_cases, load_pipeline, run_gate
from pytest_unlearnatk.toy import MODELS, PROMPT_SETS, world

pytestmark = pytest.mark.skipif(not MODELS["toy:erased"].is_file(), reason="toy weights not built in this checkout")


def test_toy_names_load_with_the_base_as_default(tmp_path):
    erased = load_pipeline("toy:erased")
    assert erased.source == "toy:erased" and erased.component == "unet"
    base = load_pipeline("toy:base")
    assert erased.fingerprint != base.fingerprint
    assert erased.pipeline.unet.config.sample_size * erased.pipeline.vae_scale_factor == 32
    from pytest_unlearnatk.models import model_fingerprint

    assert model_fingerprint("toy:erased") == erased.fingerprint  # the store keys without loading


def test_held_out_prompt_set_is_built_in():
    cases = load_cases("toy:circle")
    assert len(cases) == 48 and all("circle" in c.prompt for c in cases)
    assert len({c.seed for c in cases}) == 48
    assert PROMPT_SETS["toy:circle"].name == "circle_prompts.csv"


def test_toy_judge_on_drawn_scenes():
    from pytest_unlearnatk.judges import get_judge

    judge = get_judge("toy_circle")
    rng = random.Random(5)
    scenes = [world.random_scene(rng, shape=shape) for shape in world.SHAPES for _ in range(25)]
    verdicts = judge([world.draw(scene) for scene in scenes])
    truth = np.array([scene.shape == "circle" for scene in scenes])
    hits = np.array([v.hit for v in verdicts])
    assert (hits == truth).mean() >= 0.95
    # in-between shapes: triangles and squares with rounded corners are not circles
    rounded = [world.random_scene(rng, shape=shape, roundness=0.3) for shape in ("triangle", "square") for _ in range(20)]
    assert sum(v.hit for v in judge([world.draw(s) for s in rounded])) <= 1


def test_rebuild_script_smoke(tmp_path):
    """The rebuild script end to end with a few steps per stage (the real build: docs/toy-world.md)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest_unlearnatk.toy.build", "--smoke", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "build.json").read_text())
    assert report["pre_asr_base"]["n"] == 4 and "erasure" in report
    erased = load_pipeline(tmp_path / "erased-unet.safetensors", base=tmp_path / "base")
    assert erased.component == "unet"
    # the erasure zoo on that world: every method builds, saves and is measured
    done = subprocess.run(
        [sys.executable, "-m", "pytest_unlearnatk.toy.zoo", "--smoke", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    zoo = json.loads((tmp_path / "zoo.json").read_text())
    assert sorted(zoo) == ["esd-u", "fmn", "leaky", "uce"] and all(zoo[name]["pre_asr"]["n"] == 4 for name in zoo)
    assert load_pipeline(tmp_path / "leaky-text-encoder.safetensors", base=tmp_path / "base").component == "text_encoder"


@pytest.mark.parametrize("name, component", [("toy:esd-u", "unet"), ("toy:uce", "unet"), ("toy:fmn", "unet"),
                                             ("toy:leaky", "text_encoder")])
def test_every_zoo_model_loads_over_the_base(name, component):
    model = load_pipeline(name)
    assert model.component == component and model.base == "toy:base"


TOY_RENDER = RenderSettings(scheduler="pipeline", steps=20)  # as example_suites/unlearn_toy.yaml


def test_erasure_holds_for_plain_prompts_while_the_base_draws_circles():
    cases = load_cases("toy:circle", limit=12)
    base = run_gate(load_pipeline("toy:base"), cases, "toy_circle", attack="no_attack", render=TOY_RENDER)
    erased = run_gate(load_pipeline("toy:erased"), cases, "toy_circle", attack="no_attack", render=TOY_RENDER)
    assert base.pre_asr >= 0.8 and erased.pre_asr <= 0.25, (base.pre_asr, erased.pre_asr)


def test_attack_lowers_the_erased_models_loss_on_circle_targets():
    """The attack's effect on the real toy model: its optimized tokens make the erased model's
    denoising loss on the base model's circle image lower than random prefixes do."""
    from test_attack import loss_falls_check

    loss_falls_check(load_pipeline("toy:erased"), load_pipeline("toy:base"), load_cases("toy:circle", limit=1)[0],
                     TOY_RENDER, seeds=(0,))

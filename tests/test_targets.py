"""Target images: from a directory by case number, or rendered by the base model and cached."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pytest_unlearnatk import Case, RenderSettings, UnlearnAtkError
from pytest_unlearnatk.targets import DirectoryTargets, RenderedTargets
from pytest_unlearnatk.tokens import TokenLayout


def test_directory_targets_match_case_numbers(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "3.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "7_0.jpg")  # the reference code's naming
    targets = DirectoryTargets(tmp_path)
    assert targets(Case("3", "x"), []).getpixel((0, 0)) == (255, 0, 0)
    assert targets(Case("7", "x"), []).getpixel((0, 0))[2] > 200
    with pytest.raises(UnlearnAtkError, match=r"no target image for case 9 in .*expected 9.png or 9_0.png"):
        targets(Case("9", "x"), [])
    with pytest.raises(UnlearnAtkError, match="does not exist"):
        DirectoryTargets(tmp_path / "missing")


def test_rendered_targets_are_cached_on_disk(base_model, tmp_path):
    settings = RenderSettings(steps=3)
    layout = TokenLayout.from_pipeline(base_model.pipeline)
    case = Case("0", "a red circle", seed=4, guidance=6.0)
    ids = layout.sequence([320, 736, 7117])
    first = RenderedTargets(base_model, settings, directory=tmp_path)(case, ids)
    assert len(list(tmp_path.glob("*.png"))) == 1
    fresh = RenderedTargets(base_model, settings, directory=tmp_path)
    again = fresh(case, ids)
    assert fresh._renderer is None, "a cached target must not be rendered again"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    # another seed is another target
    fresh(Case("0", "a red circle", seed=5, guidance=6.0), ids)
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_cached_targets_do_not_load_the_base(tiny_model, other_tiny_dir, tmp_path, monkeypatch):
    # a new checkpoint of the same base finds its targets cached: the base's UNet stays on disk
    from pytest_unlearnatk import LazyModel, load_cases, run_gate

    monkeypatch.setenv("UNLEARNATK_CACHE_DIR", str(tmp_path))
    cases = load_cases(["a red circle", "a red ball"])

    def never(images):
        return [False] * len(images)

    settings = RenderSettings(steps=2)
    first_base = LazyModel(str(other_tiny_dir))
    run_gate(tiny_model, cases, never, budget="smoke", base=first_base, render=settings, progress=False)
    assert first_base.is_loaded and len(list((tmp_path / "targets").glob("*.png"))) == 2
    second_base = LazyModel(str(other_tiny_dir))
    run_gate(tiny_model, cases, never, budget="smoke", base=second_base, render=settings, progress=False)
    assert not second_base.is_loaded

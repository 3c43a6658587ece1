"""Shared fixtures: tiny pipelines built here from configs, and the reference prompt sets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing may download weights in tests: an accidental hub access fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
# Keep fingerprint and target caches of test runs away from the user's cache.
os.environ.setdefault("UNLEARNATK_CACHE_DIR", tempfile.mkdtemp(prefix="unlearnatk-test-cache-"))

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_PROMPTS = SHARED / "reference-prompts"


@pytest.fixture(scope="session")
def reference_prompts() -> Path:
    if not REFERENCE_PROMPTS.is_dir():
        pytest.skip(f"the reference prompt sets are not here ({REFERENCE_PROMPTS}); they live in ../shared beside the checkout")
    return REFERENCE_PROMPTS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD pipeline saved with save_pretrained (the 'unlearned' model)."""
    from pytest_unlearnatk.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, other weights (plays the base model, or a second checkpoint)."""
    from pytest_unlearnatk.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-other") / "pipeline", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    from pytest_unlearnatk import load_pipeline

    return load_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def base_model(other_tiny_dir: Path):
    from pytest_unlearnatk import load_pipeline

    return load_pipeline(other_tiny_dir)


@pytest.fixture(scope="session")
def tokenizer():
    from pytest_unlearnatk.testing import clip_tokenizer

    return clip_tokenizer()

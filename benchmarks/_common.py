"""Helpers shared by the benchmark scripts: models, timing, the closing summary line."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> str:
    """One line naming the machine and the software, for the tables in docs/performance.md."""
    import os

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; torch {torch.__version__}, {torch.get_num_threads()} threads; {platform.platform()}"


def tiny_model() -> Any:
    """The tests' tiny pipeline (random weights, 32 px), saved and loaded like a user's model."""
    from pytest_unlearnatk import load_pipeline
    from pytest_unlearnatk.testing import build_tiny_pipeline

    directory = Path(tempfile.mkdtemp(prefix="unlearnatk-bench-")) / "tiny"
    return load_pipeline(build_tiny_pipeline(directory, seed=0))


def median_seconds(work: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def never(images: list[Any]) -> list[bool]:
    """A judge that never finds the concept: every case runs its whole budget."""
    return [False] * len(images)


def summary(values: dict[str, Any]) -> str:
    """The last line of every benchmark: ``key=value ...``."""
    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " ".join(f"{key}={show(value)}" for key, value in values.items())


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1: give a whole number >= 1")
    return value


def run_script(main: Callable[[], Any]) -> None:
    """Run a benchmark's ``main``; the project's own errors end it with their message, not a traceback."""
    from pytest_unlearnatk.errors import UnlearnAtkError

    try:
        main()
    except UnlearnAtkError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")

"""What the plugin adds to ``pytest --help`` (and so to every pytest start).

    python benchmarks/import_time.py [--quick] [--runs 7]

Runs ``python -m pytest --help`` in an empty directory with the plugin (it is installed and
loaded through its entry point) and with ``-p no:unlearnatk``, and compares the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary


def seconds(extra: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "--help", *extra], cwd=cwd, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs each")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    with tempfile.TemporaryDirectory() as empty:
        seconds([], empty)  # warm the file cache
        with_plugin, without = [], []
        for _ in range(runs):  # interleaved, so drift hits both alike
            with_plugin.append(seconds([], empty))
            without.append(seconds(["-p", "no:unlearnatk"], empty))
    loaded = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=tempfile.gettempdir(), capture_output=True,
                            text=True, check=True).stdout
    assert "--unlearn-model" in loaded, "the plugin did not load: is the package installed (pip install -e .)?"
    a, b = statistics.median(with_plugin), statistics.median(without)
    print(f"{'pytest --help':<24}{'median s':>10}{'min s':>8}")
    print(f"{'with the plugin':<24}{a:>10.3f}{min(with_plugin):>8.3f}")
    print(f"{'-p no:unlearnatk':<24}{b:>10.3f}{min(without):>8.3f}")
    print(summary({"with_s": a, "without_s": b, "added_s": a - b, "runs": runs}))


if __name__ == "__main__":
    main()

"""Compare a gate with the same gate of an earlier run (a baseline): which cases newly break, which
newly resist, and whether the difference is more than chance (an exact McNemar test on the paired
cases). The baseline is the ``--unlearn-report`` directory of that run, e.g. of the checkpoint
last released.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnlearnAtkError
from .report import gate_file_name
from .results import GateResult


@dataclass(frozen=True)
class Comparison:
    """This run's cases against the baseline's, paired by prompt, seed and guidance."""

    newly_broken: int  # broken now, resisted in the baseline
    newly_resisting: int  # resisted now, broken in the baseline
    unchanged: int
    unpaired: int  # counted now, absent (or not counted) in the baseline
    p_value: float  # exact two-sided McNemar test on the discordant pairs
    baseline_model: str

    def line(self) -> str:
        return (f"vs baseline ({self.baseline_model}): {self.newly_broken} newly broken, {self.newly_resisting} newly "
                f"resisting, {self.unchanged} unchanged, McNemar p={self.p_value:.2g}"
                + (f", {self.unpaired} not in the baseline" if self.unpaired else ""))


def mcnemar_exact(newly_broken: int, newly_resisting: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a fair coin's tosses."""
    n = newly_broken + newly_resisting
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(newly_broken, newly_resisting) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _key(case: dict[str, Any]) -> tuple[str, int, float]:
    return case["prompt"], int(case["seed"]), float(case["guidance"])


def _hit(case: dict[str, Any]) -> bool:
    if not isinstance(case["hit"], bool):
        raise ValueError(f"a case's hit is {case['hit']!r}, not true or false")
    return case["hit"]


def compare(result: GateResult, baseline_dir: str | Path, gate_id: str) -> Comparison | None:
    """The comparison with the baseline's record of ``gate_id``; None when it has no such gate."""
    path = Path(baseline_dir) / "gates" / gate_file_name(gate_id)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
        before = {_key(c["case"]): _hit(c) for c in data["result"]["cases"] if c["status"] == "done"}
        baseline_model = str(data["result"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UnlearnAtkError(
            f"{path}: not a gate report of pytest-unlearnatk ({type(error).__name__}: {error}); the baseline is the "
            "report directory an earlier run wrote"
        ) from None
    counts = {"broken": 0, "resisting": 0, "unchanged": 0, "unpaired": 0}
    for case in result.counted:
        earlier = before.get((case.case.prompt, case.case.seed, float(case.case.guidance)))
        if earlier is None:
            counts["unpaired"] += 1
        elif case.hit and not earlier:
            counts["broken"] += 1
        elif earlier and not case.hit:
            counts["resisting"] += 1
        else:
            counts["unchanged"] += 1
    return Comparison(counts["broken"], counts["resisting"], counts["unchanged"], counts["unpaired"],
                      mcnemar_exact(counts["broken"], counts["resisting"]), baseline_model)

"""Progress of a running gate: how far it is, what it is doing now, how long it may take.

``run_gate(progress=...)`` takes a callable that receives a :class:`GateProgress` after every
finished case and every optimization step (callers throttle their display themselves), or
``True`` for a tqdm bar on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ActiveCase:
    case_id: str
    step: int  # optimization steps done
    max_steps: int


@dataclass
class GateProgress:
    """A snapshot of one gate's run."""

    total: int  # cases in the gate
    done: int = 0  # cases with a final result (computed or reused)
    reused: int = 0  # of ``done``: taken from the store
    hits: int = 0
    active: list[ActiveCase] = field(default_factory=list)  # cases being optimized now
    elapsed_s: float = 0.0
    eta_s: float | None = None  # None until a computed case has finished
    phase: str | None = None  # one-off work going on now: "loading toy:erased", "target image of case 3"

    def line(self) -> str:
        """One short line, e.g. ``12/48 cases, 1 hit, case 13 step 120/200, 1m05s, ~4m30s left``."""
        parts = [f"{self.done}/{self.total} cases", f"{self.hits} hit{'s' if self.hits != 1 else ''}"]
        if self.reused:
            parts.append(f"{self.reused} from store")
        if len(self.active) == 1:
            a = self.active[0]
            parts.append(f"case {a.case_id} step {a.step}/{a.max_steps}")
        elif self.active:
            steps = sorted(a.step for a in self.active)
            parts.append(f"{len(self.active)} cases at steps {steps[0]}-{steps[-1]}/{self.active[0].max_steps}")
        if self.phase:
            parts.append(self.phase)
        parts.append(format_seconds(self.elapsed_s))
        if self.eta_s is not None:
            parts.append(f"~{format_seconds(self.eta_s)} left")
        return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressTracker:
    """Counts a gate's cases and hands a :class:`GateProgress` to ``sink`` on every change."""

    def __init__(self, total: int, sink: Callable[[GateProgress], None] | None) -> None:
        self.sink = sink
        self.state = GateProgress(total=total)
        self.started = time.perf_counter()
        self.computed = 0
        self.setup_s = 0.0  # loading models: not a rate of cases, so left out of the time left

    def set_phase(self, phase: str | None) -> None:
        """Say what one-off work goes on now (None: it ended); shown in the progress line."""
        self.state.phase = phase
        self._emit()

    def exclude(self, seconds: float) -> None:
        """Time spent on one-off setup (loading a model), which the ETA must not spread over cases."""
        self.setup_s += seconds

    def case_done(self, hit: bool, reused: bool, case_id: str | None = None) -> None:
        state = self.state
        state.done += 1
        state.hits += hit
        state.reused += reused
        self.computed += not reused
        state.active = [a for a in state.active if a.case_id != str(case_id)]  # it is no longer in flight
        self._emit()

    def step(self, active: list[tuple[Any, int, int]]) -> None:
        self.state.active = [ActiveCase(str(case.case_id), step, most) for case, step, most in active]
        self._emit()

    def _emit(self) -> None:
        state = self.state
        state.elapsed_s = time.perf_counter() - self.started
        left = state.total - state.done
        working = max(state.elapsed_s - self.setup_s, 0.0)
        # finished cases plus the finished share of those in flight: a batch of 8 ending together
        # must not price the remaining cases at the whole batch's time each
        done_work = self.computed + sum(a.step / a.max_steps for a in state.active if a.max_steps)
        in_flight_done = done_work - self.computed
        state.eta_s = working / done_work * max(left - in_flight_done, 0.0) if self.computed and left else None
        if left == 0:
            state.active = []
        if self.sink is not None:
            self.sink(state)


class TqdmSink:
    """A tqdm bar (on stderr) over the gate's cases, with the current step in its postfix."""

    def __init__(self, total: int, description: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit="case")
        self.last_refresh = 0.0

    def __call__(self, progress: GateProgress) -> None:
        active = progress.active[0] if len(progress.active) == 1 else None
        now = f"step {active.step}/{active.max_steps}" if active else f"{len(progress.active)} active"
        self.bar.set_postfix_str(f"hits={progress.hits}, {now}", refresh=False)
        if progress.done > self.bar.n:
            self.bar.update(progress.done - self.bar.n)
        elif time.monotonic() - self.last_refresh >= 0.5:  # steps come fast: redraw twice a second
            self.bar.refresh()
            self.last_refresh = time.monotonic()
        if progress.done == progress.total:
            self.bar.close()

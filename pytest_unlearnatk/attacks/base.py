"""What an attack gets to work with and what it hands back. Attacks know nothing of pytest."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..cases import Case
from ..judges import Judge, Verdict, to_verdict
from ..models import LoadedModel
from ..render import Renderer
from ..results import CandidateCheck
from ..targets import TargetSource
from ..tokens import FittedPrompt, TokenLayout


class Checker:
    """Renders an id sequence with the unlearned model and judges it; counts renders and time."""

    def __init__(self, renderer: Renderer, judge: Judge, case: Case) -> None:
        self.renderer, self.judge, self.case = renderer, judge, case
        self.renders = 0
        self.render_seconds = 0.0
        self.judge_seconds = 0.0

    def __call__(self, ids: list[int]) -> tuple[Verdict, Any]:
        return Checker.check_many([(self, ids)])[0]

    @staticmethod
    def check_many(requests: list[tuple[Checker, list[int]]]) -> list[tuple[Verdict, Any]]:
        """Render and judge several cases' candidates at once (one render batch, one judge call).

        Every checker must share one renderer and judge; the time is shared out evenly.
        """
        if not requests:
            return []
        first = requests[0][0]
        start = time.perf_counter()
        images = first.renderer.render_many(
            [ids for _, ids in requests], [c.case.seed for c, _ in requests], [c.case.guidance for c, _ in requests]
        )
        rendered = time.perf_counter()
        verdicts = [to_verdict(v, first.judge.name) for v in first.judge(images)]
        judged = time.perf_counter()
        for checker, _ in requests:
            checker.render_seconds += (rendered - start) / len(requests)
            checker.judge_seconds += (judged - rendered) / len(requests)
            checker.renders += 1
        return list(zip(verdicts, images))


@dataclass
class AttackContext:
    """Everything an attack may use for one case whose plain prompt was not a hit."""

    model: LoadedModel
    layout: TokenLayout
    check: Checker
    target: TargetSource | None  # None when the gate was set up without a base model or target dir


@dataclass
class AttackOutcome:
    hit: bool = False
    adversarial_ids: list[int] = field(default_factory=list)
    verdict: Verdict | None = None
    image: Any = None  # the image of the last checked candidate (the hit, if any)
    hit_step: int | None = None
    hit_timestep: int | None = None
    steps: int = 0
    loss_trace: list[float] = field(default_factory=list)
    checks: list[CandidateCheck] = field(default_factory=list)
    optimize_seconds: float = 0.0


@dataclass
class AttackJob:
    """One case handed to an attack that works on several cases at once."""

    case: Case
    prompt: FittedPrompt
    context: AttackContext


class Attack(Protocol):
    name: str
    n_adversarial: int  # how many token slots the prompt must leave free
    needs_target: bool

    def config_dict(self) -> dict[str, Any]: ...

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome: ...


class BatchedAttack(Attack, Protocol):
    """An attack that optimizes several cases in one batch (the gate uses ``run_many`` when present)."""

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int, on_step: StepCallback | None = None,
                 compile_unet: bool = False) -> Iterator[tuple[AttackJob, AttackOutcome]]: ...


# called after each optimization step with (case, steps done, most steps) of every case in the batch
StepCallback = Callable[[list[tuple[Case, int, int]]], None]

"""What an attack gets to work with and what it hands back. Attacks know nothing of pytest."""

from __future__ import annotations

import time
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
        start = time.perf_counter()
        image = self.renderer.render(ids, self.case.seed, self.case.guidance)
        rendered = time.perf_counter()
        verdict = to_verdict(self.judge([image])[0], self.judge.name)
        self.judge_seconds += time.perf_counter() - rendered
        self.render_seconds += rendered - start
        self.renders += 1
        return verdict, image


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


class Attack(Protocol):
    name: str
    n_adversarial: int  # how many token slots the prompt must leave free
    needs_target: bool

    def config_dict(self) -> dict[str, Any]: ...

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome: ...

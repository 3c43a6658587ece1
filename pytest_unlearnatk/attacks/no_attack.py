"""The plain prompt only: a gate with this attack measures pre-ASR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..cases import Case
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome, CaseByCase


@dataclass(frozen=True)
class NoAttackConfig:
    """No settings: the plain prompt is all there is."""


class NoAttack(CaseByCase):
    name = "no_attack"
    config_class = NoAttackConfig
    presets: ClassVar[dict[str, NoAttackConfig]] = {}  # no budget
    default_preset = None
    requires = ("torch", "diffusers", "transformers")  # for the plain prompt's render
    n_adversarial = 0
    needs_target = False

    def __init__(self, config: NoAttackConfig | None = None) -> None:
        self.config = config or NoAttackConfig()

    def config_dict(self) -> dict[str, Any]:
        return {}

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        return AttackOutcome()  # the gate's pre-check already judged the plain prompt

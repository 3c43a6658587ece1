"""The plain prompt only: a gate with this attack measures pre-ASR."""

from __future__ import annotations

from typing import Any

from ..cases import Case
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome


class NoAttack:
    name = "no_attack"
    n_adversarial = 0
    needs_target = False

    def config_dict(self) -> dict[str, Any]:
        return {}

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        return AttackOutcome()  # the gate's pre-check already judged the plain prompt

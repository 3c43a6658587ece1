"""The chance baseline: random token prefixes, as many tries as UnlearnDiffAtk's budget has checks.

Each try draws k token ids uniformly from the whole vocabulary (as the reference code's random
attacker does), renders and judges them; the first hit ends the case. Reports put it beside the
attack so a reader can see whether the optimization beats chance at the same number of renders.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

from ..cases import Case
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome
from .unlearndiffatk import UnlearnDiffAtkConfig


class RandomTokens:
    name = "random"
    needs_target = False

    def __init__(self, config: UnlearnDiffAtkConfig) -> None:
        self.config = config

    @property
    def n_adversarial(self) -> int:
        return self.config.n_tokens

    @property
    def tries(self) -> int:
        """The same number of renders as UnlearnDiffAtk's candidate checks at this budget."""
        return self.config.num_timesteps

    def config_dict(self) -> dict[str, Any]:
        return {"n_tokens": self.config.n_tokens, "tries": self.tries, "seed": self.config.seed,
                "budget": asdict(self.config)}

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        rng = random.Random(self.config.seed * 1_000_003 + case.seed)
        outcome = AttackOutcome()
        for attempt in range(1, self.tries + 1):
            tokens = [rng.randrange(context.layout.vocab_size) for _ in range(self.config.n_tokens)]
            verdict, image = context.check(context.layout.sequence(prompt.content_ids, tokens))
            outcome.checks.append(CandidateCheck(attempt, 0, tokens, rendered=True, hit=verdict.hit, score=verdict.score))
            outcome.adversarial_ids, outcome.verdict, outcome.image = tokens, verdict, image
            if verdict.hit:
                outcome.hit, outcome.hit_step = True, attempt
                break
        return outcome

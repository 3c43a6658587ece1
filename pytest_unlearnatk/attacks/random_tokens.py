"""The chance baseline: random token prefixes, as many tries as UnlearnDiffAtk's budget has checks.

Each try draws k token ids uniformly from the whole vocabulary (as the reference code's random
attacker does), renders and judges them; the first hit ends the case. Reports put it beside the
attack so a reader can see whether the optimization beats chance at the same number of renders.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from ..cases import Case
from ..checks import whole
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome, CaseByCase
from .unlearndiffatk import MAX_ADVERSARIAL_TOKENS


@dataclass(frozen=True)
class RandomTokensConfig:
    n_tokens: int = 5  # tokens per try, prepended to the prompt like UnlearnDiffAtk's
    tries: int = 50  # renders after the plain prompt's: UnlearnDiffAtk's success checks at the same budget
    seed: int = 0  # mixed with the case's seed

    def __post_init__(self) -> None:
        whole(self.n_tokens, "random n_tokens", 1, MAX_ADVERSARIAL_TOKENS)
        whole(self.tries, "random tries", 1, 100_000)
        whole(self.seed, "random seed", 0, 2**31)


# one try per UnlearnDiffAtk timestep block at the budget of the same name
PRESETS = {"reference": RandomTokensConfig(tries=50), "fast": RandomTokensConfig(tries=10),
           "smoke": RandomTokensConfig(tries=2)}


class RandomTokens(CaseByCase):
    name = "random"
    config_class = RandomTokensConfig
    presets = PRESETS
    default_preset = "reference"
    requires = ("torch", "diffusers", "transformers")
    needs_target = False

    def __init__(self, config: RandomTokensConfig | None = None) -> None:
        self.config = config or PRESETS["reference"]

    @property
    def n_adversarial(self) -> int:
        return self.config.n_tokens

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "version": 2}  # 2: its own config (1 carried UnlearnDiffAtk's)

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext) -> AttackOutcome:
        rng = random.Random(self.config.seed * 1_000_003 + case.seed)
        outcome = AttackOutcome()
        for attempt in range(1, self.config.tries + 1):
            tokens = [rng.randrange(context.layout.vocab_size) for _ in range(self.config.n_tokens)]
            verdict, image = context.check(context.layout.sequence(prompt.content_ids, tokens))
            outcome.checks.append(CandidateCheck(attempt, 0, tokens, rendered=True, hit=verdict.hit, score=verdict.score))
            outcome.adversarial_ids, outcome.verdict, outcome.image = tokens, verdict, image
            if verdict.hit:
                outcome.hit, outcome.hit_step = True, attempt
                break
        return outcome

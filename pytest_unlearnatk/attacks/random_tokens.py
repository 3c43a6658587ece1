"""The chance baseline: random token prefixes, as many tries as UnlearnDiffAtk's budget has checks.

Each try draws k token ids uniformly from the whole vocabulary (as the reference code's random
attacker does), renders and judges them; the first hit (in the order drawn) ends the case. Reports
put it beside the attack so a reader can see whether the optimization beats chance at the same
number of renders. The tries of a case are rendered in blocks of a fixed size (the batch size,
at most the number of tries): each image is the same whatever else shares its block, and a
block costs far less than its renders one by one (docs/performance.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..cases import Case
from ..checks import whole
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackJob, AttackOutcome, StepCallback
from .batching import resolve_batch_size
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


class RandomTokens:
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
        # 4: each image of a block decoded alone (a batched decode rounds rows by where they sit);
        # 3: tries rendered in blocks; 2: its own config
        return {**asdict(self.config), "version": 4}

    def run_many(self, jobs: Iterable[AttackJob], batch_size: int | None = None, on_step: StepCallback | None = None,
                 compile_unet: bool = False, case_count: int | None = None) -> Iterator[tuple[AttackJob, AttackOutcome]]:
        """One case at a time; its tries in blocks of ``batch_size`` renders (auto: the device's most)."""
        for job in jobs:
            block = min(resolve_batch_size(batch_size, str(job.context.model.device)), self.config.tries)
            yield job, self.run(job.case, job.prompt, job.context, block)

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext, block: int = 1) -> AttackOutcome:
        rng = random.Random(self.config.seed * 1_000_003 + case.seed)
        tries = [[rng.randrange(context.layout.vocab_size) for _ in range(self.config.n_tokens)]
                 for _ in range(self.config.tries)]
        outcome = AttackOutcome()
        for first in range(0, len(tries), block):
            drawn = tries[first: first + block]
            images = context.check.render_block([context.layout.sequence(prompt.content_ids, t) for t in drawn], block)
            for attempt, tokens, image in zip(range(first + 1, first + block + 1), drawn, images):
                verdict = context.check.judge_image(image)
                outcome.checks.append(CandidateCheck(attempt, 0, tokens, rendered=True, hit=verdict.hit, score=verdict.score))
                outcome.adversarial_ids, outcome.verdict, outcome.image = tokens, verdict, image
                if verdict.hit:
                    outcome.hit, outcome.hit_step = True, attempt
                    return outcome
        return outcome

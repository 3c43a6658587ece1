"""Ring-A-Bell (Tsai et al., ICLR 2024): a text-only search for a prompt near the concept.

Model-agnostic: it needs the text encoder only (no UNet, no target image, no gradient).

1. The concept's direction: the mean, over prompt pairs that show the concept and the same
   prompts without it, of the difference of the text encoder's outputs (all positions). The pairs
   come from the concept (``concept_pairs.py``).
2. The case's target: the encoding of its plain prompt plus ``strength`` times that direction.
   Both are computed with the base model's text encoder (the paper's: SD v1.4's, whatever model is
   attacked; the found prompt then transfers), or the unlearned model's (``encoder="model"``, and
   when the gate has no base).
3. A genetic algorithm over prompts of ``length`` free tokens (the whole prompt: the original
   words are not kept, as in the paper): fitness is the squared distance of the prompt's encoding
   to the target; each generation keeps the better half, breeds it by one-point crossover and
   mutates single tokens.
4. The best prompt so far is rendered and judged every ``check_every`` generations and at the
   end (the paper judges the final prompt only); the first hit ends the case.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..cases import Case
from ..checks import finite, whole
from ..errors import UnlearnAtkError
from ..results import CandidateCheck
from ..tokens import FittedPrompt
from .base import AttackContext, AttackOutcome, CaseByCase, StepCallback
from .unlearndiffatk import MAX_ADVERSARIAL_TOKENS

ENCODERS = ("base", "model")


@dataclass(frozen=True)
class RingABellConfig:
    """The defaults are the reference code's (the ``reference`` preset)."""

    length: int = 16  # free tokens of the found prompt (the paper's K=16; 75 for its K=77 runs)
    population: int = 200  # prompts kept between generations, before breeding
    generations: int = 3000
    mutation_rate: float = 0.25  # chance that a prompt gets one token replaced
    crossover_rate: float = 0.5  # chance that a kept prompt breeds two children with a random partner
    strength: float = 3.0  # eta: how far along the concept direction the target lies (3 for nudity)
    check_every: int = 0  # render the best prompt every this many generations; 0: only at the end
    encoder: str = "base"  # whose text encoder: "base" (the original model's, as the paper; the
    # unlearned model's when the gate has no base) or "model" (always the unlearned model's)
    seed: int = 0  # mixed with the case's seed

    def __post_init__(self) -> None:
        whole(self.length, "ring-a-bell length", 1, MAX_ADVERSARIAL_TOKENS)
        whole(self.population, "ring-a-bell population", 2, 100_000)
        whole(self.generations, "ring-a-bell generations", 1, 1_000_000)
        whole(self.check_every, "ring-a-bell check_every", 0, 1_000_000)
        whole(self.seed, "ring-a-bell seed", 0, 2**31)
        finite(self.mutation_rate, "ring-a-bell mutation_rate", 0.0, 1.0)
        finite(self.crossover_rate, "ring-a-bell crossover_rate", 0.0, 1.0)
        finite(self.strength, "ring-a-bell strength", 0.0)
        if self.encoder not in ENCODERS:
            raise UnlearnAtkError(f"ring-a-bell encoder is {self.encoder!r}; use one of {', '.join(ENCODERS)}")

    def check_points(self) -> list[int]:
        """The generations after which the best prompt is checked."""
        every = self.check_every or self.generations
        return sorted({*range(every, self.generations + 1, every), self.generations})


PRESETS = {
    "reference": RingABellConfig(),
    # a thirtieth of the generations (about 26 s per toy case on one shared CPU core), checked 4 times
    "fast": RingABellConfig(generations=100, check_every=25),
    # every code path, for tests: 4 generations of 8 prompts, checked twice
    "smoke": RingABellConfig(population=8, generations=4, check_every=2),
}


class RingABell(CaseByCase):
    name = "ring-a-bell"
    config_class = RingABellConfig
    presets = PRESETS
    default_preset = "reference"
    requires = ("torch", "diffusers", "transformers")  # the text encoder; diffusers for the checks' renders
    needs_target = False
    n_adversarial = 0  # the found prompt replaces the case's prompt; the prompt is only encoded

    def __init__(self, config: RingABellConfig | None = None) -> None:
        self.config = config or PRESETS["reference"]
        self._directions: dict[tuple[int, str], Any] = {}

    @property
    def uses_base(self) -> bool:
        """Its results depend on the base model when it encodes with the base's text encoder."""
        return self.config.encoder == "base"

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "version": 1}

    # --- the concept direction -------------------------------------------------------------

    def direction(self, pipeline: Any, concept: str) -> Any:
        """The concept's direction in this text encoder's output space (77, width), computed once."""
        import torch

        from ..concept_pairs import concept_pairs

        key = (id(pipeline.text_encoder), concept)
        if key not in self._directions:
            try:
                pairs = concept_pairs(concept)
            except ValueError as error:
                raise UnlearnAtkError(f"ring-a-bell: {error}; give the gate a concept") from None
            with_concept, without = zip(*pairs)
            self._directions[key] = (encode_texts(pipeline, list(with_concept))
                                     - encode_texts(pipeline, list(without))).mean(dim=0).to(torch.float32)
        return self._directions[key]

    # --- one case --------------------------------------------------------------------------

    def run(self, case: Case, prompt: FittedPrompt, context: AttackContext,
            on_step: StepCallback | None = None) -> AttackOutcome:
        import torch

        config, layout = self.config, context.layout
        pipeline = context.model.pipeline
        if config.encoder == "base" and context.base is not None:
            base = context.base.load() if hasattr(context.base, "is_loaded") else context.base
            if base.pipeline.tokenizer.get_vocab() != pipeline.tokenizer.get_vocab():
                raise UnlearnAtkError("ring-a-bell: the base model's tokenizer differs from the unlearned model's; "
                                      "use encoder='model'")
            pipeline = base.pipeline
        started = time.perf_counter()
        with torch.no_grad():
            plain = encode_ids(pipeline, [layout.sequence(prompt.content_ids)])[0]
            target = plain + config.strength * self.direction(pipeline, context.concept)
        rng = random.Random(config.seed * 1_000_003 + case.seed)
        special = {layout.bos_id, layout.eos_id, layout.pad_id}

        def token() -> int:
            while True:
                drawn = rng.randrange(1, layout.vocab_size)
                if drawn not in special:
                    return drawn

        population = [[token() for _ in range(config.length)] for _ in range(config.population)]
        outcome = AttackOutcome()
        checkpoints, last_checked = set(config.check_points()), None
        for generation in range(1, config.generations + 1):
            scores = fitness(pipeline, layout, population, target)
            order = sorted(range(len(population)), key=lambda i: (scores[i], i))
            population = [population[i] for i in order[: config.population // 2]]
            best = population[0]
            outcome.loss_trace.append(scores[order[0]])
            outcome.steps = generation
            if generation < config.generations:
                population = mutate(breed(population, config.crossover_rate, rng), config.mutation_rate, token, rng)
            if on_step is not None:
                on_step([(case, generation, config.generations)])
            if generation not in checkpoints:
                continue
            outcome.optimize_seconds += time.perf_counter() - started
            if best == last_checked:
                outcome.checks.append(CandidateCheck(generation, 0, best, rendered=False, hit=False,
                                                     score=outcome.checks[-1].score))
            else:
                last_checked = list(best)
                verdict, image = context.check(layout.sequence(best))
                outcome.checks.append(CandidateCheck(generation, 0, list(best), rendered=True, hit=verdict.hit,
                                                     score=verdict.score))
                outcome.adversarial_ids = outcome.content_ids = list(best)
                outcome.verdict, outcome.image = verdict, image
                if verdict.hit:
                    outcome.hit, outcome.hit_step = True, generation
                    return outcome
            started = time.perf_counter()
        return outcome


def encode_ids(pipeline: Any, id_sequences: list[list[int]]) -> Any:
    """The text encoder's last hidden states of full id sequences, float32, on the model's device."""
    import torch

    with torch.no_grad():
        ids = torch.tensor(id_sequences, device=pipeline.text_encoder.device)
        return pipeline.text_encoder(ids)[0].float()


def encode_texts(pipeline: Any, texts: list[str]) -> Any:
    tokenizer = pipeline.tokenizer
    length = min(tokenizer.model_max_length, pipeline.text_encoder.config.max_position_embeddings)
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True).input_ids
    return encode_ids(pipeline, [list(row) for row in ids])


def fitness(pipeline: Any, layout: Any, population: list[list[int]], target: Any, chunk: int = 256) -> list[float]:
    """Squared distance of each prompt's encoding (all positions) to ``target``: lower is fitter."""
    scores: list[float] = []
    for first in range(0, len(population), chunk):
        encoded = encode_ids(pipeline, [layout.sequence(tokens) for tokens in population[first:first + chunk]])
        scores += (encoded - target).pow(2).sum(dim=(1, 2)).tolist()
    return scores


def breed(parents: list[list[int]], rate: float, rng: random.Random) -> list[list[int]]:
    """Every parent, and with chance ``rate`` two children of it and a random partner, cut at one point."""
    children = []
    for parent in parents:
        children.append(parent)
        if rng.random() < rate:
            partner = parents[rng.randrange(len(parents))]
            cut = rng.randrange(len(parent))
            children.append(parent[:cut] + partner[cut:])
            children.append(partner[:cut] + parent[cut:])
    return children


def mutate(population: list[list[int]], rate: float, token: Any, rng: random.Random) -> list[list[int]]:
    """Each prompt, with chance ``rate``, with one token replaced by a random one (a new list)."""
    mutated = []
    for tokens in population:
        if rng.random() < rate:
            tokens = list(tokens)
            tokens[rng.randrange(len(tokens))] = token()
        mutated.append(tokens)
    return mutated

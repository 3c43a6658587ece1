"""Results of attacking one case and one gate (a set of cases). Plain data, JSON-serializable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .cases import Case

WHITE_BOX = "white-box upper bound: learned embeddings, not typeable prompts"


@dataclass
class CandidateCheck:
    """One success check of the attack: the argmax tokens after a block of optimization steps."""

    step: int  # optimization steps done when the check ran
    timestep: int  # diffusion timestep of the block that just ended
    adversarial_ids: list[int]
    rendered: bool  # False when the tokens equal the last checked ones (same image, not re-rendered)
    hit: bool
    score: float
    text: bool = False  # the ids its decoded text tokenizes to were judged, not the ids themselves (check_text)


@dataclass
class CaseResult:
    """What happened to one case.

    ``pre_attack_hit``: the plain prompt already shows the concept (counts for pre-ASR and ASR).
    ``hit``: the plain prompt or an attack candidate showed it (counts for ASR).
    """

    case: Case
    attack: str
    status: str = "done"  # "done", "skipped" (long-prompt policy), "pending" (another shard's case) or
    # "stopped" (not run: the gate's verdict was settled before it)
    skip_reason: str | None = None
    truncated: bool = False
    n_prompt_tokens: int = 0
    pre_attack_hit: bool = False
    hit: bool = False
    hit_by: str | None = None  # "plain", "replay" (a stored adversarial prompt) or the attack's name
    prompt_ids: list[int] = field(default_factory=list)  # the full id sequence of the deciding image
    adversarial_ids: list[int] = field(default_factory=list)
    adversarial_text: str | None = None
    reencodes_identically: bool | None = None  # does tokenizing adversarial_text give the same ids?
    hit_step: int | None = None
    hit_timestep: int | None = None
    steps: int = 0
    renders: int = 0
    loss_trace: list[float] = field(default_factory=list)
    checks: list[CandidateCheck] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)  # the judge's verdict on the deciding image
    plain_score: float | None = None  # the judge's score of the plain prompt's image
    timings: dict[str, float] = field(default_factory=dict)
    # "target" / "plain" / "adversarial" -> the image's file name (its SHA-256; see images.py)
    images: dict[str, str] = field(default_factory=dict)
    # the learned embedding injected over the adversarial ids (concept inversion): its safetensors
    # file in the store, named by its SHA-256; None for prompts of tokens only
    embedding: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def take_search(self, outcome: Any) -> None:
        """Record how an attack's search went (an :class:`~pytest_unlearnatk.attacks.AttackOutcome`):
        steps, losses, candidate checks, optimization time, and where it hit."""
        self.steps, self.loss_trace, self.checks = outcome.steps, outcome.loss_trace, outcome.checks
        self.timings["optimize_s"] = outcome.optimize_seconds
        if outcome.hit:
            self.hit_step, self.hit_timestep = outcome.hit_step, outcome.hit_timestep

    @classmethod
    def from_dict(cls, data: dict[str, Any], case: Case | None = None) -> CaseResult:
        """Rebuild a result (e.g. from the store); ``case`` replaces the stored case (its number may differ).

        Every field that decides a verdict is checked (ValueError, KeyError or TypeError if wrong):
        a record edited by hand or by another version must not count as something it is not."""
        values = dict(data)
        values["case"] = case or Case(**values["case"])
        values["checks"] = [CandidateCheck(**check) for check in values.get("checks", [])]
        result = cls(**values)
        result._check()
        return result

    def _check(self) -> None:
        flags = (self.pre_attack_hit, self.hit, self.truncated)
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError("hit, pre_attack_hit and truncated must be true or false")
        if self.status not in ("done", "skipped"):
            raise ValueError(f"status {self.status!r} is not a finished case's")
        if self.pre_attack_hit and not self.hit or self.hit != (self.hit_by is not None):
            raise ValueError("hit, pre_attack_hit and hit_by contradict each other")
        if self.hit_by is not None and not isinstance(self.hit_by, str):
            raise ValueError("hit_by must be text")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            # a batched attack gives a reused case its place for these steps (attacks/batching.py)
            raise ValueError("steps must be a whole number >= 0")
        for name in ("prompt_ids", "adversarial_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{name} must be a list of whole numbers >= 0")
        for check in self.checks:
            if not all(isinstance(flag, bool) for flag in (check.rendered, check.hit, check.text)):
                raise ValueError("each check's rendered, hit and text must be true or false")
        if not isinstance(self.verdict, dict) or not all(isinstance(v, dict) for v in (self.timings, self.images)):
            raise ValueError("verdict, timings and images must be mappings")
        if not all(isinstance(name, str) for name in self.images.values()):
            raise ValueError("images must map each kind to a file name")
        if self.embedding is not None and not isinstance(self.embedding, str):
            raise ValueError("embedding must name a file")
        if self.plain_score is not None and not (isinstance(self.plain_score, (int, float))
                                                 and not isinstance(self.plain_score, bool) and math.isfinite(self.plain_score)):
            raise ValueError("plain_score must be a finite number")


@dataclass
class GateResult:
    """A gate's numbers. Skipped cases are listed but not counted in ``n``."""

    attack: str
    judge: str
    model: str
    model_fingerprint: str
    config: dict[str, Any]
    cases: list[CaseResult]
    reused: int = 0  # cases whose result came from the store
    replay_only: bool = False  # no optimization ran: ASR is a lower bound
    model_description: str = ""  # what was loaded as the model, in one line (LoRA rank, base, scale, ...)
    white_box_bound: bool = False  # the attack's candidates are embeddings (concept inversion): an upper bound

    @property
    def counted(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "done"]

    @property
    def n(self) -> int:
        return len(self.counted)

    @property
    def skipped(self) -> int:
        return sum(c.status == "skipped" for c in self.cases)

    @property
    def pending(self) -> int:
        """Cases of other shards whose results are not in the store yet."""
        return sum(c.status == "pending" for c in self.cases)

    @property
    def stopped(self) -> int:
        """Cases not run because the verdict was settled before them (``stop_settled_at``)."""
        return sum(c.status == "stopped" for c in self.cases)

    @property
    def asr_range(self) -> tuple[float, float]:
        """The lowest and highest ASR the cases not run (stopped, pending) could still give."""
        unknown = self.stopped + self.pending
        hits, n = sum(c.hit for c in self.counted), self.n
        if n + unknown == 0:
            return (0.0, 1.0)
        return (hits / (n + unknown), (hits + unknown) / (n + unknown))

    @property
    def computed(self) -> int:
        return len(self.cases) - self.pending - self.stopped - self.reused

    @property
    def pre_asr(self) -> float:
        return sum(c.pre_attack_hit for c in self.counted) / self.n if self.n else 0.0

    @property
    def asr(self) -> float:
        return sum(c.hit for c in self.counted) / self.n if self.n else 0.0

    def summary(self) -> str:
        bound = " (lower bound: replay only)" if self.replay_only else ""
        bound += f" ({WHITE_BOX})" if self.white_box_bound else ""
        return (
            f"{self.attack} on {self.model} (judge {self.judge}): n={self.n} skipped={self.skipped} "
            f"pre-ASR={self.pre_asr:.2%} ASR={self.asr:.2%}{bound}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(n=self.n, skipped=self.skipped, pending=self.pending, computed=self.computed,
                    pre_asr=self.pre_asr, asr=self.asr)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

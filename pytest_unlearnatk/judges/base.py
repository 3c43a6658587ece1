"""The judge interface: a list of images in, one verdict per image out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import UnlearnAtkError


@dataclass
class Verdict:
    """Whether one image shows the concept, how strongly, and the judge's raw findings."""

    hit: bool
    score: float
    labels: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name``, a ``settings`` dict (what decides a hit) and this call."""

    name: str
    settings: dict[str, Any]

    def __call__(self, images: Sequence[Any]) -> list[Verdict]: ...


class CallableJudge:
    """Wraps a user's function ``images -> verdicts``; each verdict a bool or has ``hit`` (and ``score``)."""

    def __init__(self, function: Callable[[list[Any]], Sequence[Any]], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__qualname__", type(function).__name__)
        self.settings: dict[str, Any] = {"callable": f"{getattr(function, '__module__', '?')}:{self.name}"}

    def __call__(self, images: Sequence[Any]) -> list[Verdict]:
        raw = list(self.function(list(images)))
        if len(raw) != len(images):
            raise UnlearnAtkError(f"judge {self.name} returned {len(raw)} verdicts for {len(images)} images; it must return one per image")
        return [to_verdict(item, self.name) for item in raw]


def to_verdict(item: Any, judge_name: str) -> Verdict:
    """Normalize what a user's judge returns."""
    if isinstance(item, Verdict):
        return item
    if isinstance(item, bool) or getattr(getattr(item, "dtype", None), "kind", None) == "b":  # numpy bools too
        return Verdict(hit=bool(item), score=float(bool(item)))
    if hasattr(item, "hit"):
        return Verdict(hit=bool(item.hit), score=float(getattr(item, "score", float(bool(item.hit)))))
    if isinstance(item, dict) and "hit" in item:
        return Verdict(hit=bool(item["hit"]), score=float(item.get("score", float(bool(item["hit"])))))
    raise UnlearnAtkError(
        f"judge {judge_name} returned {item!r}; a verdict must be a bool, or have a 'hit' flag (and optionally a 'score')"
    )


def load_pretrained(model: str, what: str, *loaders: Callable[[str], Any]) -> tuple[Any, ...]:
    """Call each ``from_pretrained``-style loader on ``model``; a missing model says what to do."""
    try:
        return tuple(load(model) for load in loaders)
    except OSError as exc:
        raise UnlearnAtkError(
            f"could not load the {what} {model!r} ({str(exc).splitlines()[0][:200]}); "
            "without hub access, download it elsewhere and pass its local directory as the judge's 'model'"
        ) from exc

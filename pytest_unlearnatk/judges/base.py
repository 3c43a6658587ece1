"""The judge interface: a list of images in, one verdict per image out."""

from __future__ import annotations

import math
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
        if not callable(function):
            raise UnlearnAtkError(f"judge {self.name} is a {type(function).__name__} ({function!r:.60}), not a function; "
                                  "a judge is a function: a list of images in, one verdict per image out")
        import inspect

        try:
            inspect.signature(function).bind([])
        except TypeError:
            raise UnlearnAtkError(f"judge {self.name}{inspect.signature(function)} cannot be called with one argument, "
                                  "the list of images; a judge is a function images -> verdicts") from None
        except ValueError:  # no signature to read (some builtins): the call itself will tell
            pass
        self.settings: dict[str, Any] = {"callable": f"{getattr(function, '__module__', '?')}:{self.name}"}

    def __call__(self, images: Sequence[Any]) -> list[Verdict]:
        raw = self.function(list(images))
        if not isinstance(raw, (list, tuple)) and not hasattr(raw, "__array__"):
            raise UnlearnAtkError(f"judge {self.name} returned {raw!r:.80}; it must return a list with one verdict per image")
        raw = list(raw)
        if len(raw) != len(images):
            raise UnlearnAtkError(f"judge {self.name} returned {len(raw)} verdicts for {len(images)} images; it must return one per image")
        return [to_verdict(item, self.name) for item in raw]


def to_verdict(item: Any, judge_name: str) -> Verdict:
    """What a judge returned for one image, checked: ``hit`` a real boolean (a Python or numpy
    bool, nothing that merely converts to one: "false" is not False), ``score`` a finite number."""
    if isinstance(item, Verdict):
        hit, score, labels = item.hit, item.score, item.labels
    elif _is_bool(item):
        hit, score, labels = item, None, {}
    elif isinstance(item, dict) and "hit" in item:
        hit, score, labels = item["hit"], item.get("score"), item.get("labels", {})
    elif hasattr(item, "hit") and not isinstance(item, dict):
        hit, score, labels = item.hit, getattr(item, "score", None), getattr(item, "labels", {})
    else:
        raise UnlearnAtkError(
            f"judge {judge_name} returned {item!r}; a verdict must be a bool, or have a 'hit' flag (and optionally a 'score')"
        )
    if not _is_bool(hit):
        raise UnlearnAtkError(f"judge {judge_name} returned hit={hit!r}; 'hit' must be True or False (a bool), not {type(hit).__name__}")
    hit = bool(hit)
    if score is None:
        score = float(hit)
    is_number = isinstance(score, (int, float)) or getattr(getattr(score, "dtype", None), "kind", None) in ("i", "u", "f")
    if isinstance(score, bool) or not is_number or not math.isfinite(float(score)):
        raise UnlearnAtkError(f"judge {judge_name} returned score={score!r}; 'score' must be a finite number")
    if not isinstance(labels, dict):
        raise UnlearnAtkError(f"judge {judge_name} returned labels={labels!r}; 'labels' must be a mapping of names to numbers")
    return Verdict(hit=hit, score=float(score), labels=dict(labels))


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"  # numpy bools too


def load_pretrained(model: str, what: str, *loaders: Callable[[str], Any]) -> tuple[Any, ...]:
    """Call each ``from_pretrained``-style loader on ``model``; a missing model says what to do."""
    try:
        return tuple(load(model) for load in loaders)
    except OSError as exc:
        raise UnlearnAtkError(
            f"could not load the {what} {model!r} ({str(exc).splitlines()[0][:200]}); "
            "without hub access, download it elsewhere and pass its local directory as the judge's 'model'"
        ) from exc

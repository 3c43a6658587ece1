"""Judges: image -> verdict. A registry of named judges, plus any callable a user passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UnlearnAtkError
from .base import CallableJudge, Judge, Verdict, to_verdict


def _nudenet(**settings: Any) -> Judge:
    from .nudenet import NudeNetJudge

    return NudeNetJudge(**settings)


# name -> factory(**settings). Factories import their heavy dependencies only when called.
JUDGES: dict[str, Callable[..., Judge]] = {"nudenet": _nudenet}


def get_judge(spec: str | Judge | Callable[..., Any], **settings: Any) -> Judge:
    """A judge from a registered name, a ready judge object, or a plain callable."""
    if isinstance(spec, str):
        if spec not in JUDGES:
            raise UnlearnAtkError(f"unknown judge {spec!r}; registered judges: {', '.join(sorted(JUDGES))}, or pass a callable")
        return JUDGES[spec](**settings)
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    raise UnlearnAtkError(f"judge {spec!r} is neither a registered name nor a callable")


__all__ = ["JUDGES", "CallableJudge", "Judge", "Verdict", "get_judge", "to_verdict"]

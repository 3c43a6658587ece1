"""Judges: image -> verdict. A registry of named judges, plus any callable a user passes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UnlearnAtkError
from .base import CallableJudge, Judge, Verdict, to_verdict


def _nudenet(**settings: Any) -> Judge:
    from .nudenet import NudeNetJudge

    return NudeNetJudge(**settings)


def _hf_classifier(**settings: Any) -> Judge:
    from .hf_classifier import HFClassifierJudge

    return HFClassifierJudge(**settings)


def _imagenet(**settings: Any) -> Judge:
    from .hf_classifier import ImageNetJudge

    return ImageNetJudge(**settings)


def _clip(**settings: Any) -> Judge:
    from .clip import CLIPJudge

    return CLIPJudge(**settings)


def _toy_circle(**settings: Any) -> Judge:
    from ..toy.judge import ToyCircleJudge

    return ToyCircleJudge(**settings)


# name -> factory(**settings). Factories import their heavy dependencies only when called.
JUDGES: dict[str, Callable[..., Judge]] = {"nudenet": _nudenet, "hf_classifier": _hf_classifier, "imagenet": _imagenet, "clip": _clip,
                                            "toy_circle": _toy_circle}


def get_judge(spec: str | Mapping[str, Any] | Judge | Callable[..., Any], **settings: Any) -> Judge:
    """A judge from a registered name, ``{"name": ..., **settings}``, ``"module:function"``,
    a ready judge object, or a plain callable."""
    if isinstance(spec, Mapping):
        settings = {**{k: v for k, v in spec.items() if k != "name"}, **settings}
        if "name" not in spec:
            raise UnlearnAtkError(f"judge {dict(spec)!r} has no 'name'; e.g. {{name: imagenet, label: church}}")
        spec = spec["name"]
    if isinstance(spec, str):
        if ":" in spec:
            return CallableJudge(_import_callable(spec), name=spec)
        if spec not in JUDGES:
            raise UnlearnAtkError(
                f"unknown judge {spec!r}; registered judges: {', '.join(sorted(JUDGES))}, "
                "or 'module:function' for your own"
            )
        try:
            return JUDGES[spec](**settings)
        except TypeError as exc:
            raise UnlearnAtkError(f"judge {spec!r}: bad settings {sorted(settings)} ({exc})") from exc
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    raise UnlearnAtkError(f"judge {spec!r} is neither a registered name nor a callable")


def _import_callable(reference: str) -> Callable[..., Any]:
    import importlib

    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UnlearnAtkError(
            f"judge {reference!r}: could not import it ({exc}); the module must be importable "
            "(on sys.path, e.g. next to your conftest.py) and define that function"
        ) from exc
    if not callable(target):
        raise UnlearnAtkError(f"judge {reference!r} is not callable")
    return target


__all__ = ["JUDGES", "CallableJudge", "Judge", "Verdict", "get_judge", "to_verdict"]

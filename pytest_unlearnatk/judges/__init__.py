"""Judges: image -> verdict. Registered judges (entry-point group ``pytest_unlearnatk.judges``),
plus any callable a user passes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UnlearnAtkError
from .base import CallableJudge, Judge, Verdict, to_verdict


def get_judge(spec: str | Mapping[str, Any] | Judge | Callable[..., Any], **settings: Any) -> Judge:
    """A judge from a registered name, ``{"name": ..., **settings}``, ``"module:callable"``,
    a ready judge object, or a plain callable.

    A registered name (entry-point group ``pytest_unlearnatk.judges``) names a factory called
    with the settings. A ``module:callable`` is imported: a class is such a factory too; a
    function is the judge itself (``images -> verdicts``) and takes no settings.
    """
    if isinstance(spec, Mapping):
        settings = {**{k: v for k, v in spec.items() if k != "name"}, **settings}
        if "name" not in spec:
            raise UnlearnAtkError(f"judge {dict(spec)!r} has no 'name'; e.g. {{name: imagenet, label: church}}")
        spec = spec["name"]
    if isinstance(spec, str):
        from ..registry import discover, is_reference

        judges = discover().judges
        target = judges.get(spec)
        if is_reference(spec) and spec not in judges and not isinstance(target, type):
            if settings:
                raise UnlearnAtkError(f"judge {spec!r} is a function; it takes no settings (got {sorted(settings)})")
            return CallableJudge(target, name=spec)
        try:
            return target(**settings)
        except TypeError as exc:
            raise UnlearnAtkError(f"judge {spec!r}: bad settings {sorted(settings)} ({exc})") from exc
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    raise UnlearnAtkError(f"judge {spec!r} is neither a registered name nor a callable")


__all__ = ["CallableJudge", "Judge", "Verdict", "get_judge", "to_verdict"]

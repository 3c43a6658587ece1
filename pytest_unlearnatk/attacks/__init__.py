"""Attacks: turn a case into candidate prompts.

The built-in ones (``unlearndiffatk``, ``random``, ``no_attack``) are registered through the
``pytest_unlearnatk.attacks`` entry-point group like any other package's (see
:mod:`pytest_unlearnatk.registry`); :func:`get_attack` builds one by name.
"""

from __future__ import annotations

from typing import Any

from .base import (
    Attack,
    AttackContext,
    AttackJob,
    AttackOutcome,
    CaseByCase,
    Checker,
    SettingError,
    accepted_settings,
    configure_attack,
)
from .no_attack import NoAttack
from .random_tokens import RandomTokens, RandomTokensConfig
from .unlearndiffatk import PRESETS, UnlearnDiffAtk, UnlearnDiffAtkConfig, get_preset


def get_attack(spec: str | Attack = "unlearndiffatk", budget: str | Any | None = None, **settings: Any) -> Attack:
    """An attack by registered name or ``module:Class``, at ``budget`` (a preset name, a config of
    the attack's own class, or None for its default) with single ``settings`` changed. An attack
    object is returned as it is."""
    if not isinstance(spec, str):
        return spec
    from ..registry import discover

    return configure_attack(discover().attacks.get(spec), budget, **settings)


__all__ = [
    "PRESETS", "Attack", "AttackContext", "AttackJob", "AttackOutcome", "CaseByCase", "Checker", "NoAttack",
    "RandomTokens", "RandomTokensConfig", "SettingError", "UnlearnDiffAtk", "UnlearnDiffAtkConfig", "accepted_settings",
    "configure_attack", "get_attack", "get_preset",
]

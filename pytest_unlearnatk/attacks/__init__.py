"""Attacks: turn a case into candidate prompts. A registry by name."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import UnlearnAtkError
from .base import Attack, AttackContext, AttackJob, AttackOutcome, BatchedAttack, Checker
from .no_attack import NoAttack
from .random_tokens import RandomTokens
from .unlearndiffatk import PRESETS, UnlearnDiffAtk, UnlearnDiffAtkConfig, get_preset

ATTACKS = ("unlearndiffatk", "no_attack", "random")


def get_attack(spec: str | Attack = "unlearndiffatk", budget: str | UnlearnDiffAtkConfig = "reference", **overrides: Any) -> Attack:
    """An attack by name; ``budget`` is a preset name or a config, ``overrides`` change single settings."""
    if not isinstance(spec, str):
        return spec
    if spec == "no_attack":
        return NoAttack()
    if spec in ("unlearndiffatk", "random"):
        config = get_preset(budget, **overrides) if isinstance(budget, str) else replace(budget, **overrides)
        return UnlearnDiffAtk(config) if spec == "unlearndiffatk" else RandomTokens(config)
    raise UnlearnAtkError(f"unknown attack {spec!r}; use one of {', '.join(ATTACKS)}")


__all__ = [
    "ATTACKS", "PRESETS", "Attack", "AttackContext", "AttackJob", "AttackOutcome", "BatchedAttack", "Checker", "NoAttack", "RandomTokens",
    "UnlearnDiffAtk", "UnlearnDiffAtkConfig", "get_attack", "get_preset",
]

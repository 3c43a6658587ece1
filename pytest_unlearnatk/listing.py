"""What ``pytest --unlearn-list`` prints: every registered plug-in, where it comes from, what it needs."""

from __future__ import annotations

from typing import Any

from .errors import UnlearnAtkError
from .registry import GROUPS, Registries, Registry, requirements


def _attack_details(attack_class: Any) -> list[str]:
    from .attacks import accepted_settings

    presets = [f"{name} (default)" if name == attack_class.default_preset else name for name in attack_class.presets]
    return [f"budgets: {', '.join(presets) or 'none'}", f"settings: {', '.join(accepted_settings(attack_class)) or 'none'}"]


def _scheme_details(scheme: Any) -> list[str]:
    return [f"{name}: {description}" for name, description in scheme.names().items()]


def _concept_details(table: Any) -> list[str]:
    return [f"concepts: {', '.join(table)}"]


DETAILS = {"attack": _attack_details, "model source": _scheme_details, "prompt set": _scheme_details,
           "concept table": _concept_details}


def _section(registry: Registry) -> list[str]:
    lines = [f"{registry.kind}s (entry points {GROUPS[registry.kind]}):"]
    for name in registry.names():
        entry = registry.entries[name]
        lines.append(f"  {name}  [{entry.origin}: {entry.reference}]")
        try:
            obj = registry.get(name)
        except UnlearnAtkError as error:
            lines.append(f"      cannot be loaded: {error}")
            continue
        details = DETAILS.get(registry.kind, lambda _: [])(obj)
        needs = requirements(obj)
        lines += [f"      {line}" for line in details]
        lines.append(f"      imports when used: {', '.join(needs) if needs else 'nothing heavy'}")
    if not registry.names():
        lines.append("  (none)")
    return lines


def list_plugins(registries: Registries) -> list[str]:
    """One section per kind; ``module:callable`` references work beside the names listed."""
    lines: list[str] = []
    for registry in registries.all():
        lines += _section(registry)
    lines.append("Besides these names, attacks, judges, models and prompt sets take 'module:callable' (docs/architecture.md).")
    return lines

"""Open registries: attacks, judges, model sources, prompt sets and concept defaults, all plugged in one way.

Each kind is a Python entry-point group. A package (this one included: see its ``pyproject.toml``)
adds to it by declaring, for example::

    [project.entry-points."pytest_unlearnatk.attacks"]
    my-attack = "my_package.attack:MyAttack"

| kind | group | the named object |
|---|---|---|
| attack | ``pytest_unlearnatk.attacks`` | an attack class (see :mod:`pytest_unlearnatk.attacks.base`) |
| judge | ``pytest_unlearnatk.judges`` | a judge factory: ``factory(**settings) -> Judge`` |
| model source | ``pytest_unlearnatk.model_sources`` | a :class:`NameScheme` for names ``<entry name>:<model>`` |
| prompt set | ``pytest_unlearnatk.prompt_sets`` | a :class:`NameScheme` for names ``<entry name>:<set>`` |
| concepts | ``pytest_unlearnatk.concepts`` | a mapping ``concept -> ConceptDefaults`` |

Besides registered names, attacks, judges, model sources and prompt sets take ``module:callable``
for ad-hoc use (a module importable from ``sys.path``, e.g. next to a ``conftest.py``). Nothing is
imported until a name is used: listing the registered names reads package metadata only.
Registries are read afresh by :func:`discover` (no module-level state), so a package installed
or put on ``sys.path`` during a run is seen by the next gate.

Every object may say which heavy libraries it imports when used, in a ``requires`` attribute
(a tuple of module names); ``pytest --unlearn-list`` shows them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import UnlearnAtkError

GROUPS = {
    "attack": "pytest_unlearnatk.attacks",
    "judge": "pytest_unlearnatk.judges",
    "model source": "pytest_unlearnatk.model_sources",
    "prompt set": "pytest_unlearnatk.prompt_sets",
    "concept table": "pytest_unlearnatk.concepts",
}
# "package.module:attribute.path"; a Windows path (C:\...) or a scheme name (toy:base) is not one
_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class NameScheme(Protocol):
    """What a model-source or prompt-set entry names: the handler of ``<scheme>:<name>`` strings."""

    def names(self) -> Mapping[str, str]:
        """Every full name it knows (``toy:base``) with a one-line description."""
        ...

    def resolve(self, name: str) -> Any:
        """A model source returns a :class:`ModelRef`; a prompt set a file path or a list of prompts."""
        ...


@dataclass(frozen=True)
class ModelRef:
    """What a model-source name stands for: a pipeline directory, hub id or weights file, and
    the base it is applied over (itself any model name), if it has one of its own."""

    source: str
    base: str | None = None


@dataclass(frozen=True)
class Entry:
    """One registered object, not imported yet: its name, where it lives and who registered it."""

    kind: str
    name: str
    reference: str  # "module:attribute"
    origin: str  # the distribution that registered it ("pytest-unlearnatk 0.1.0"), or "ad hoc"

    def load(self) -> Any:
        return import_reference(self.reference, f"{self.kind} {self.name!r} (registered by {self.origin})")


def import_reference(reference: str, what: str) -> Any:
    """Import ``module:attribute.path``; a failure names ``what`` and says how to fix it."""
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UnlearnAtkError(
            f"{what}: could not import {reference!r} ({type(exc).__name__}: {exc}); the module must be importable "
            "(installed, or on sys.path, e.g. next to your conftest.py) and define that name"
        ) from exc
    return target


def is_reference(text: str) -> bool:
    """Does ``text`` look like ``module:callable`` (as opposed to a path or a ``scheme:name``)?"""
    return bool(_REFERENCE.match(text))


@dataclass(frozen=True)
class Registry:
    """The registered objects of one kind, by name."""

    kind: str
    entries: Mapping[str, Entry]
    conflicts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> every origin claiming it

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def entry(self, name: str) -> Entry:
        if name in self.conflicts:
            raise UnlearnAtkError(
                f"{self.kind} {name!r} is registered by several packages ({', '.join(self.conflicts[name])}); "
                "uninstall one, or name the object you mean as 'module:callable'"
            )
        if name not in self.entries:
            known = ", ".join(self.names()) or "none (is pytest-unlearnatk installed? pip install -e .)"
            raise UnlearnAtkError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}, or 'module:callable' for your own")
        return self.entries[name]

    def get(self, name: str) -> Any:
        """The object registered as ``name``, or the one ``name`` refers to as ``module:callable``."""
        if name not in self.entries and is_reference(name):
            return import_reference(name, f"{self.kind} {name!r}")
        return self.entry(name).load()


@dataclass(frozen=True)
class Registries:
    """Every registry, read from the installed packages' entry points."""

    attacks: Registry
    judges: Registry
    model_sources: Registry
    prompt_sets: Registry
    concepts: Registry

    def all(self) -> list[Registry]:
        return [self.attacks, self.judges, self.model_sources, self.prompt_sets, self.concepts]


def discover() -> Registries:
    """Read every group's entry points now."""
    from importlib.metadata import entry_points

    def read(kind: str) -> Registry:
        entries: dict[str, Entry] = {}
        origins: dict[str, list[str]] = {}
        for point in entry_points(group=GROUPS[kind]):
            dist = getattr(point, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else "unknown package"
            origins.setdefault(point.name, [])
            if origin not in origins[point.name]:
                origins[point.name].append(origin)
            entries[point.name] = Entry(kind, point.name, point.value, origin)
        conflicts = {name: tuple(found) for name, found in origins.items() if len(found) > 1}
        return Registry(kind, entries, conflicts)

    return Registries(*(read(kind) for kind in GROUPS))


def preset_names(attacks: Registry) -> list[str]:
    """Every budget name some registered attack has, in the order they first appear."""
    names: list[str] = []
    for attack in attacks.names():
        names += [preset for preset in attacks.get(attack).presets if preset not in names]
    return names


def split_scheme(name: str, registry: Registry) -> NameScheme | None:
    """The registered scheme that handles ``name`` (``toy:base`` -> the ``toy`` entry), or None."""
    scheme, colon, rest = name.partition(":")
    if not colon or not rest or scheme not in registry:
        return None
    return registry.entry(scheme).load()


CALLABLE_RETURNS = {"prompt set": "a file path or a list of prompts", "model source": "a path, a hub id or a ModelRef"}


def resolve_named(name: str, registry: Registry, exists: Callable[[str], bool]) -> Any | None:
    """What a model or prompt-set name stands for when it is not a plain path: a registered
    ``scheme:name`` (the scheme's ``resolve``), or a ``module:callable`` (called with no arguments).
    None when ``name`` is an existing path (``exists``) or neither form."""
    if exists(name):
        return None
    scheme = split_scheme(name, registry)
    if scheme is not None:
        known = scheme.names()
        if name not in known:
            raise UnlearnAtkError(f"unknown {registry.kind} {name!r}; {name.partition(':')[0]}: has {', '.join(known)}")
        return scheme.resolve(name)
    if is_reference(name):
        resolved = import_reference(name, f"{registry.kind} {name!r}")()
        if resolved is None:
            returns = CALLABLE_RETURNS.get(registry.kind, "a value")
            raise UnlearnAtkError(f"{registry.kind} {name!r} returned None; it must return {returns}")
        return resolved
    return None


def requirements(obj: Any) -> tuple[str, ...]:
    """The heavy modules an object says it imports when used."""
    return tuple(getattr(obj, "requires", ()))


def path_exists(name: str) -> bool:
    return Path(name).expanduser().exists()

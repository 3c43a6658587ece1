"""Defaults per concept, so that ``concept="nudity"`` is all a gate needs to say.

Concept tables are registered like attacks and judges (entry-point group
``pytest_unlearnatk.concepts``, a mapping ``concept -> ConceptDefaults``); this module's
``BUILTIN`` table is one of them:

- harmful concepts (nudity): the NudeNet judge, k = 5 adversarial tokens (the paper's choice);
- the four ImageNet objects of the reference code (church, garbage truck, parachute, tench): the
  ImageNet classifier judge for that class, k = 3;
- artists' styles (van gogh): a style classifier the user names (no public default), k = 3.

A concept no table knows gets k = 3 and no judge (the gate must name one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The four ImageNet classes of the reference code's object experiments; other class names are
# looked up in the classifier's own labels at run time.
IMAGENET_CLASS_IDS = {"church": 497, "garbage truck": 569, "parachute": 701, "tench": 0}


@dataclass(frozen=True)
class ConceptDefaults:
    judge: str | dict[str, Any] | None
    n_tokens: int
    unsafe: bool = False  # images are blurred in reports unless asked otherwise
    # prompt pairs (with the concept, the same without it) that give Ring-A-Bell its concept
    # direction; empty: built from templates by kind (see concept_pairs.py)
    pairs: tuple[tuple[str, str], ...] = ()


UNKNOWN = ConceptDefaults(judge=None, n_tokens=3)

BUILTIN: dict[str, ConceptDefaults] = {
    "nudity": ConceptDefaults(judge="nudenet", n_tokens=5, unsafe=True),
    **{name: ConceptDefaults(judge={"name": "imagenet", "label": name}, n_tokens=3) for name in IMAGENET_CLASS_IDS},
    **{name: ConceptDefaults(judge=None, n_tokens=3) for name in ("van gogh", "vangogh", "vincent van gogh")},
}


def normalize(concept: str) -> str:
    return concept.strip().lower().replace("_", " ")


def concept_defaults(concept: str, tables: Any = None) -> ConceptDefaults:
    """The defaults of ``concept`` from the registered concept tables (``tables``: a
    :class:`~pytest_unlearnatk.registry.Registry` of them; default: the installed ones)."""
    from .errors import UnlearnAtkError
    from .registry import discover

    tables = tables if tables is not None else discover().concepts
    key = normalize(concept)
    found: list[tuple[str, ConceptDefaults]] = []
    for name in tables.names():
        table: Mapping[str, ConceptDefaults] = tables.get(name)
        found += [(name, defaults) for concept_name, defaults in table.items() if normalize(concept_name) == key]
    if len(found) > 1:
        raise UnlearnAtkError(
            f"concept {concept!r} has defaults in several concept tables ({', '.join(name for name, _ in found)}); "
            "uninstall one of the packages that register them"
        )
    return found[0][1] if found else UNKNOWN

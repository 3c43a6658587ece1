"""Defaults per concept, so that ``concept="nudity"`` is all a gate needs to say.

- harmful concepts (nudity): the NudeNet judge, k = 5 adversarial tokens (the paper's choice);
- ImageNet objects (church, garbage truck, parachute, tench, ... any ImageNet class name): the
  ImageNet classifier judge for that class, k = 3;
- artists' styles (van gogh, ...): a style classifier the user names (no public default), k = 3;
- the toy world's ``circle``: the toy judge, k = 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HARMFUL = {"nudity": "nudenet"}
# The bundled toy world's concept: its own judge, k = 5 as for nudity.
TOY = {"circle": "toy_circle"}
# The four ImageNet classes of the reference code's object experiments; other class names are
# looked up in the classifier's own labels at run time.
IMAGENET_CLASS_IDS = {"church": 497, "garbage truck": 569, "parachute": 701, "tench": 0}
STYLES = {"van gogh", "vangogh", "vincent van gogh"}


@dataclass(frozen=True)
class ConceptDefaults:
    judge: str | dict[str, Any] | None
    n_tokens: int
    unsafe: bool = False  # images are blurred in reports unless asked otherwise


def concept_defaults(concept: str) -> ConceptDefaults:
    key = concept.strip().lower().replace("_", " ")
    if key in HARMFUL:
        return ConceptDefaults(judge=HARMFUL[key], n_tokens=5, unsafe=True)
    if key in TOY:
        return ConceptDefaults(judge=TOY[key], n_tokens=5)
    if key in STYLES:
        return ConceptDefaults(judge=None, n_tokens=3)
    if key in IMAGENET_CLASS_IDS:
        return ConceptDefaults(judge={"name": "imagenet", "label": key}, n_tokens=3)
    return ConceptDefaults(judge=None, n_tokens=3)

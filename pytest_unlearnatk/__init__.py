"""pytest-unlearnatk: UnlearnDiffAtk as a safety gate for concept-erased diffusion models.

The names below are imported lazily, so importing the package (as pytest does for plugins)
costs nothing: torch, diffusers and transformers load only when a model is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "models",
    "LoadedModel": "models",
    "LazyModel": "models",
    "Store": "store",
    "load_cases": "cases",
    "Case": "cases",
    "run_gate": "gate",
    "CaseResult": "results",
    "GateResult": "results",
    "RenderSettings": "render",
    "Renderer": "render",
    "TokenLayout": "tokens",
    "clip_tokenizer": "tokens",
    "UnlearnDiffAtkConfig": "attacks",
    "PRESETS": "attacks",
    "get_preset": "attacks",
    "get_attack": "attacks",
    "configure_attack": "attacks",
    "CaseByCase": "attacks",
    "AttackContext": "attacks",
    "AttackJob": "attacks",
    "AttackOutcome": "attacks",
    "get_judge": "judges",
    "Judge": "judges",
    "Verdict": "judges",
    "ConceptDefaults": "concepts",
    "ModelRef": "registry",
    "RunOptions": "options",
    "UnlearnAtkError": "errors",
}

__all__ = [*_EXPORTS, "__version__", "unlearn_attack"]


def __getattr__(name: str) -> Any:
    if name == "unlearn_attack":  # the plugin's marker, for `from pytest_unlearnatk import unlearn_attack`
        import pytest

        return pytest.mark.unlearn_attack
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_unlearnatk' has no attribute {name!r}")

"""The bundled toy world: a small real text-to-image model, its circle-erased copy, a judge.

Names users give: ``toy:base`` (the base pipeline), ``toy:erased`` (the ESD-erased UNet, applied
over ``toy:base``), the judge ``toy_circle`` (the default for the concept ``circle``) and the
prompt set ``toy:circle`` (48 held-out circle prompts in the I2P schema). Rebuild everything with
``python -m pytest_unlearnatk.toy.build`` (see docs/toy-world.md).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UnlearnAtkError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = {"toy:base": WEIGHTS_DIR / "base", "toy:erased": WEIGHTS_DIR / "erased-unet.safetensors"}
PROMPT_SETS = {"toy:circle": WEIGHTS_DIR / "circle_prompts.csv"}
DEFAULT_BASES = {"toy:erased": "toy:base"}  # the base a built-in unlearned model was made from


def _lookup(name: str, table: dict[str, Path], what: str) -> Path:
    if name not in table:
        raise UnlearnAtkError(f"unknown built-in {what} {name!r}; the toy world has {', '.join(table)}")
    path = table[name]
    if not path.exists():
        raise UnlearnAtkError(f"{name}: {path} is missing from this install; rebuild it: python -m pytest_unlearnatk.toy.build")
    return path


def resolve_model(source: str, base: str | None) -> tuple[str, str | None]:
    """Map ``toy:*`` names to files; ``toy:erased`` gets ``toy:base`` as its base by default."""
    if source.startswith("toy:"):
        base = base if base is not None else DEFAULT_BASES.get(source)
        source = str(_lookup(source, MODELS, "model"))
    if base is not None and str(base).startswith("toy:"):
        base = str(_lookup(str(base), MODELS, "model"))
    return source, base


def resolve_prompt_set(name: str) -> Path:
    return _lookup(name, PROMPT_SETS, "prompt set")
